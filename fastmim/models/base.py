"""What every masked-image model shares: the impl switch, the output, the masked mean-squared error (method 2.4),
and the masking from a caller's noise.

``impl`` selects how a model computes, never what: "reference" is the released computation, step by step, in plain
PyTorch (the readable definition, and the baseline every speed-up is measured against); "fast" replaces single
steps by fused or cheaper ones with the same result up to float rounding. Each such step is one op or one function
next to its reference, and the module that owns the step reads its own ``impl``: the encoder input
(fastmim.models.vit.visible_tokens), the decoder input (fastmim.models.decoder.decoder_input), the HOG target
(fastmim.targets.hog), and in the models themselves the grouped decoders and the heads evaluated on masked cells
only with the fused loss. Setting ``model.impl`` sets it on all of them: it is the one place impl is chosen.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastmim.config import ModelConfig, choices
from fastmim.masking import Masking, random_masking

IMPLS = choices(ModelConfig, "impl")  # the values model.impl declares


class MaskedImageModel(nn.Module):
    """Base of the pre-training models: ``impl`` (module docstring) is set here and reaches every submodule that
    declares an ``impl`` attribute."""

    _impl = "reference"

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in IMPLS:
            raise ValueError(f"unknown impl '{value}'; use one of {', '.join(IMPLS)}")
        self._impl = value
        for module in self.modules():
            if module is not self and hasattr(module, "impl"):
                module.impl = value

    @property
    def num_patches(self) -> int:
        """The length of a noise row: the trainer draws noise [B, num_patches] for ``forward(imgs, noise)``."""
        return self.encoder.num_patches


@dataclass
class MIMOutput:
    """``loss``: total (scalar); ``losses``: per scale, method order; ``mask``: [B, L], 1 = masked;
    ``preds``: per scale [B, N_k, out_k]; ``targets``: per scale, same shapes (no grad)."""

    loss: Tensor
    losses: list[Tensor]
    mask: Tensor
    preds: list[Tensor]
    targets: list[Tensor]


def masked_mse(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """sum_{b,j} w[b,j] * mean_c (pred - target)^2 / sum_{b,j} w[b,j], in fp32 (fp64 for fp64 input).
    pred/target [B, N, C], w [B, N]."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    per_cell = (pred.to(dtype) - target.to(dtype)).pow(2).mean(dim=-1)
    return (per_cell * weight).sum() / weight.sum()


def make_masking(imgs: Tensor, num_patches: int, mask_ratio: float, noise: Tensor | None) -> Masking:
    """Masking from the caller's noise [B, L] if given (reproducible), else from fresh U[0, 1) noise."""
    if noise is None:
        noise = torch.rand(imgs.shape[0], num_patches, device=imgs.device)
    elif noise.shape != (imgs.shape[0], num_patches):
        raise ValueError(f"noise must have shape [B, L] = {[imgs.shape[0], num_patches]}, got {list(noise.shape)}")
    return random_masking(noise.to(imgs.device), mask_ratio)


# The profiler ranges that name the stages of a training step: `fastmim profile` charges every op (and its backward) to
# the innermost one around it. Modules are put in their stage from outside (fastmim.bench.profile's forward hooks);
# the parts of a step that run as functions mark their stage themselves, with stage_range.
STAGE_RANGE = "stage::"


def stage_range(stage: str) -> contextlib.AbstractContextManager:
    """The profiler range of one stage of the step (``stage::<stage>``); none under torch.compile, which drops such
    ranges from its graphs anyway."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.profiler.record_function(STAGE_RANGE + stage)


# Kernel modules are imported when first used, not with fastmim: importing one imports triton, which decides once
# whether kernels are compiled or interpreted (TRITON_INTERPRET), and test suites set that after fastmim is imported.
# (A plain import statement, unlike importlib, is traceable by torch.compile.)
def masked_gather_ops():
    """fastmim.kernels.masked_gather: the encoder and decoder inputs, fused and reference."""
    from fastmim.kernels import masked_gather

    return masked_gather


def recon_loss_ops():
    """fastmim.kernels.recon_loss: the fused multi-scale loss and its compact layout."""
    from fastmim.kernels import recon_loss

    return recon_loss
