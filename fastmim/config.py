"""Typed run configuration: dataclasses, TOML recipes, ``--section.key=value`` overrides, validation, dump.

Precedence is CLI override > TOML recipe > dataclass default. Every field's docstring (the string literal placed
right after it) is its documentation: ``fastmim config --help-keys`` prints them and the README reference table is
generated from the same text. Unknown sections/keys and wrong types are :class:`FastmimError` with a close-match
suggestion, so a typo never silently trains with a default.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.resources
import inspect
import itertools
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from fastmim.errors import FastmimError

# `fastmim pretrain` with no --config trains this built-in recipe (configs/tiny_cpu.toml).
DEFAULT_RECIPE = "tiny_cpu"
DEFAULT_IMG_SIZE = 224  # model.img_size = 0: the published recipes' resolution
# Where a data stage runs (data.augment, data.decode): in the data workers ("cpu") or on the training device ("gpu").
Placement = Literal["cpu", "gpu"]
# The choices of every command's precision and device keys (train.*, finetune.*, linprobe.device).
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Device = Literal["auto", "cpu", "cuda"]


def scaled_lr(lr: float, blr: float, batch: int) -> float:
    """The peak learning rate: ``lr`` when set (> 0), else the linear scaling rule blr * batch / 256 (MAE, LocalMIM;
    method 5), ``batch`` being the images of one optimizer step over all processes."""
    return lr if lr > 0 else blr * batch / 256


def _recipe_dir() -> Path:
    """configs/ is installed as the package fastmim.recipes (see pyproject.toml), also in editable installs."""
    return Path(str(importlib.resources.files("fastmim.recipes")))


def list_recipes() -> list[str]:
    """Names of the built-in TOML recipes (configs/*.toml)."""
    return sorted(p.stem for p in _recipe_dir().glob("*.toml"))


@dataclass
class ModelConfig:
    name: str = "localmim_vit_base_patch16"
    """Registered model name (`fastmim list-models`), e.g. localmim_vit_base_patch16 or mae_vit_base_patch16."""
    impl: Literal["reference", "fast"] = "reference"
    """"reference" (plain PyTorch, the specification) or "fast" (Triton kernels where available)."""
    img_size: int = 0
    """Input resolution in pixels (0 = 224); every target cell size (patch / scale) must divide it."""
    mask_ratio: float = 0.75
    """Fraction of patches removed per image, in [0, 1)."""
    target: Literal["", "hog", "pixel"] = ""
    """"hog" or "pixel"; empty = the model's default (HOG for LocalMIM, normalised pixels for MAE)."""
    nbins: int = 0
    """HOG orientation bins; 0 = the model's default (9 for ViT-S/B, 18 for ViT-L and Swin)."""
    hog_bias: Literal["default", "on", "off"] = "default"
    """"default", "on" or "off": the frozen random Sobel bias per scale (method 3.3); default: on for ViT-L, Swin."""
    attn: Literal["auto", "sdpa", "flash", "cudnn", "efficient", "math", "xformers"] = "auto"
    """Attention backend: "auto" (on CUDA, the fastest backend at each attention shape, measured before training;
    "sdpa" on CPU), "sdpa" (torch picks per call), "flash", "cudnn", "efficient", "math" (SDPA forced to that
    kernel) or "xformers"; CUDA-only choices fall back to "sdpa" on CPU with a warning."""
    decoder_dim: int = 0
    """Decoder width; 0 = the model's default (256 for LocalMIM ViT, 512 for MAE, 128 for Swin, whose first is half)."""
    mask_rule: Literal["exact", "released"] = "exact"
    """Swin (one mask of 32 px units per batch): "exact" masks round(ratio * units), "released" int(ratio * units) + 1
    (the authors' code); they agree at 0.75 (37 of 49 units) but not at e.g. 0.6 (29 vs 30) or 0.8 (39 vs 40).
    "released" also selects the released token coordinates (model.swin_coords)."""
    swin_coords: Literal["default", "true", "released"] = "default"
    """Swin token coordinates, which decide windows and relative positions after a patch merge: "true" (each token at
    its own position), "released" (the authors' pre-training code, which produced the published results: a merged
    token gets the raster position of its index in unit-major order) or "default" (released when model.mask_rule is
    "released", else true)."""

    @property
    def resolved_img_size(self) -> int:
        """model.img_size with 0 resolved: the resolution the model, the loader and the benchmarks use."""
        return self.img_size or DEFAULT_IMG_SIZE


@dataclass
class DataConfig:
    source: Literal["demo", "folder", "synthetic", "ffcv", "fashion_mnist"] = "demo"
    """"demo" (built-in images, no download), "folder" (an ImageFolder tree at data.path), "ffcv" (a .beton file
    at data.path, from `fastmim data convert`; needs the ffcv extra), "fashion_mnist" (the train split of the IDX
    files at data.path, default /usr/share/datasets/fashion-mnist from `apt-get install dataset-fashion-mnist`) or
    "synthetic"."""
    path: str = ""
    """Root directory of the images for source "folder", the .beton file for source "ffcv", or the directory of the
    IDX files for source "fashion_mnist" (empty = the Debian package's)."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the main process)."""
    num_images: int = 512
    """Number of images in the demo and synthetic datasets."""
    holdout: int = 0
    """Source "fashion_mnist": leave the last this many train images out of pre-training (a validation part for
    choosing hyper-parameters without the test split)."""
    min_scale: float = 0.2
    """Lower bound of RandomResizedCrop's area scale (method 5: 0.2)."""
    augment: Placement = "cpu"
    """Where crops are resized, flipped and normalised: "cpu" (PIL, in the data workers) or "gpu" (workers only
    decode and crop; one fused op on the training device; same crops, same pixels up to Pillow's pass order)."""
    decode: Placement = "cpu"
    """Where JPEGs are decoded: "cpu" (libjpeg-turbo in the data workers: the stored pixels exactly) or "gpu"
    (data.source = "ffcv" with JPEG storage and data.augment = "gpu": workers ship the JPEG bytes, the training
    device decodes them with nvJPEG through torchvision; pixels may differ slightly: `fastmim bench data` measures)."""
    stall_warn_s: float = 60.0
    """Warn when a data worker has delivered nothing for this many seconds (a read stuck on a hung network file
    system, a stopped process), naming it and its pid; again at each doubling of the wait (data.num_workers > 0)."""
    stall_limit_s: float = 1800.0
    """End the run when a data worker has delivered nothing for this many seconds: the last completed step is saved
    (one process) and the resume command printed; 0 = wait without limit. A stop signal during the wait saves and
    stops at once."""


@dataclass
class OptimizerConfig:
    """The optimizer keys every training command shares, declared, documented and checked here once: pre-training's
    [train], fine-tuning's [finetune] and the linear probe's [linprobe] sections inherit them (a section may give a
    key another default, never another meaning). The learning rate warms up linearly from 0, then follows a
    half-cycle cosine down to min_lr (fastmim.train.optim.lr_at)."""

    warmup_epochs: float = 0.0
    """Linear learning-rate warm-up length in epochs (fractions allowed)."""
    blr: float = 2e-4
    """Base learning rate; the peak lr is blr * effective_batch / 256 (method 5), the batch of one optimizer step."""
    lr: float = 0.0
    """Absolute peak learning rate; 0 = derive it from blr."""
    min_lr: float = 1e-6
    """Floor of the half-cycle cosine schedule."""
    weight_decay: float = 0.05
    """Weight decay of weight matrices, never of 1-D tensors or biases; fine-tuning also spares pos_embed, cls_token."""

    def optimizer_checks(self, section: str) -> list[tuple[bool, str]]:
        """``(ok, message)`` range checks of these keys, named as keys of config section ``section``."""
        s = section
        return [
            (self.warmup_epochs >= 0, f"{s}.warmup_epochs must be >= 0 (a warm-up length in epochs)"),
            (self.blr > 0 or self.lr > 0, f"{s}.blr (or {s}.lr) must be positive"),
            (self.lr >= 0 and self.min_lr >= 0, f"{s}.lr and {s}.min_lr must be >= 0"),
            (self.weight_decay >= 0, f"{s}.weight_decay must be >= 0"),
        ]


@dataclass
class AdamWConfig(OptimizerConfig):
    """The optimizer keys of the commands that train with AdamW: pre-training and fine-tuning (the linear probe uses
    SGD or LARS)."""

    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    clip_grad: float = 0.0
    """Clip the global gradient norm to this value; 0 = no clipping (the published recipes)."""

    def optimizer_checks(self, section: str) -> list[tuple[bool, str]]:
        s = section
        return [
            *super().optimizer_checks(section),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"{s}.beta1 and {s}.beta2 must be in [0, 1)"),
            (self.clip_grad >= 0, f"{s}.clip_grad must be >= 0 (0 = off)"),
        ]


@dataclass
class TrainConfig(AdamWConfig):
    batch_size: int = 64
    """Images per optimizer micro-step on each process."""
    accum_steps: int = 1
    """Micro-batches accumulated per optimizer step (effective batch = batch_size * accum_steps * world size)."""
    steps: int = 0
    """Stop after this many optimizer steps (overrides epochs when > 0)."""
    epochs: int = 1
    """Training length in epochs (used when train.steps is 0); also the cosine schedule's length."""
    warmup_steps: int = -1
    """Warm-up length in optimizer steps; -1 = derive it from warmup_epochs."""
    precision: Precision = "auto"
    """"bf16" (autocast), "fp16" (autocast + GradScaler), "fp32", or "auto" (bf16 on CUDA, fp32 on CPU)."""
    device: Device = "auto"
    """"auto" (CUDA when present, else CPU), "cpu" or "cuda"."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile each transformer block on its own (regional compilation): "auto" (on for CUDA, off on CPU),
    "on" or "off". The first step then includes the compile time, which the run reports."""
    seed: int = 0
    """Seed for initialisation, data order, augmentation and masks."""
    out_dir: str = "runs/tiny_cpu"
    """Run directory: config.toml, metrics.jsonl, checkpoints and the loss plot go here."""
    log_every: int = 10
    """Log metrics (and synchronise with the device) every this many optimizer steps."""
    save_every: int = 0
    """Save a checkpoint every this many optimizer steps (0 = only at the end)."""
    keep_last: int = 3
    """Checkpoints kept in out_dir: the newest keep_last ones plus the one with the lowest training loss; 0 = all."""
    resume: str = ""
    """A checkpoint path to continue from, "auto" (newest intact checkpoint in out_dir, if any) or empty."""
    max_nonfinite: int = 20
    """Save and stop after this many consecutive steps with a non-finite loss or gradient (each one is skipped)."""
    dist: Literal["auto", "none", "ddp", "deepspeed"] = "auto"
    """Several processes (launched by torchrun, the deepspeed launcher or srun): "ddp", "deepspeed" (ZeRO, see
    zero_stage), "none" (one process) or "auto" (ddp when WORLD_SIZE > 1, else none)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 1 (optimizer state sharded), 2 (+ gradients) or 3 (+ parameters); only with
    train.dist = "deepspeed", which needs one of them."""
    offload: Literal["none", "optimizer", "all"] = "none"
    """DeepSpeed ZeRO CPU offload: "none", "optimizer" (optimizer state and step on the CPU) or "all" (also the
    parameters; ZeRO-3 only)."""
    dist_timeout: int = 600
    """Seconds any collective waits for the other processes before the run fails (a dead or stuck rank)."""

    def peak_lr(self, world: int = 1) -> float:
        """The peak learning rate of a run on ``world`` processes (train.batch_size is per process)."""
        return scaled_lr(self.lr, self.blr, self.batch_size * self.accum_steps * world)

    def schedule(self, batches_per_epoch: int) -> tuple[int, int]:
        """(total, warm-up) optimizer steps for a loader of ``batches_per_epoch`` micro-batches per epoch:
        train.steps, else train.epochs of optimizer steps; train.warmup_steps, else train.warmup_epochs of them."""
        per_epoch = max(1, batches_per_epoch // self.accum_steps)
        total = self.steps if self.steps > 0 else self.epochs * per_epoch
        warmup = self.warmup_steps if self.warmup_steps >= 0 else round(self.warmup_epochs * per_epoch)
        return total, warmup


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def key_types(cls: type) -> dict[str, tuple[type, tuple | None]]:
    """``{key: (type, choices)}`` of a config section's dataclass: a key annotated ``Literal["a", "b"]`` has the
    type of its values and those choices; any other key its annotation and None."""
    types = {}
    for key, hint in get_type_hints(cls).items():
        choices = get_args(hint) if get_origin(hint) is Literal else None
        types[key] = (type(choices[0]), choices) if choices else (hint, None)
    return types


def choices(cls: type, key: str) -> tuple:
    """The values config key ``key`` of section dataclass ``cls`` accepts (its ``Literal`` annotation)."""
    found = key_types(cls)[key][1]
    if found is None:
        raise KeyError(f"{cls.__name__}.{key} declares no choices")
    return found


def _section_types(cfg: Any, name: str) -> dict[str, type]:
    return {key: typ for key, (typ, _) in key_types(type(getattr(cfg, name))).items()}


def _sections(cfg: Any) -> list[str]:
    """Section names of a config tree (Config here; fastmim.eval has its own tree and reuses these helpers)."""
    return [f.name for f in dataclasses.fields(cfg)]


def field_docs(cls: type) -> dict[str, str]:
    """Map each field of a config dataclass, in field order, to the docstring written under it in the class that
    declares it: ``cls`` or a base such as :class:`OptimizerConfig` (a section that only changes a shared key's
    default restates no docstring)."""
    docs = {}
    for klass in reversed(cls.__mro__[:-1]):  # bases first: object has no source
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for prev, node in itertools.pairwise(body):
            if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                docs[prev.target.id] = node.value.value
    return {f.name: docs[f.name] for f in dataclasses.fields(cls)}


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(options))})"


def _coerce(section: str, key: str, value: Any, typ: type, where: str, from_cli: bool) -> Any:
    """Check/convert one value to the field's type; TOML values must be typed, CLI values arrive as strings."""
    if from_cli and typ is not str:
        text = value.strip()
        try:
            if typ is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return text.lower() in ("true", "1")
            return typ(text)
        except ValueError:
            raise FastmimError(
                f"{where}: {section}.{key} must be {typ.__name__}, got '{value}'; write e.g. "
                f"--{section}.{key}={_example(typ)}"
            ) from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise FastmimError(
            f"{where}: {section}.{key} must be {typ.__name__}, got {type(value).__name__} {value!r}; "
            f"write e.g. {section}.{key} = {_example(typ)}"
        )
    return value


def _example(typ: type) -> str:
    return {int: "8", float: "0.5", bool: "true", str: '"text"'}[typ]


def apply_mapping(cfg: Config, mapping: dict[str, Any], where: str) -> None:
    """Apply a nested {section: {key: value}} mapping (from TOML) to cfg, checking names and types."""
    sections = _sections(cfg)
    for section, values in mapping.items():
        if section not in sections:
            raise FastmimError(f"{where}: unknown config section '{section}'{_suggest(section, sections)}.")
        if not isinstance(values, dict):
            raise FastmimError(f"{where}: '{section}' must be a table like [{section}].")
        for key, value in values.items():
            set_value(cfg, section, key, value, where, from_cli=False)


def set_value(cfg: Config, section: str, key: str, value: Any, where: str, from_cli: bool) -> None:
    types = _section_types(cfg, section)
    if key not in types:
        raise FastmimError(f"{where}: unknown config key '{section}.{key}'{_suggest(key, types)}.")
    setattr(getattr(cfg, section), key, _coerce(section, key, value, types[key], where, from_cli))


def parse_overrides(cfg: Config, args: list[str]) -> None:
    """Apply ``--section.key=value`` arguments (also ``--section.key value``) to cfg."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise FastmimError(f"unexpected argument '{arg}'; config overrides look like --train.steps=100.")
        name, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise FastmimError(f"override --{name} has no value; write --{name}=VALUE.")
            value, i = args[i + 1], i + 1
        section, _, key = name.partition(".")
        sections = _sections(cfg)
        if section not in sections:
            raise FastmimError(f"unknown config section '{section}' in --{name}{_suggest(section, sections)}.")
        set_value(cfg, section, key, value, "command line", from_cli=True)
        i += 1


def resolve_recipe(path_or_name: str) -> Path:
    """A recipe argument is a TOML path, or the name of a built-in recipe (configs/<name>.toml)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    builtin = _recipe_dir() / f"{path_or_name.removesuffix('.toml')}.toml"
    if builtin.is_file():
        return builtin
    hint = _suggest(path.stem, list_recipes())
    raise FastmimError(f"config file '{path_or_name}' not found; give a TOML path or a built-in recipe{hint}.")


def read_recipe(recipe: str) -> tuple[Path, dict[str, Any]]:
    """(path, parsed TOML) of a recipe file or built-in recipe name; a file that is not UTF-8 text (a checkpoint
    given by mistake) or not valid TOML is a user error naming the file."""
    path = resolve_recipe(recipe)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else e.strerror
        raise FastmimError(f"{path} cannot be read as a TOML recipe ({reason}); give a TOML file.") from None
    return path, parse_toml(text, f"{path}: not valid TOML", "fix the file's syntax")


def parse_toml(text: str, what: str, fix: str) -> dict[str, Any]:
    """Parsed TOML text; bad syntax, and nesting too deep for the parser (thousands of levels: a RecursionError),
    raise :class:`FastmimError` as ``"{what} ({reason}); {fix}."``."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        reason = str(e)
    except RecursionError:
        reason = "nested too deeply"
    raise FastmimError(f"{what} ({reason}); {fix}.")


def check_choices(cfg: Any) -> None:
    """Every key of a config tree whose annotation lists its choices holds one of them (shared with
    fastmim.eval.config)."""
    for section in _sections(cfg):
        values = getattr(cfg, section)
        for key, (_, options) in key_types(type(values)).items():
            value = getattr(values, key)
            if options is not None and value not in options:
                raise FastmimError(f"{section}.{key} = '{value}' is not one of {', '.join(repr(c) for c in options)}.")


def resolve_config(cfg: Any, mapping: dict[str, Any], where: str, overrides: list[str] | None, check) -> Any:
    """``cfg`` (a config tree of defaults) updated from ``mapping`` (parsed TOML, named ``where`` in errors), then
    from ``--section.key=value`` overrides, then checked by ``check``; shared with fastmim.eval.config."""
    apply_mapping(cfg, mapping, where)
    parse_overrides(cfg, overrides or [])
    check(cfg)
    return cfg


def load_config(recipe: str | None = None, overrides: list[str] | None = None) -> Config:
    """Build the resolved config: defaults, then the recipe (default: the tiny CPU recipe), then overrides."""
    path, mapping = read_recipe(recipe or DEFAULT_RECIPE)
    return resolve_config(Config(), mapping, str(path), overrides, validate)


def config_from_toml(text: str, where: str = "checkpoint") -> Config:
    """Rebuild a Config from the TOML text saved with a run or checkpoint."""
    mapping = parse_toml(text, f"{where} holds no readable config", "give one written by fastmim")
    return resolve_config(Config(), mapping, where, None, validate)


def validate(cfg: Config) -> None:
    """Type, range and combination checks; every message names the key and a valid value."""
    for section in _sections(cfg):  # types again: a Config built in Python never went through _coerce
        values = getattr(cfg, section)
        for key, typ in _section_types(cfg, section).items():
            value = _coerce(section, key, getattr(values, key), typ, "config", from_cli=False)
            if isinstance(value, float) and not math.isfinite(value):
                raise FastmimError(f"{section}.{key} = {value} is not a finite number; give e.g. {_example(typ)}.")
            if isinstance(value, str) and not value.isprintable():
                raise FastmimError(f"{section}.{key} = {value!r} has control or undecodable characters; use text.")
            setattr(values, key, value)
    check_choices(cfg)
    m, d, t = cfg.model, cfg.data, cfg.train
    peak_lr = t.peak_lr()
    decode_fits = d.decode == "cpu" or (d.augment == "gpu" and d.source == "ffcv")
    checks = [
        (0.0 <= m.mask_ratio < 1.0, "model.mask_ratio must be in [0, 1), e.g. 0.75"),
        (m.img_size >= 0, "model.img_size must be positive (or 0 = 224)"),
        (m.nbins >= 0, "model.nbins must be >= 0 (0 = the model's default)"),
        (m.decoder_dim >= 0, "model.decoder_dim must be >= 0 (0 = the model's default)"),
        (d.num_workers >= 0, "data.num_workers must be >= 0"),
        (d.num_images > 0, "data.num_images must be positive"),
        (d.holdout >= 0, "data.holdout must be >= 0 (train images kept out of pre-training)"),
        (d.holdout == 0 or d.source == "fashion_mnist", "data.holdout applies to data.source = 'fashion_mnist' only"),
        (0.0 < d.min_scale <= 1.0, "data.min_scale must be in (0, 1], e.g. 0.2"),
        (d.stall_warn_s > 0, "data.stall_warn_s must be positive (seconds), e.g. 60"),
        (
            d.stall_limit_s == 0 or d.stall_limit_s >= d.stall_warn_s,
            "data.stall_limit_s must be 0 (no limit) or at least data.stall_warn_s, e.g. 1800",
        ),
        (decode_fits, "data.decode = 'gpu' needs data.augment = 'gpu' and data.source = 'ffcv' (a .beton of JPEGs)"),
        (t.batch_size > 0, "train.batch_size must be positive"),
        (t.accum_steps > 0, "train.accum_steps must be positive"),
        (t.steps >= 0, "train.steps must be >= 0 (0 = use train.epochs)"),
        (t.epochs > 0 or t.steps > 0, "train.epochs must be positive when train.steps is 0"),
        (
            t.warmup_steps >= -1,
            "train.warmup_steps must be >= 0 (a warm-up length in steps), or -1 (derive it from train.warmup_epochs)",
        ),
        *t.optimizer_checks("train"),
        (t.min_lr <= peak_lr, f"train.min_lr must not exceed the peak learning rate ({peak_lr:.3g})"),
        (t.log_every > 0, "train.log_every must be positive"),
        (t.save_every >= 0, "train.save_every must be >= 0 (0 = save at the end only)"),
        (t.keep_last >= 0, "train.keep_last must be >= 0 (0 = keep every checkpoint)"),
        (t.max_nonfinite > 0, "train.max_nonfinite must be positive, e.g. 20"),
        (0 <= t.seed < 2**63, "train.seed must be in [0, 2**63)"),
        (0 <= t.zero_stage <= 3, "train.zero_stage must be 0, 1, 2 or 3"),
        (t.zero_stage == 0 or t.dist == "deepspeed", "train.zero_stage needs train.dist = 'deepspeed'"),
        (t.zero_stage > 0 or t.dist != "deepspeed", "train.dist = 'deepspeed' needs train.zero_stage 1, 2 or 3"),
        (t.offload == "none" or t.dist == "deepspeed", "train.offload needs train.dist = 'deepspeed'"),
        (t.offload != "all" or t.zero_stage == 3, "train.offload = 'all' (parameters too) needs train.zero_stage=3"),
        (t.dist != "deepspeed" or t.precision != "fp16", "train.dist = 'deepspeed' needs train.precision=bf16 or fp32"),
        (t.dist_timeout > 0, "train.dist_timeout must be positive (seconds), e.g. 600"),
        (bool(t.out_dir), "train.out_dir must not be empty"),
    ]
    for ok, message in checks:
        if not ok:
            raise FastmimError(message + ".")


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def dump_toml(cfg: Config) -> str:
    """The resolved config as TOML text (round-trips through load/config_from_toml)."""
    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def reference_markdown(root: type = Config) -> str:
    """The configuration reference table of a config tree (README and `fastmim config --keys`)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    defaults = to_dict(root())
    for section in _sections(root):
        cls = type(getattr(root(), section))
        docs, types = field_docs(cls), key_types(cls)
        for key, doc in docs.items():
            typ, options = types[key]
            kind = typ.__name__ if options is None else "one of " + ", ".join(f"`{_toml_value(c)}`" for c in options)
            rows.append(f"| `{section}.{key}` | {kind} | `{_toml_value(defaults[section][key])}` | {doc} |")
    return "\n".join(rows)
