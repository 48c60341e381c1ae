"""MAE ViT, the baseline LocalMIM is measured against: one loss at the top, an 8-block 512-wide decoder,
normalised-pixel targets (norm_pix), loss on masked patches only. impl "fast" (fastmim.models.base) fuses its
encoder and decoder inputs, as LocalMIM's."""

from __future__ import annotations

from torch import Tensor, nn

from fastmim.models.base import MaskedImageModel, MIMOutput, make_masking, masked_mse
from fastmim.models.decoder import MaskedDecoder
from fastmim.models.vit import LN_EPS, MaskedViTEncoder, init_weights
from fastmim.targets import PixelTarget


class MAEViT(MaskedImageModel):
    """MAE ViT. ``forward(imgs [B, 3, H, W] normalised, noise [B, L] | None) -> MIMOutput`` (one scale)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mask_ratio: float = 0.75,
        impl: str = "reference",
    ) -> None:
        super().__init__()
        self.mask_ratio = mask_ratio
        self.encoder = MaskedViTEncoder(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.decoder = MaskedDecoder(embed_dim, decoder_dim, decoder_depth, decoder_heads, self.encoder.grid, mlp_ratio)
        self.target = PixelTarget([patch_size], norm_pix=True)
        self.pred = nn.Linear(decoder_dim, self.target.out_dims[0])
        init_weights(self.norm)
        init_weights(self.pred)
        self.impl = impl  # last: it reaches the submodules built above

    def forward(self, imgs: Tensor, noise: Tensor | None = None) -> MIMOutput:
        masking = make_masking(imgs, self.num_patches, self.mask_ratio, noise)
        (target,) = self.target(imgs)
        (feat,) = self.encoder(imgs, masking, [len(self.encoder.blocks) - 1])
        pred = self.pred(self.decoder(self.norm(feat), masking.ids_restore))
        loss = masked_mse(pred, target, masking.mask)
        return MIMOutput(loss, [loss], masking.mask, [pred], [target])
