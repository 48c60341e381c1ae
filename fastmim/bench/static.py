"""Static kernel report: every Triton kernel fastmim launches, compiled ahead of time for sm_80 and sm_90 on a
machine without a GPU (``fastmim bench kernels --static``).

What is compiled. For each shipped pre-training recipe (plus ViT-S on the ViT-B recipe), the launches its training
step makes with ``model.impl = "fast"``: the recipe's model runs one forward and backward on fake tensors of the
recipe's batch and image size, under the recipe's GPU autocast, inside ``fastmim.kernels._common.record_launches``,
which records every kernel launch (kernel, grid, arguments) instead of running it. So the model's own code decides
which kernels run and the launchers' own code their block sizes and arguments, as on a GPU: no list of launches
is kept here, and a new kernel in the step is in the report without an edit. Also compiled: the launches of
``data.augment = "gpu"`` (the loader's crop-resize of ImageNet-like images: stored images up to 500 px, crops up
to 410 x 500, for both ``data.decode`` layouts). An autotuned kernel contributes every config its autotuner keeps
after pruning. Identical specialisations (same kernel, argument types, constexprs, divisibility attributes and
config) are compiled once and list every recipe that reaches them.

How. Triton's own binder (``create_function_from_signature`` + ``JITFunction._pack_args``) turns the recorded
arguments (tensors as meta tensors of their layout) into the signature, constexprs and attributes of that launch,
and ``triton.compile`` builds it for ``GPUTarget("cuda", arch, 32)`` down to a cubin with the ptxas shipped inside
the triton wheel. Triton reads registers and spills from the CUDA driver only, so they come from ``cuobjdump
--dump-resource-usage`` on the cubin (also shipped with triton): REG = registers per thread; STACK = the stack
frame per thread, which in these kernels (no local arrays, no calls) holds only spilled registers, reported as
spill bytes. Shared memory per block = the cubin's static shared memory + the dynamic amount Triton launches with
(its scratch for reductions and layout conversions).

Occupancy estimate (the CUDA occupancy rules, identical for sm_80 and sm_90 except shared memory): 65,536 registers
per SM allocated per warp in units of 256 (a warp of r registers per thread takes ceil(32 r / 256) * 256), warps
granted in groups of 4; at most 64 resident warps and 32 resident blocks per SM; shared memory per SM 164 KB (sm_80)
and 228 KB (sm_90), of which every block also takes a 1 KB system reserve; a block asking for more than 163 KB
(sm_80) / 227 KB (sm_90) cannot launch (0 warps). Resident blocks = the smallest of the register, shared-memory,
warp and block limits; resident warps = blocks x num_warps.

Exit status 1 when a config spills, sits at the 255-register ceiling or cannot launch (each is printed).

Needs triton with its NVIDIA backend (the PyPI wheel), no GPU and no CUDA driver; TRITON_INTERPRET must be unset
when triton is imported, so ``run_in_subprocess`` starts ``python -m fastmim.bench.static`` with it removed.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fastmim.config import Config
    from fastmim.kernels._common import KernelLaunch

ARCHS = (80, 90)
EXTRA_MODELS = {"vit_small": ("vit_base_1600", ["--model.name=localmim_vit_small_patch16"])}  # no recipe of its own
STATIC_COLUMNS = (
    "kernel",
    "config",
    "arch",
    "registers",
    "spill_bytes",
    "shared_bytes",
    "warps_per_sm",
    "compile_s",
    "recipes",
)


# ----------------------------------------------------------------------------------------------- occupancy


@dataclass(frozen=True)
class SMLimits:
    """Per-SM resources of a compute capability (module docstring)."""

    shared: int  # shared memory per SM a kernel may use, bytes
    shared_per_block: int  # the most one block may ask for
    registers: int = 65536
    register_unit: int = 256  # registers are allocated per warp in units of this many
    warp_granularity: int = 4  # warps are granted in groups of this many
    max_warps: int = 64
    max_blocks: int = 32
    block_reserve: int = 1024  # shared memory the system reserves per block


SM_LIMITS = {
    80: SMLimits(shared=164 * 1024, shared_per_block=163 * 1024),
    90: SMLimits(shared=228 * 1024, shared_per_block=227 * 1024),
}


def resident_warps(arch: int, registers: int, shared_bytes: int, num_warps: int) -> int:
    """Estimated resident warps per SM of a kernel using ``registers`` per thread and ``shared_bytes`` per block."""
    sm = SM_LIMITS[arch]
    if shared_bytes > sm.shared_per_block or registers > 255:
        return 0
    per_warp = math.ceil(32 * max(registers, 1) / sm.register_unit) * sm.register_unit
    warps_by_regs = sm.registers // per_warp // sm.warp_granularity * sm.warp_granularity
    blocks = min(
        warps_by_regs // num_warps,
        sm.shared // (shared_bytes + sm.block_reserve),
        sm.max_warps // num_warps,
        sm.max_blocks,
    )
    return blocks * num_warps


# ----------------------------------------------------------------------------------------------- recipes -> launches


@dataclass
class Launch:
    """One distinct launch: the JITFunction, its arguments by name (tensors as meta tensors of the shapes, strides,
    dtypes and storage offsets the launcher passed), its grid, and the configs it may run with (one for a plain
    kernel; the autotuner's pruned list for an autotuned one)."""

    fn: Any
    kwargs: dict[str, Any]
    grid: Any
    configs: list[dict[str, Any]]
    recipes: list[str] = field(default_factory=list)


def _as_meta(value: Any) -> Any:
    """A tensor argument as a meta tensor of its layout (its address then is its storage offset in bytes, so
    Triton's alignment specialisation sees a GPU allocation's); anything else as it is."""
    if not isinstance(value, torch.Tensor):
        return value
    extent = value.storage_offset() + 1 + sum((n - 1) * s for n, s in zip(value.shape, value.stride()))
    base = torch.empty(extent, dtype=value.dtype, device="meta")
    return base.as_strided(value.shape, value.stride(), value.storage_offset())


def as_launch(recorded: KernelLaunch) -> Launch:
    """A launch recorded by ``fastmim.kernels._common.record_launches`` as this report compiles it."""
    from triton.runtime.autotuner import Autotuner

    kwargs = {name: _as_meta(v) for name, v in recorded.arguments.items()}
    kernel = recorded.kernel
    if not isinstance(kernel, Autotuner):
        return Launch(kernel, kwargs, recorded.grid, [{}])
    kernel.nargs = kwargs  # what prune_configs reads, as Autotuner.run sets it
    return Launch(kernel.fn, kwargs, recorded.grid, [c.all_kwargs() for c in kernel.prune_configs(kwargs)])


def step_launches(cfg: Config) -> list[KernelLaunch]:
    """The launches of one training step of ``cfg``'s model (forward and backward, as the recipe's ``model.impl``
    computes them) at the recipe's batch and image size, recorded on fake tensors (no memory, no GPU): the model's
    own code decides which kernels run with which arguments. The autocast is the recipe's on a GPU, with CPU
    autocast standing in for CUDA's (fake tensors live on the CPU; CUDA's autocast refuses to start without a GPU):
    the ops whose outputs reach a kernel, matmuls and linear layers, give the autocast dtype under both."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastmim.kernels._common import record_launches
    from fastmim.models.registry import model_from_config
    from fastmim.train.build import amp_dtype

    side, batch = cfg.model.resolved_img_size, cfg.train.batch_size
    with torch.device("meta"):
        model = model_from_config(cfg.model)  # no initialisation: values are never read
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        images = torch.empty(batch, 3, side, side)
    noise = torch.rand(batch, model.num_patches)  # a real host tensor: the masks (host-planned for Swin) are real
    amp = amp_dtype(cfg.train.precision, torch.device("cuda"))
    with record_launches() as launches, torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        model(images, noise).loss.backward()
    return launches


# ImageNet-like crops for data.augment=gpu: stored images up to 500 px (most ImageNet images are 500 px on the long
# side), RandomResizedCrop boxes (top, left, height, width) inside them; the largest sets the tap count.
IMAGE_SIDE = 500
CROP_BOXES = ((0, 0, 375, 500), (0, 0, 333, 250), (0, 0, 180, 201), (0, 0, 410, 337))


def augment_launches(size: int, batch: int) -> list[KernelLaunch]:
    """The launches of data.augment=gpu's batch finish (``MIMLoader.finish``: ``crop_resize_packed``) on a batch of
    ImageNet-like images as the data workers pack them: each crop's own pixels, channels last (data.decode=cpu), or
    each whole decoded image, channels first, with its box (data.decode=gpu)."""
    from fastmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from fastmim.kernels._common import record_launches
    from fastmim.kernels.crop_resize import crop_resize_packed

    boxes = torch.tensor(CROP_BOXES * math.ceil(batch / len(CROP_BOXES)))[:batch]
    flips = torch.zeros(batch, dtype=torch.bool)
    crops = torch.cat([torch.zeros_like(boxes[:, 2:]), boxes[:, 2:]], dim=1)
    images = torch.tensor([[IMAGE_SIDE, IMAGE_SIDE]]).expand(batch, 2)
    with record_launches() as launches:
        for shapes, inside, channels_last in ((boxes[:, 2:], crops, True), (images, boxes, False)):
            sizes = shapes.prod(1) * 3
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)[:-1]])
            pixels = torch.empty(int(sizes.sum()), dtype=torch.uint8, device="meta")
            crop_resize_packed(pixels, offsets, shapes, inside, flips, size, IMAGENET_MEAN, IMAGENET_STD, channels_last)
    return launches


def recipe_targets() -> dict[str, tuple[str, list[str]]]:
    """label -> (recipe, overrides): every shipped pre-training recipe, plus models without a recipe of their own."""
    from fastmim.config import _recipe_dir, list_recipes

    evaluation = {"finetune", "linprobe"}  # sections of the evaluation recipes, which train no MIM model
    pretrain = [
        n for n in list_recipes() if not evaluation & tomllib.loads((_recipe_dir() / f"{n}.toml").read_text()).keys()
    ]
    return {**{n: (n, []) for n in pretrain}, **EXTRA_MODELS}


def recipe_launches(labels: Sequence[str]) -> list[Launch]:
    """The distinct launches (with every recipe that reaches each) of the named recipe targets."""
    from fastmim.config import load_config

    targets = recipe_targets()
    unknown = sorted(set(labels) - set(targets))
    if unknown:
        raise ValueError(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(targets)}")
    distinct: dict[str, Launch] = {}
    for label in labels:
        recipe, overrides = targets[label]
        cfg = load_config(recipe, [*overrides, "--model.impl=fast", "--model.attn=sdpa"])
        recorded = step_launches(cfg) + augment_launches(cfg.model.resolved_img_size, cfg.train.batch_size)
        for launch in map(as_launch, recorded):
            reached = distinct.setdefault(specialisation_key(launch), launch).recipes
            if label not in reached:  # a recipe may make the same launch twice
                reached.append(label)
    return list(distinct.values())


# ----------------------------------------------------------------------------------------------- compiling


def _specialise(launch: Launch, config: dict[str, Any], arch: int):
    """(backend, signature, constexprs, attrs, options) of a launch in one config, by Triton's own binder."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = {**launch.kwargs, **config}
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    bound, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = launch.fn._pack_args(backend, kwargs, bound, specialization, options)
    return target, signature, constexprs, attrs, options


def specialisation_key(launch: Launch) -> str:
    """What decides the compiled code of a launch (any arch, every config): one compilation per distinct key."""
    _, signature, constexprs, attrs, _ = _specialise(launch, launch.configs[0], ARCHS[0])
    return repr(
        (launch.fn.fn.__qualname__, signature, sorted(constexprs.items()), sorted(attrs.items()), launch.configs)
    )


def config_label(launch: Launch, config: dict[str, Any], num_warps: int) -> str:
    """The launch's block sizes and warps, e.g. 'BLOCK_R=128 BLOCK_C=32 num_warps=4'."""
    values = {k: v for k, v in {**launch.kwargs, **config}.items() if k.startswith("BLOCK") or k == "maxnreg"}
    return " ".join(f"{k}={v}" for k, v in {**values, "num_warps": num_warps}.items())


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK and SHARED of the one kernel in a cubin, from cuobjdump --dump-resource-usage."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED):(\d+)", out))
    if len(found) != 3:
        raise RuntimeError(f"cannot read the resource usage from cuobjdump's output:\n{out}")
    return {k: int(v) for k, v in found.items()}


