"""LocalMIM for ViT (SPEC section 2): multi-scale reconstruction from several encoder layers.

Blocks [1, 3, depth - 3, depth - 1] are tapped; each tap has its own LayerNorm, decoder (1 block, width 256,
8 heads) and head at scale 4, 2, 1, 1/2 (cells of patch / s pixels) predicting HOG (default) or pixel targets.
Total loss = the unweighted sum of the four masked MSEs.
"""

from __future__ import annotations

from fractions import Fraction

from torch import Tensor, nn

from fastmim.masking import Masking, scale_weights
from fastmim.models import fast_path
from fastmim.models.base import MIMOutput, make_masking, masked_mse
from fastmim.models.decoder import MaskedDecoder, ScaleHead
from fastmim.models.fast_heads import heads_and_loss
from fastmim.models.vit import LN_EPS, MaskedViTEncoder
from fastmim.targets import HOGTarget, PixelTarget

VIT_SCALES = (4, 2, 1, 0.5)


class LocalMIMViT(nn.Module):
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
        self.mask_ratio, self.impl = mask_ratio, impl
        # impl "fast": run the four decoders as one grouped computation (False: one after another, each with the
        # fused decoder input). benchmarks/bench_decoders.py measures both; see fastmim.models.fast_path.
        self.group_decoders = True
        # The grouped decoder block (a function); fastmim.train.parallel.apply_compile swaps in its compiled form.
        self.grouped_block_fn = fast_path.grouped_block if impl == "fast" else None
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
        if target == "hog":
            self.target = HOGTarget(self.cell_sizes, nbins=nbins, bias=hog_bias, impl=impl)
        elif target == "pixel":
            self.target = PixelTarget(self.cell_sizes, norm_pix=True)
        else:
            raise ValueError(f"unknown target '{target}'; use 'hog' or 'pixel'")
        self.tap_norms = nn.ModuleList(nn.LayerNorm(embed_dim, eps=LN_EPS) for _ in self.taps)
        self.decoders = nn.ModuleList(
            MaskedDecoder(embed_dim, decoder_dim, 1, decoder_heads, grid, mlp_ratio) for _ in self.taps
        )
        for decoder, scale, out_dim in zip(self.decoders, self.scales, self.target.out_dims):
            decoder.head = ScaleHead(decoder_dim, out_dim, scale, grid)

    @property
    def num_patches(self) -> int:
        return self.encoder.num_patches

    def forward(self, imgs: Tensor, noise: Tensor | None = None) -> MIMOutput:
        masking = make_masking(imgs, self.num_patches, self.mask_ratio, noise)
        targets = self.target(imgs)
        if self.impl == "fast":
            feats = fast_path.encode(self.encoder, imgs, masking, self.taps)
            return self._fast_heads_and_loss(feats, targets, masking)
        feats = self.encoder(imgs, masking, self.taps)
        preds, losses = [], []
        for k, scale in enumerate(self.scales):
            decoder = self.decoders[k]
            pred = decoder.head(decoder(self.tap_norms[k](feats[k]), masking.ids_restore))
            weight = scale_weights(masking.mask, self.encoder.grid, scale)
            preds.append(pred)
            losses.append(masked_mse(pred, targets[k], weight))
        return MIMOutput(sum(losses), losses, masking.mask, preds, targets)

    def _fast_heads_and_loss(self, feats: list[Tensor], targets: list[Tensor], masking: Masking) -> MIMOutput:
        """impl = "fast": the same decoders (fused decoder input, grouped: fastmim.models.fast_path), then heads
        evaluated only at cells that reach the loss and one fused loss kernel (fastmim.models.fast_heads).
        ``preds[k]`` scatters to [B, N_k, out] on first access, zero at cells of loss weight 0; ``preds.compact``
        holds the computed predictions."""
        tokens = fast_path.decode(
            self.decoders, self.tap_norms, feats, masking.ids_restore, self.group_decoders, self.grouped_block_fn
        )
        num_masked = masking.ids_restore.shape[1] - masking.ids_keep.shape[1]
        heads = [dec.head for dec in self.decoders]
        preds, losses = heads_and_loss(heads, tokens, targets, masking.mask, self.encoder.grid, num_masked)
        return MIMOutput(sum(losses), losses, masking.mask, preds, targets)
