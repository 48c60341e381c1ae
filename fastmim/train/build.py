"""The parts of a training run, built from its config: the one builder behind ``fastmim pretrain``, ``bench step``
and ``fastmim profile``, so that what a benchmark times is the trainer's own step (``fastmim consolidate`` uses its
:func:`build_model` and :func:`build_adamw`).

:func:`build_run` first refuses a step that cannot fit in the device's memory (fastmim.train.memory), then makes,
in this order (the order fixes what the seeded random draws initialise, so a run is reproducible bit for bit): the
model (seeded by train.seed), its attention backend (model.attn), its compiled blocks (train.compile; before any
wrapper, so checkpoint keys do not change), the loader, the schedule, AdamW, the fp16 loss scaler, and the
data-parallel wrapper (fastmim.train.distributed). It reads nothing from and writes nothing to a run directory:
resuming and saving are the checkpointer's (fastmim.train.checkpointer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastmim.config import Config
from fastmim.data import MIMLoader, build_loader
from fastmim.errors import FastmimError
from fastmim.masking import num_kept
from fastmim.models import model_from_config
from fastmim.models.swin import num_masked_units
from fastmim.train import distributed as D
from fastmim.train.attn_choice import choose_attention, describe
from fastmim.train.memory import check_step_fits
from fastmim.train.metrics import StepStats
from fastmim.train.optim import build_optimizer
from fastmim.train.parallel import apply_compile, compile_wanted

SCALE_NAMES = ["s=4", "s=2", "s=1", "s=1/2"]


@dataclass
class Position:
    """Where the run is: optimizer steps done, and the next batch to read (epoch, batch index)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class Run:
    """A run's parts (:func:`build_run`) and its position; ``forward`` is what runs the forward: the model, or its
    DDP / DeepSpeed wrapper."""

    cfg: Config
    device: torch.device
    dist: D.Dist
    model: nn.Module
    forward: Any
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: MIMLoader
    total_steps: int
    warmup_steps: int
    peak_lr: float
    amp_dtype: torch.dtype | None
    stats: StepStats  # skipped steps and the loss since the last save, on the device (fastmim.train.metrics)
    attn: str = ""  # the attention backend: model.attn, or "auto: " and what it measured
    compiled_blocks: int = 0  # transformer blocks compiled per train.compile (0: eager)
    compile_mode: str | None = None  # torch.compile's mode (None: its default)
    compile_s: float | None = None  # seconds of the first (compiling) step, when compiled
    pos: Position = field(default_factory=Position)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise FastmimError("train.device = 'cuda' but no CUDA device is visible; use --train.device=cpu.")
        return torch.device("cuda")
    return torch.device("cpu")


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 / fp16, None for fp32; "auto" = bf16 on CUDA, fp32 on CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def scale_names(model: nn.Module) -> list[str]:
    """Names of the model's per-scale losses, in ``out.losses`` order (the method's s = 4, 2, 1, 1/2 for LocalMIM)."""
    cells = model.target.cell_sizes
    return SCALE_NAMES if len(cells) == 4 else [f"{c}px" for c in cells]


def build_model(cfg: Config, device: torch.device) -> nn.Module:
    """The model of ``cfg``, initialised from train.seed; refused when model.mask_ratio masks nothing at its size."""
    torch.manual_seed(cfg.train.seed)
    model = model_from_config(cfg.model)
    masked = masked_per_image(model)
    if masked < 1:  # every loss would be 0 / 0 (a masked mean over no cell): NaN at every step
        unit = "32 px mask units" if hasattr(model, "mask_rule") else "patches"
        raise FastmimError(
            f"model.mask_ratio = {cfg.model.mask_ratio:g} masks none of the {model.num_patches} {unit} of a "
            f"{cfg.model.resolved_img_size} px image, and the loss is computed on masked ones only; raise it, e.g. "
            "0.75."
        )
    return model.to(device)


def masked_per_image(model: nn.Module) -> int:
    """Patches (Swin: 32 px units, one mask per batch) that ``model`` masks per image at its mask ratio."""
    if hasattr(model, "mask_rule"):
        return num_masked_units(model.num_patches, model.mask_ratio, model.mask_rule)
    return model.num_patches - num_kept(model.num_patches, model.mask_ratio)


def build_adamw(cfg: Config, model: nn.Module, device: torch.device, world: int) -> torch.optim.AdamW:
    """AdamW at the peak lr of a run on ``world`` processes. Fused on CUDA (one kernel per update; its found_inf
    path skips a non-finite step without a host sync) unless DeepSpeed offloads the optimizer to the CPU."""
    t = cfg.train
    fused = device.type == "cuda" and t.offload == "none"
    return build_optimizer(model, t.peak_lr(world), t.weight_decay, (t.beta1, t.beta2), fused=fused)


def build_run(
    cfg: Config, dist: D.Dist | None = None, device: torch.device | None = None, compile_mode: str | None = None
) -> Run:
    """The parts of the run ``cfg`` describes, at step 0 (see the module docstring). ``dist`` and ``device``: this
    process's place and device (default: join the launcher's process group per train.dist, the device per
    train.device); ``compile_mode``: torch.compile's mode for the compiled blocks (`bench step`)."""
    if dist is None or device is None:
        dist, device = D.init_distributed(cfg.train, resolve_device(cfg.train.device))
    t, dtype = cfg.train, amp_dtype(cfg.train.precision, device)
    check_step_fits(cfg, device)
    model = build_model(cfg, device)
    attn = _choose_attention(cfg, model, device, dtype, dist.main)
    compiled = apply_compile(model, mode=compile_mode) if compile_wanted(t.compile, device) else 0
    loader = build_loader(cfg.data, cfg.model.resolved_img_size, t.batch_size, t.seed, dist.rank, dist.world)
    total, warmup = t.schedule(loader.steps_per_epoch)
    optimizer = build_adamw(cfg, model, device, dist.world)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    forward, optimizer = D.apply_distributed(dist, model, optimizer, t)
    return Run(
        cfg=cfg,
        device=device,
        dist=dist,
        model=model,
        forward=forward,
        optimizer=optimizer,
        scaler=scaler,
        loader=loader,
        total_steps=total,
        warmup_steps=warmup,
        peak_lr=t.peak_lr(dist.world),
        amp_dtype=dtype,
        stats=StepStats(scale_names(model), device),
        attn=attn,
        compiled_blocks=compiled,
        compile_mode=compile_mode,
    )


def _choose_attention(cfg: Config, model: nn.Module, device: torch.device, dtype, report: bool) -> str:
    """model.attn = "auto": measure the backends at the model's attention shapes (CUDA) and keep the fastest;
    returns the backend, or "auto: " and what was measured."""
    if cfg.model.attn != "auto":
        return cfg.model.attn
    rows = choose_attention(model, cfg.train.batch_size, cfg.model.resolved_img_size, dtype, device)
    if report and device.type == "cuda":
        print(f"fastmim: model.attn=auto measured {describe(rows)}", flush=True)
    return f"auto: {describe(rows)}"