def compile_row(launch: Launch, config: dict[str, Any], arch: int) -> dict[str, Any]:
    """Compile one launch in one config for sm_<arch>; the report row."""
    import triton
    from triton.compiler import ASTSource

    target, signature, constexprs, attrs, options = _specialise(launch, config, arch)
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    seconds = time.perf_counter() - start
    usage = resource_usage(kernel.asm["cubin"])
    shared = usage["SHARED"] + kernel.metadata.shared
    warps = kernel.metadata.num_warps
    return {
        "kernel": launch.fn.fn.__qualname__,
        "module": launch.fn.fn.__module__.rsplit(".", 1)[-1],
        "config": config_label(launch, config, warps),
        "arch": f"sm_{arch}",
        "registers": usage["REG"],
        "spill_bytes": usage["STACK"],
        "shared_bytes": shared,
        "num_warps": warps,
        "num_stages": kernel.metadata.num_stages,
        "warps_per_sm": resident_warps(arch, usage["REG"], shared, warps),
        "compile_s": round(seconds, 2),
        "recipes": ",".join(launch.recipes),
        "constexprs": {str(k): repr(v) for k, v in constexprs.items()},
    }


def run_static_report(
    labels: Sequence[str], archs: Sequence[int], kernels: Sequence[str] = (), log: Callable[[str], None] = print
) -> list[dict]:
    """Compile every distinct launch of the recipe targets in every config for every arch (only kernels whose name
    contains one of ``kernels``, when given); the report rows."""
    rows = []
    for launch in recipe_launches(labels):
        if kernels and not any(k in launch.fn.fn.__qualname__ for k in kernels):
            continue
        for config in launch.configs:
            for arch in archs:
                row = compile_row(launch, config, arch)
                log(
                    f"  {row['kernel']} [{row['config']}] {row['arch']}: {row['registers']} registers, "
                    f"{row['spill_bytes']} spill bytes, {row['compile_s']} s"
                )
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastmim.bench.static``: what ``fastmim bench kernels --static`` runs (module docstring)."""
    parser = argparse.ArgumentParser(prog="fastmim bench kernels --static", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities (default 80,90)")
    parser.add_argument("--recipes", help=f"comma-separated subset of: {', '.join(recipe_targets())} (default all)")
    parser.add_argument("--kernels", help="only kernels whose name contains one of these (comma-separated)")
    parser.add_argument("--out", help="directory for the JSON record (default benchmarks/results)")
    parser.add_argument("--cache", help="Triton cache directory to reuse (default: a fresh one, so compile_s is real)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    from fastmim.bench.harness import format_table, triton_version, write_record
    from fastmim.errors import FastmimError

    try:
        archs = [int(a) for a in args.arch.split(",")]
        if not set(archs) <= set(SM_LIMITS):
            raise ValueError
    except ValueError:
        raise FastmimError(f"--arch takes compute capabilities among {sorted(SM_LIMITS)}, got '{args.arch}'") from None
    labels = args.recipes.split(",") if args.recipes else list(recipe_targets())
    with tempfile.TemporaryDirectory() as fresh:
        os.environ["TRITON_CACHE_DIR"] = args.cache or fresh
        try:
            rows = run_static_report(labels, archs, args.kernels.split(",") if args.kernels else ())
        except ValueError as e:
            raise FastmimError(str(e)) from None
    print(f"static kernel report: triton {triton_version()}, torch {torch.__version__}, no GPU needed")
    print(format_table(rows, STATIC_COLUMNS))
    extra = {"archs": [f"sm_{a}" for a in archs], "triton_cache": "reused" if args.cache else "fresh"}
    command = ["fastmim", "bench", "kernels", "--static", *argv]
    print(f"wrote {write_record('kernels_static', rows, torch.device('cpu'), args.out, command, extra)}")
    flagged = [r for r in rows if r["spill_bytes"] or r["registers"] >= 255 or not r["warps_per_sm"]]
    for r in flagged:
        print(
            f"flagged: {r['kernel']} [{r['config']}] {r['arch']}: {r['registers']} registers, {r['spill_bytes']} "
            f"spill bytes, {r['warps_per_sm']} resident warps per SM ({r['recipes']})"
        )
    return 1 if flagged else 0


def run_in_subprocess(argv: Sequence[str]) -> int:
    """Run ``main(argv)`` in a fresh interpreter with TRITON_INTERPRET removed (triton fixes it at import)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "fastmim.bench.static", *argv], env=env).returncode


if __name__ == "__main__":
    from fastmim.errors import FastmimError

    try:
        sys.exit(main())
    except FastmimError as e:
        print(f"fastmim: error: {e}", file=sys.stderr)
        sys.exit(2)
