"""LocalMIM for ViT (method section 2): multi-scale reconstruction from several encoder layers.

Blocks [1, 3, depth - 3, depth - 1] are tapped; each tap has its own LayerNorm, decoder (1 block, width 256,
8 heads) and head at scale 4, 2, 1, 1/2 (cells of patch / s pixels) predicting HOG (default) or pixel targets.
Total loss = the unweighted sum of the four masked MSEs.

impl "fast" (fastmim.models.base) computes the same with the same modules: the HOG kernel, the fused encoder and
decoder inputs, the four decoders as one grouped computation (fastmim.models.grouped), and the heads only at the
cells that reach the loss, followed by one fused loss kernel (fastmim.models.fast_heads).
"""

from __future__ import annotations

from fractions import Fraction

from torch import Tensor, nn

from fastmim.masking import scale_weights
from fastmim.models.base import MaskedImageModel, MIMOutput, make_masking, masked_mse
from fastmim.models.decoder import MaskedDecoder, ScaleHead
from fastmim.models.fast_heads import heads_and_loss
from fastmim.models.grouped import GroupedBlock, decode_grouped
from fastmim.models.vit import LN_EPS, MaskedViTEncoder
from fastmim.targets import make_target

VIT_SCALES = (4, 2, 1, 0.5)


class LocalMIMViT(MaskedImageModel):
    """LocalMIM ViT. ``forward(imgs [B, 3, H, W] normalised, noise [B, L] | None) -> MIMOutput``."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        decoder_dim: int = 256,
        decoder_heads: int = 8,
        target: str = "hog",
        nbins: int = 9,
        hog_bias: bool = False,
        mask_ratio: float = 0.75,
        impl: str = "reference",
    ) -> None:
        super().__init__()
        if depth < 4:
            raise ValueError(f"LocalMIM taps blocks 1, 3, depth-3, depth-1: depth must be >= 4, got {depth}")
        self.mask_ratio = mask_ratio
        # impl "fast": run the four decoders as one grouped computation (False: one after another, each with the
        # fused decoder input). benchmarks/bench_decoders.py measures both.
        self.group_decoders = True
        self.grouped_block = GroupedBlock()
        self.taps = [1, 3, depth - 3, depth - 1]
        self.scales = VIT_SCALES
        cells = [Fraction(patch_size) / Fraction(s) for s in self.scales]
        if any(c.denominator != 1 or img_size % int(c) for c in cells):
            raise ValueError(
                f"cell sizes {[str(c) for c in cells]} (patch / scale) must be integers dividing the image size "
                f"{img_size}; use a patch size divisible by 4 and an even number of patches per side"
            )
        self.cell_sizes = [int(c) for c in cells]
        self.encoder = MaskedViTEncoder(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio)
        grid = self.encoder.grid
        if grid % 2:
            raise ValueError(f"the s = 1/2 scale pools 2 x 2 patches: patches per side ({grid}) must be even")
        self.target = make_target(target, self.cell_sizes, nbins, hog_bias)
        self.tap_norms = nn.ModuleList(nn.LayerNorm(embed_dim, eps=LN_EPS) for _ in self.taps)
        self.decoders = nn.ModuleList(
            MaskedDecoder(embed_dim, decoder_dim, 1, decoder_heads, grid, mlp_ratio) for _ in self.taps
        )
        for decoder, scale, out_dim in zip(self.decoders, self.scales, self.target.out_dims):
            decoder.head = ScaleHead(decoder_dim, out_dim, scale, grid)
        self.impl = impl  # last: it reaches the submodules built above

    def forward(self, imgs: Tensor, noise: Tensor | None = None) -> MIMOutput:
        masking = make_masking(imgs, self.num_patches, self.mask_ratio, noise)
        targets = self.target(imgs)
        feats = self.encoder(imgs, masking, self.taps)
        if self.impl == "fast" and self.group_decoders:
            tokens = decode_grouped(self.decoders, self.tap_norms, feats, masking.ids_restore, self.grouped_block)
        else:
            tokens = [dec(norm(f), masking.ids_restore) for dec, norm, f in zip(self.decoders, self.tap_norms, feats)]
        heads = [dec.head for dec in self.decoders]
        if self.impl == "fast":
            # preds[k] scatters to [B, N_k, out] on first access, zero at cells of loss weight 0
            num_masked = masking.ids_restore.shape[1] - masking.ids_keep.shape[1]
            preds, losses = heads_and_loss(heads, tokens, targets, masking.mask, self.encoder.grid, num_masked)
        else:
            preds = [head(t) for head, t in zip(heads, tokens)]
            weights = [scale_weights(masking.mask, self.encoder.grid, s) for s in self.scales]
            losses = [masked_mse(p, t, w) for p, t, w in zip(preds, targets, weights)]
        return MIMOutput(sum(losses), losses, masking.mask, preds, targets)
