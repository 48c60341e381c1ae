"""What every kernel module shares: triton (or a stand-in), whether its kernels run, autotune lists, and the glue
that makes a launcher a torch.library op.

- ``triton`` / ``tl``: the real modules, or on CPU-only PyTorch builds (which ship without triton) a stand-in whose
  ``jit`` and ``autotune`` leave the kernels plain functions; they are never launched, the ``_ref`` paths run.
- ``INTERPRETED``: whether the kernels run in Triton's interpreter. ``@triton.jit`` picks the interpreter when a
  kernel module is imported (not when a kernel runs), and triton.language's own jit helpers (``tl.zeros``,
  ``tl.sum``) when triton is first imported: both must be interpreted, so TRITON_INTERPRET=1 must be set before
  triton is imported (tests do this). Fixed at the first import of a kernel module, which imports this one first.
- ``use_kernel(x)``: a kernel can run on ``x``: CUDA with triton, or CPU with the kernels built for the interpreter
  (or any tensor while launches are recorded).
- ``autotune_configs``: an autotune list that collapses to one config under the interpreter.
- ``kernel_op`` and ``wrap_triton``: a launcher (check, allocate, launch) registered as a custom op whose fake
  implementation is the launcher itself, so that no output shape or dtype is written twice (below).
- ``record_launches``: the launches a computation makes, recorded instead of run, on fake tensors and without a GPU
  (what ``fastmim bench kernels --static`` compiles: every launch of a training step, with no list kept by hand).
"""

from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, get_type_hints

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import can_run_on, interpreter_enabled

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only PyTorch build: see the module docstring
    triton = types.SimpleNamespace(jit=lambda fn: fn, autotune=lambda **kw: lambda fn: fn)
    tl = None

INTERPRETED = interpreter_enabled() and tl is not None and not isinstance(tl.zeros, triton.runtime.JITFunction)


def use_kernel(x: Tensor) -> bool:
    """Whether a kernel can run on ``x``: CUDA with triton, or CPU with the kernels built for the interpreter; within
    :func:`record_launches`, any tensor (its launches are recorded, never run)."""
    return _recorded is not None or (can_run_on(x) and (x.is_cuda or INTERPRETED))


def autotune_configs(
    tuned: Sequence[tuple[dict[str, int], int]], interpreted: dict[str, int] | None = None, num_stages: int = 3
) -> list:
    """``triton.Config`` list for ``@triton.autotune`` from (meta-parameters, num_warps) pairs. Under the interpreter
    one config, ``interpreted`` (default: the first pair's meta-parameters) at 4 warps: its timings mean nothing, and
    it runs the programs one by one, so larger blocks (fewer programs) run faster. Empty without triton."""
    if tl is None:
        return []
    if INTERPRETED:
        tuned = [(tuned[0][0] if interpreted is None else interpreted, 4)]
    return [triton.Config(meta, num_warps=warps, num_stages=num_stages) for meta, warps in tuned]


# ----------------------------------------------------------------------------------------------- custom-op glue
# A launcher is registered as an op (torch.compile then keeps its graph around the kernels instead of breaking it),
# and its fake implementation, which torch runs on fake tensors for output shapes and dtypes, is the launcher
# itself: it checks and allocates as for a real run, and its launches (through wrap_triton) run no kernel on fake
# tensors. With compiled kernels the op is a torch.library.triton_op: torch.compile traces through the launcher
# and records each launch in its graph. Under the interpreter (or without triton) it is a torch.library.custom_op,
# opaque to torch.compile and run eagerly: inductor cannot run interpreted kernels, and torch 2.11's wrap_triton
# refuses them.


