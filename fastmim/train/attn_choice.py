"""``model.attn = "auto"``: measure the attention backends on the card at hand and keep the fastest.

The fastest backend depends on the GPU, the dtype and the shape (1 + 49 encoder tokens vs 1 + 196 decoder tokens,
head width), so "auto" does not guess: before training (and before compilation) it runs one forward of the model on
a random batch to record every attention module's input shape, then times forward + backward of each available
backend at each distinct shape (CUDA events, median of a few calls), and sets each module to the winner. Backends
that do not support a shape or dtype are skipped. On a CPU there is nothing to choose: "auto" is torch's own SDPA.
A model whose modules were never measured treats "auto" as "sdpa".
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fastmim.models.vit import Attention, _xformers_ops, attention

CUDA_CANDIDATES = ("sdpa", "flash", "cudnn", "efficient", "xformers")


def attention_shapes(
    model: nn.Module, images: torch.Tensor, noise: torch.Tensor | None, dtype: torch.dtype | None
) -> dict[Attention, tuple[int, int, int, int]]:
    """{module: (batch, heads, tokens, head width)} of every Attention module met in one forward of ``model``."""
    shapes: dict[Attention, tuple[int, int, int, int]] = {}

    def record(module: Attention, args) -> None:
        b, n, c = args[0].shape
        shapes[module] = (b, module.num_heads, n, c // module.num_heads)

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, Attention)]
    try:
        with torch.no_grad(), torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            model(images, noise)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _cuda_timer(fn: Callable[[], None], calls: int) -> float:
    """Median ms of ``calls`` calls of ``fn`` (CUDA events, after one untimed call)."""
    fn()
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _cpu_timer(fn: Callable[[], None], calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_backends(
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    device: torch.device,
    candidates: Sequence[str],
    calls: int = 10,
    timer=None,
) -> dict[str, float]:
    """ms of forward + backward of attention at ``shape`` (B, H, N, d) for each candidate that runs it."""
    timer = timer or (_cuda_timer if device.type == "cuda" else _cpu_timer)
    q, k, v = (torch.randn(shape, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, dtype=dtype, device=device)
    results = {}
    for backend in candidates:

        def step(backend=backend) -> None:
            out = attention(q, k, v, backend)
            torch.autograd.grad(out, (q, k, v), grad)

        try:
            results[backend] = timer(step, calls)
        except RuntimeError:  # e.g. "No available kernel": this backend does not take this shape / dtype
            continue
    return results


def choose_attention(
    model: nn.Module,
    batch: int,
    img_size: int,
    dtype: torch.dtype | None,
    device: torch.device,
    candidates: Sequence[str] | None = None,
    timer=None,
) -> list[dict]:
    """Set every Attention module of ``model`` whose backend is "auto" to the fastest candidate at its shape;
    returns one row per distinct shape: {"shape", "choice", "ms": {backend: ms}}. On the CPU without explicit
    candidates, "auto" simply becomes "sdpa" (nothing is measured)."""
    modules = [m for m in model.modules() if isinstance(m, Attention) and m.backend == "auto"]
    if not modules:
        return []
    if candidates is None:
        if device.type != "cuda":
            for m in modules:
                m.backend = "sdpa"
            return [{"shape": None, "choice": "sdpa", "ms": {}}]
        candidates = [c for c in CUDA_CANDIDATES if c != "xformers" or _xformers_ops() is not None]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the run's RNG stays as it was
        images = torch.randn(batch, 3, img_size, img_size, device=device)
        noise = torch.rand(batch, model.num_patches) if hasattr(model, "num_patches") else None
        if noise is not None and not getattr(model, "masks_on_host", False):
            noise = noise.to(device)
        shapes = attention_shapes(model, images, noise, dtype)
        timings = {
            s: time_backends(s, dtype or torch.float32, device, candidates, timer=timer)
            for s in sorted(set(shapes.values()))
        }
    rows = []
    for shape, ms in timings.items():
        choice = min(ms, key=ms.get) if ms else "sdpa"
        for module, s in shapes.items():
            if s == shape and module.backend == "auto":
                module.backend = choice
        rows.append({"shape": shape, "choice": choice, "ms": ms})
    for m in modules:  # modules the forward did not reach (none in fastmim's models): torch's own choice
        if m.backend == "auto":
            m.backend = "sdpa"
    return rows


def describe(rows: list[dict]) -> str:
    """One line per shape, e.g. ``B256 x 12 heads x 50 tokens x 64: flash 0.41 ms (sdpa 0.43, cudnn 0.47)``."""
    lines = []
    for row in rows:
        if row["shape"] is None:
            lines.append(f"-> {row['choice']} (CPU: nothing to measure)")
            continue
        b, h, n, d = row["shape"]
        others = ", ".join(f"{k} {v:.3g}" for k, v in sorted(row["ms"].items(), key=lambda kv: kv[1])[1:])
        best = f"{row['ms'][row['choice']]:.3g} ms" if row["ms"] else "no backend ran"
        line = f"B{b} x {h} heads x {n} tokens x {d}: {row['choice']} {best}"
        lines.append(line + (f" ({others})" if others else ""))
    return "; ".join(lines)
