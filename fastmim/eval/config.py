"""Typed configuration of the evaluation commands (``fastmim finetune`` and ``fastmim linprobe``).

Its own dataclass tree (sections ``model``, ``data``, ``finetune``, ``linprobe``), read with the same TOML and
``--section.key=value`` machinery as the pre-training config (:mod:`fastmim.config`): unknown keys and wrong types
are errors with a close-match suggestion; precedence CLI > TOML recipe > default. ``fastmim finetune`` uses the
``model``, ``data`` and ``finetune`` sections, ``fastmim linprobe`` the ``model``, ``data`` and ``linprobe`` ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fastmim.config import (
    AdamWConfig,
    Device,
    OptimizerConfig,
    Precision,
    check_choices,
    dump_toml,
    parse_toml,
    read_recipe,
    reference_markdown,
    resolve_config,
    scaled_lr,
)
from fastmim.errors import FastmimError

# `fastmim finetune` / `fastmim linprobe` with no --config use this built-in recipe (configs/eval_tiny_cpu.toml).
DEFAULT_EVAL_RECIPE = "eval_tiny_cpu"


@dataclass
class EvalModelConfig:
    pretrained: str = ""
    """fastmim checkpoint or weights file (pre-trained or fine-tuned) to start from; empty = random init."""
    name: str = ""
    """Model to initialise randomly when model.pretrained is empty (e.g. localmim_vit_base_patch16); else unused."""
    img_size: int = 0
    """Evaluation resolution in pixels; 0 = the checkpoint's (224 for a random init); positions are resampled."""
    drop_path: float = 0.1
    """Stochastic-depth rate of the fine-tuned ViT (method 6: 0.1 for ViT-B, 0.2 for ViT-L)."""


@dataclass
class EvalDataConfig:
    source: Literal["folder", "digits"] = "folder"
    """"folder" (ImageFolder trees data.path/train and data.path/val) or "digits" (scikit-learn's 8x8 digits)."""
    path: str = ""
    """Root holding train/ and val/ class folders (the ImageNet layout), for source "folder"."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the main process)."""