class _Launcher:
    """``wrap_triton(kernel)[grid](**arguments)``: see :func:`wrap_triton`."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(**arguments: Any) -> None:
            if _recorded is not None:
                _recorded.append(KernelLaunch(self.kernel, grid, arguments))
            elif not any(isinstance(a, Tensor) and traced(a) for a in arguments.values()):
                self.kernel[grid](**arguments)
            elif not INTERPRETED:
                torch.library.wrap_triton(self.kernel)[grid](**arguments)

        return launch


def wrap_triton(kernel: Any) -> _Launcher:
    """``wrap_triton(kernel)[grid](name=value, ...)`` launches ``kernel`` from a launcher that is also an op (keyword
    arguments only, so that no launch depends on counting positions). Within :func:`record_launches` the launch is
    recorded and nothing runs; otherwise on real tensors the kernel runs, on fake tensors torch.library.wrap_triton
    records the launch in the graph torch is tracing, and under the interpreter, whose kernels no graph can hold,
    nothing happens. Every launch goes through it, so that :func:`record_launches` sees it. Named as torch's
    function on purpose: torch.library.triton_op finds an op's kernels by that name in its source (its compile cache
    is keyed on their code)."""
    return _Launcher(kernel)


def traced(x: Tensor) -> bool:
    """Whether ``x`` is a fake tensor (torch.compile tracing, or an op's fake implementation): nothing derived from
    it may be cached."""
    return is_fake(x)


def kernel_op(
    name: str, launcher: Callable, *, setup_context: Callable | None = None, backward: Callable | None = None
) -> Any:
    """Register ``launcher`` (it mutates no input; its type annotations give the schema) as the op ``name`` (see the
    comment above), differentiable when ``backward`` is given. Both autograd functions name the op's inputs by the
    launcher's parameter names: ``setup_context(ctx, inputs: dict[str, Any], output)``, and ``backward(ctx,
    *output_grads)`` returns ``{input name: gradient}`` for the inputs that get one."""
    if INTERPRETED or tl is None:
        op = torch.library.custom_op(name, launcher, mutates_args=())
        op.register_fake(launcher)
    else:
        op = torch.library.triton_op(name, launcher, mutates_args=())
    if backward is not None:
        names = list(inspect.signature(launcher).parameters)
        tensor_lists = {n for n, hint in get_type_hints(launcher).items() if hint == list[Tensor]}

        def setup(ctx: Any, inputs: tuple, output: Any) -> None:
            # an input without a gradient gets None, a list of tensors one None per tensor
            ctx.no_grads = [[None] * len(x) if n in tensor_lists else None for n, x in zip(names, inputs)]
            setup_context(ctx, dict(zip(names, inputs)), output)

        def grads(ctx: Any, *output_grads: Tensor) -> tuple:
            by_name = backward(ctx, *output_grads)
            return tuple(by_name.get(n, none) for n, none in zip(names, ctx.no_grads))

        op.register_autograd(grads, setup_context=setup)
    return op


# ----------------------------------------------------------------------------------------------- recording launches


class KernelLaunch(NamedTuple):
    """One launch as a launcher made it: ``kernel`` (a JITFunction, or an Autotuner around one), ``grid`` (a tuple,
    or a function of the launch's meta-parameters) and ``arguments`` by name (tensors as the launcher passed them:
    fake ones carry only shapes, strides and dtypes)."""

    kernel: Any
    grid: Any
    arguments: dict[str, Any]


_recorded: list[KernelLaunch] | None = None  # the launches recorded so far, within record_launches()


@contextlib.contextmanager
def record_launches() -> Iterator[list[KernelLaunch]]:
    """Within the block, every op takes its kernel path on any tensor (``use_kernel``) and every launch through
    :func:`wrap_triton` is appended to the yielded list instead of running. Run a computation on fake tensors
    (``torch._subclasses.FakeTensorMode``) inside it to learn, without a GPU, which kernels a CUDA run of it launches
    with which arguments: the launchers' own checks, allocations, block sizes and grids decide them, as on a GPU."""
    global _recorded
    if _recorded is not None:
        raise RuntimeError("record_launches() is already recording: blocks do not nest")
    _recorded = []
    try:
        yield _recorded
    finally:
        _recorded = None
