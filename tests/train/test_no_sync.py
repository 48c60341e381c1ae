"""A training step that does not log makes no host-device synchronisation (issue: whole-step speed).

On a GPU this is checked directly with ``torch.cuda.set_sync_debug_mode("error")`` (the gpu-marked test). On the
CPU there is no device to wait for, so the CPU test is a proxy that catches every operation that *would* make the
host wait for a CUDA device: reading a tensor's value on the host (``item``, ``bool``, ``tolist``, ``numpy``), and
operators whose output size depends on tensor values (``nonzero``, boolean-mask indexing, ``unique``, ...). It
runs the trainer's own step function, with the optimizer the trainer builds on CUDA (fused AdamW, which skips a
non-finite step on the device), for the reference and the fast implementation.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastmim.config import load_config
from fastmim.train.metrics import StepStats
from fastmim.train.optim import build_optimizer
from fastmim.train.trainer import build_run, scale_names, train_step

# Operators that read device values on the host, or whose output shape depends on them.
_SYNCING = {
    "aten::_local_scalar_dense",  # item(), bool(), int(), float()
    "aten::nonzero",
    "aten::nonzero_static",
    "aten::masked_select",
    "aten::unique_consecutive",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::equal",
    "aten::is_nonzero",
}


class HostReads(TorchDispatchMode):
    """Records operators that would synchronise with a CUDA device (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in _SYNCING:
            self.found.append(name)
        elif name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype == torch.bool for i in indices):
                self.found.append(f"{name} with a boolean mask")
        elif name == "aten::repeat_interleave" and kwargs.get("output_size") is None:
            self.found.append(f"{name} without output_size")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_conversions():
    """tolist / numpy / __array__ bypass the dispatcher: inside this block they fail loudly instead."""

    def refuse(*_, **__):
        raise AssertionError("a non-logging step read a tensor on the host")

    with pytest.MonkeyPatch.context() as mp:
        for name in ("tolist", "numpy", "__array__"):
            mp.setattr(torch.Tensor, name, refuse)
        yield


def test_the_proxy_catches_host_reads():
    """The detector itself: each of these would synchronise on CUDA."""
    x = torch.tensor([0.5, -1.0, 2.0])
    for fn in (
        lambda: x.sum().item(),
        lambda: bool(x[0] > 0),
        lambda: x[x > 0],
        lambda: x.nonzero(),
        lambda: torch.unique(x),
    ):
        with HostReads() as mode:
            fn()
        assert mode.found, fn


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_a_non_logging_step_reads_nothing_on_the_host(tmp_path, impl):
    cfg = load_config(
        None,
        [
            "--model.img_size=32",
            "--model.decoder_dim=32",
            f"--model.impl={impl}",
            "--data.num_images=8",
            "--train.batch_size=4",
            "--train.accum_steps=2",
            "--train.clip_grad=1.0",
            "--train.precision=fp32",
            "--train.device=cpu",
            "--train.compile=off",
            f"--train.out_dir={tmp_path / 'run'}",
        ],
    )
    run = build_run(cfg)
    t = cfg.train
    # The optimizer the trainer builds on CUDA: fused AdamW takes the skip decision on the device.
    run.optimizer = build_optimizer(run.model, run.peak_lr, t.weight_decay, (t.beta1, t.beta2), fused=True)
    images = next(run.loader.iterate(0))[0]  # the data pipeline is checked in test_device_input_makes_no_reads
    batches = itertools.repeat(images)
    stats = StepStats(scale_names(run.model), run.device)
    stats.update(*train_step(run, batches))  # first step: optimizer state is created (no reads either)
    with HostReads() as mode, no_host_conversions():
        for _ in range(2):
            stats.update(*train_step(run, batches))
    assert mode.found == [], f"host reads in a non-logging step: {sorted(set(mode.found))}"
    assert run.pos.step == 3


def test_device_input_makes_no_reads(tmp_path):
    """Finishing a batch on the device (copy + normalise) reads nothing back."""
    cfg = load_config(
        None,
        [
            "--model.img_size=32",
            "--data.num_images=8",
            "--train.batch_size=4",
            "--train.device=cpu",
            f"--train.out_dir={tmp_path / 'run'}",
        ],
    )
    run = build_run(cfg)
    raw = next(run.loader.raw_batches(0))
    with HostReads() as mode, no_host_conversions():
        images, _ = run.loader.finish(raw, run.device)
    assert mode.found == [] and images.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("impl,augment", [("reference", "cpu"), ("fast", "cpu"), ("fast", "gpu")])
def test_a_non_logging_cuda_step_does_not_synchronise(tmp_path, impl, augment):
    """The real check: CUDA's sync debug mode raises on any synchronising call during two non-logging steps
    (bf16 autocast, fused AdamW, gradient clipping, device-side input from the prefetcher, for data.augment=gpu
    the crop-resize kernel, mask noise copied from pinned memory)."""
    from fastmim.train.trainer import input_stream

    cfg = load_config(
        None,
        [
            "--model.img_size=64",
            "--model.decoder_dim=64",
            f"--model.impl={impl}",
            "--data.num_images=64",
            "--train.batch_size=8",
            "--train.clip_grad=1.0",
            "--train.device=cuda",
            "--train.compile=off",
            f"--data.augment={augment}",
            f"--train.out_dir={tmp_path / 'run'}",
        ],
    )
    run = build_run(cfg)
    batches = input_stream(run)
    stats = StepStats(scale_names(run.model), run.device)
    stats.update(*train_step(run, batches))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            stats.update(*train_step(run, batches))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert stats.read()["skipped"] == 0