@dataclass
class FinetuneConfig(AdamWConfig):
    batch_size: int = 128
    """Images per optimizer micro-step (even when mixup/cutmix are on)."""
    accum_steps: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size * accum_steps)."""
    epochs: int = 100
    """Training length in epochs; also the cosine schedule's length (unless finetune.steps is set)."""
    steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs); the schedule then spans these steps."""
    # The optimizer keys are AdamWConfig's (fastmim.config: declared, documented and checked there); method 6's
    # defaults for these three.
    warmup_epochs: float = 5.0
    blr: float = 5e-4
    beta2: float = 0.999
    layer_decay: float = 0.75
    """Layer-wise lr decay: a parameter with layer id i gets lr * layer_decay ** (depth + 1 - i) (method 6)."""
    smoothing: float = 0.1
    """Label smoothing."""
    mixup: float = 0.8
    """Mixup alpha (0 = off)."""
    cutmix: float = 1.0
    """CutMix alpha (0 = off)."""
    mixup_prob: float = 1.0
    """Probability of applying mixup or cutmix to a batch."""
    mixup_switch_prob: float = 0.5
    """Probability of cutmix instead of mixup when both are on."""
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    """timm auto-augment policy (RandAugment by default); empty = none."""
    reprob: float = 0.25
    """Random-erasing probability."""
    crop_pct: float = 0.875
    """Evaluation crop: resize to img_size / crop_pct (256 for 224), then centre-crop img_size."""
    precision: Precision = "auto"
    """"bf16", "fp16", "fp32", or "auto" (bf16 on CUDA, fp32 on CPU)."""
    device: Device = "auto"
    """"auto" (CUDA when present, else CPU), "cpu" or "cuda"."""
    seed: int = 0
    """Seed for the head init, data order, augmentation and mixup."""
    out_dir: str = "runs/finetune"
    """Run directory: config.toml, metrics.jsonl, checkpoint-best.pt, checkpoint-last.pt and curves.png."""
    log_every: int = 20
    """Print the training loss every this many optimizer steps (in non-interactive logs)."""
    resume: Literal["", "auto"] = ""
    """"auto" continues from out_dir/checkpoint-last.pt at the next epoch; empty = a fresh run."""

    def peak_lr(self) -> float:
        """The peak learning rate (finetune.lr, else the scaling rule on the effective batch)."""
        return scaled_lr(self.lr, self.blr, self.batch_size * self.accum_steps)


@dataclass
class LinprobeConfig(OptimizerConfig):
    pool: Literal["avg", "cls"] = "avg"
    """Features: "avg" (mean of the last block's patch tokens) or "cls" (its cls token)."""
    optimizer: Literal["sgd", "lars"] = "sgd"
    """"sgd" (momentum) or "lars" (MAE's linear-probe optimizer)."""
    batch_size: int = 256
    """Feature vectors per optimizer step."""
    epochs: int = 90
    """Training epochs over the cached features."""
    # The schedule keys are OptimizerConfig's (fastmim.config: declared, documented and checked there); MAE's
    # linear-probe defaults for these four.
    warmup_epochs: float = 10.0
    blr: float = 0.1
    min_lr: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.9
    """SGD / LARS momentum."""
    extract_batch_size: int = 128
    """Images per forward pass while extracting features."""
    device: Device = "auto"
    """"auto" (CUDA when present, else CPU), "cpu" or "cuda"."""
    seed: int = 0
    """Seed for the head init and the feature order."""
    out_dir: str = "runs/linprobe"
    """Run directory: config.toml, metrics.jsonl, result.json and curves.png."""

    def peak_lr(self, batch: int) -> float:
        """The peak learning rate for probe batches of ``batch`` feature vectors (linprobe.lr, else the rule)."""
        return scaled_lr(self.lr, self.blr, batch)


@dataclass
class EvalConfig:
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    linprobe: LinprobeConfig = field(default_factory=LinprobeConfig)


def load_eval_config(recipe: str | None = None, overrides: list[str] | None = None) -> EvalConfig:
    """Defaults, then the recipe (default: the tiny CPU evaluation recipe), then ``--section.key=value`` overrides."""
    path, mapping = read_recipe(recipe or DEFAULT_EVAL_RECIPE)
    if "train" in mapping:
        raise FastmimError(f"{path} is a pre-training recipe; give an evaluation recipe such as {DEFAULT_EVAL_RECIPE}.")
    return resolve_config(EvalConfig(), mapping, str(path), overrides, validate)


def eval_config_from_toml(text: str, where: str = "checkpoint") -> EvalConfig:
    """Rebuild an EvalConfig from the TOML text saved with a run or checkpoint."""
    mapping = parse_toml(text, f"{where} holds no readable config", "give one written by fastmim")
    return resolve_config(EvalConfig(), mapping, where, None, validate)


def validate(cfg: EvalConfig) -> None:
    """Range and combination checks; every message names the key and a valid value."""
    check_choices(cfg)
    m, f, p = cfg.model, cfg.finetune, cfg.linprobe
    mixing = f.mixup > 0 or f.cutmix > 0
    checks = [
        (bool(m.pretrained) or bool(m.name), "set model.pretrained=CHECKPOINT, or model.name=NAME for a random init"),
        (m.img_size >= 0, "model.img_size must be >= 0 (0 = the checkpoint's)"),
        (0.0 <= m.drop_path < 1.0, "model.drop_path must be in [0, 1), e.g. 0.1"),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (f.batch_size > 0 and f.accum_steps > 0, "finetune.batch_size and finetune.accum_steps must be positive"),
        (f.batch_size % 2 == 0 or not mixing, "finetune.batch_size must be even with mixup/cutmix, e.g. 64"),
        (f.epochs > 0 and f.steps >= 0, "finetune.epochs must be positive and finetune.steps >= 0"),
        *f.optimizer_checks("finetune"),
        (0.0 < f.layer_decay <= 1.0, "finetune.layer_decay must be in (0, 1], e.g. 0.75 (1 = no decay)"),
        (0.0 <= f.smoothing < 1.0, "finetune.smoothing must be in [0, 1), e.g. 0.1"),
        (f.mixup >= 0 and f.cutmix >= 0, "finetune.mixup and finetune.cutmix must be >= 0 (0 = off)"),
        (0 <= f.mixup_prob <= 1 and 0 <= f.mixup_switch_prob <= 1, "finetune.mixup_prob/switch_prob must be in [0, 1]"),
        (0.0 <= f.reprob <= 1.0, "finetune.reprob must be in [0, 1], e.g. 0.25"),
        (0.0 < f.crop_pct <= 1.0, "finetune.crop_pct must be in (0, 1], e.g. 0.875"),
        (f.log_every > 0, "finetune.log_every must be positive"),
        (bool(f.out_dir) and bool(p.out_dir), "finetune.out_dir and linprobe.out_dir must not be empty"),
        (p.batch_size > 0 and p.extract_batch_size > 0, "linprobe.batch_size and extract_batch_size must be positive"),
        (p.epochs > 0, "linprobe.epochs must be positive"),
        *p.optimizer_checks("linprobe"),
        (0.0 <= p.momentum < 1.0, "linprobe.momentum must be in [0, 1), e.g. 0.9"),
    ]
    for ok, message in checks:
        if not ok:
            raise FastmimError(message + ".")
    _check_auto_augment(f.auto_augment)


def _check_auto_augment(policy: str) -> None:
    """finetune.auto_augment names a policy timm can build: the run's own training transform is built once (at a
    small size), so an unknown policy or section is refused now, in one line, instead of by timm's assertion."""
    if not policy:
        return
    from fastmim.eval.data import train_transform  # imports timm: only for a policy to check

    try:
        train_transform(32, policy, 0.0)
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as e:
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise FastmimError(
            f"finetune.auto_augment = {policy!r} is not a timm auto-augment policy ({reason}); give e.g. "
            "'rand-m9-mstd0.5-inc1' (RandAugment), 'augmix-m5', 'original', or '' for none."
        ) from None


def eval_reference_markdown() -> str:
    """The evaluation keys as a Markdown table (README and `fastmim finetune --keys`)."""
    return reference_markdown(EvalConfig)


__all__ = [
    "EvalConfig",
    "dump_toml",
    "eval_config_from_toml",
    "eval_reference_markdown",
    "load_eval_config",
]
