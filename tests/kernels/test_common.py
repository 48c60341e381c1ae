"""fastmim.kernels._common: the autotune lists, launches on fake tensors, and the custom-op glue in each of its three
settings: the interpreter (here), compiled kernels (torch.library.triton_op, traced in a subprocess without the
interpreter and without a GPU), and no triton at all (a subprocess where triton cannot be imported)."""

import json
import os
import subprocess
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastmim.kernels import _common
from fastmim.kernels import recon_loss as rl


def run_python(code: str, **env: str) -> str:
    """stdout of ``code`` run in a fresh interpreter, TRITON_INTERPRET removed from its environment (then set from
    ``env``); fails the test with its stderr when it fails."""
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    done = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_autotune_lists_collapse_to_one_config_under_the_interpreter():
    assert _common.INTERPRETED
    tuned = [({"BLOCK": 8}, 4), ({"BLOCK": 16}, 8)]
    (only,) = _common.autotune_configs(tuned, num_stages=1)
    assert (only.kwargs, only.num_warps, only.num_stages) == ({"BLOCK": 8}, 4, 1)
    (only,) = _common.autotune_configs(tuned, interpreted={"BLOCK": 64})
    assert (only.kwargs, only.num_warps, only.num_stages) == ({"BLOCK": 64}, 4, 3)


def test_a_launcher_on_fake_tensors_allocates_its_outputs_and_runs_no_kernel():
    """What makes a launcher its own op's fake implementation: the interpreter cannot run on fake tensors, so the
    launches must be skipped, while the outputs come out with the shapes and dtypes of a real run."""
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(2, 16, generator=g) < 0.75).float()
    idx, gidx = torch.arange(3).expand(2, 3), torch.arange(2).expand(2, 2)
    preds = [torch.randn(2, 3, 16, 5), torch.randn(2, 3, 4, 5), torch.randn(2, 3, 5), torch.randn(2, 2, 5)]
    targets = [torch.randn(2, n, 5) for n in (256, 64, 16, 4)]
    real = rl.recon_loss_fwd(preds, targets, mask, idx, gidx, 4)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = rl.recon_loss_fwd([mode.from_tensor(p) for p in preds], targets, mask, idx, gidx, 4)
    for f, r in zip(fake, real):
        assert _common.traced(f) and not _common.traced(r)
        assert (f.shape, f.dtype, f.device) == (r.shape, r.dtype, r.device)


def test_recorded_launches_run_nothing_and_carry_what_a_launch_passes():
    """Within record_launches every op takes its kernel path, also where no kernel could run (a fake tensor), and
    each launch is recorded, not run: what fastmim bench kernels --static compiles."""
    mask = torch.tensor([[0.0, 1, 0, 1], [1, 0, 1, 0]])
    idx, gidx = torch.tensor([[1, 3], [0, 2]]), torch.tensor([[0], [0]])
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        preds = [mode.from_tensor(torch.randn(*s, 3)).requires_grad_() for s in ((2, 2, 16), (2, 2, 4), (2, 2), (2, 1))]
    targets = [torch.randn(2, n, 3) for n in (64, 16, 4, 1)]
    with _common.record_launches() as launches:
        assert _common.use_kernel(torch.zeros(1, device="meta"))
        rl.recon_loss(preds, targets, mask, idx, gidx, 2).sum().backward()
    assert [launch.kernel.fn.__name__ for launch in launches] == ["_recon_loss_fwd_kernel", "_recon_loss_bwd_kernel"]
    fwd = launches[0].arguments
    assert fwd["n_sel"] == 2 and fwd["p0"].shape == (2, 2, 16, 3) and _common.traced(fwd["p0"])
    assert fwd["BLOCK_C"] == 4 and launches[0].grid == (fwd["end2"] + 1,)
    assert not _common.use_kernel(torch.zeros(1, device="meta"))  # recording ends with the block


TRACED_OPS = r"""
import json, torch, triton
from triton.backends.compiler import GPUTarget
from torch._functorch.aot_autograd import aot_export_joint_simple
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._library.triton import get_triton_kernels_for_op


class Target:  # torch's mutation analysis compiles each kernel to Triton IR for the current target: name one
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


triton.runtime.driver.set_active(Target())
from fastmim.kernels import _common, hog, masked_gather, recon_loss  # noqa: E402, F401 (they register the ops)

hog._use_kernel = lambda x: True  # hog_fwd refuses CPU tensors without the interpreter: these stand in for CUDA ones
ops = torch.ops.fastmim
g = torch.Generator().manual_seed(0)
leaf = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
ids_keep, ids_restore = torch.tensor([[3, 0], [1, 2]]), torch.tensor([[1, 0, 3, 2], [2, 1, 0, 3]])
mask = torch.tensor([[0.0, 1, 0, 1], [1, 0, 1, 0]])
idx, gidx = torch.tensor([[1, 3], [0, 2]]), torch.tensor([[0], [0]])
targets = [torch.randn(2, n, 3) for n in (64, 16, 4, 1)]
cases = {  # name: (op, its inputs); every tensor is an input of the traced function, as torch.compile makes it
    "encoder_input": (lambda i, k, w, b, p, c: ops.encoder_input(i, k, w, b, p, c, 4)[:1],
                      [torch.randn(2, 3, 8, 8), ids_keep, leaf(6, 48), leaf(6), torch.randn(5, 6), leaf(6)]),
    "decoder_input": (lambda *a: (ops.decoder_input(*a),), [leaf(1, 2, 3, 6), ids_restore, leaf(1, 6),
                                                            torch.randn(1, 5, 6)]),
    "recon_loss": (lambda *a: ops.recon_loss(list(a[:4]), list(a[4:8]), *a[8:], 2, True, [4, 2, 1, 0])[:1],
                   [leaf(2, 2, 16, 3), leaf(2, 2, 4, 3), leaf(2, 2, 3), leaf(2, 1, 3), *targets, mask, idx, gidx]),
    "hog": (lambda img: tuple(ops.hog(img, None, [4, 8], 9, None, torch.float32)), [torch.randn(2, 3, 16, 16)]),
}


def name(kernel):
    while hasattr(kernel, "fn"):  # Autotuner -> JITFunction -> the Python function
        kernel = kernel.fn
    return kernel.__name__


report = {"interpreted": _common.INTERPRETED, "launches": {}, "found": {}}
for op, (fn, inputs) in cases.items():
    graph = aot_export_joint_simple(fn, inputs, trace_joint=any(x.requires_grad for x in inputs))
    launches = []
    for node in graph.graph.nodes:
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            args = node.kwargs["kwargs"]
            cloned = [n for n in node.kwargs["tensors_to_clone"] if args[n].op == "placeholder"]
            launches.append([name(kernel_side_table.get_kernel(node.kwargs["kernel_idx"])), cloned])
    report["launches"][op] = launches
for op in (*cases, "encoder_input_bwd", "decoder_input_bwd", "recon_loss_bwd"):
    report["found"][op] = sorted(name(k) for k in get_triton_kernels_for_op("fastmim::" + op))
print(json.dumps(report))
"""


def test_compiled_kernels_make_triton_ops_that_torch_traces_to_their_launches():
    """Without the interpreter the ops are torch.library.triton_ops: torch.compile's tracer (AOTAutograd) records
    each op's kernels in the forward and backward graph, Triton's analysis of what each kernel writes finds only
    tensors the launcher allocated (a graph input in ``tensors_to_clone`` would be copied at every call), and
    triton_op finds each op's kernels in its source (torch keys its compile cache on their code)."""
    report = json.loads(run_python(TRACED_OPS))
    assert report["interpreted"] is False
    assert report["found"] == {
        "encoder_input": ["_encoder_epilogue_kernel", "_patch_gather_kernel"],
        "encoder_input_bwd": ["_encoder_input_bwd_kernel"],
        "decoder_input": ["_decoder_input_fwd_kernel"],
        "decoder_input_bwd": ["_decoder_input_bwd_kernel"],
        "recon_loss": ["_recon_loss_fwd_kernel"],
        "recon_loss_bwd": ["_recon_loss_bwd_kernel"],
        "hog": ["_hog_fwd_kernel"],
    }
    assert report["launches"] == {
        "encoder_input": [
            ["_patch_gather_kernel", []],
            ["_encoder_epilogue_kernel", []],
            ["_encoder_input_bwd_kernel", []],
        ],
        "decoder_input": [["_decoder_input_fwd_kernel", []], ["_decoder_input_bwd_kernel", []]],
        "recon_loss": [["_recon_loss_fwd_kernel", []], ["_recon_loss_bwd_kernel", []]],
        "hog": [["_hog_fwd_kernel", []]],
    }


WITHOUT_TRITON = r"""
import sys
sys.modules["triton"] = None  # as on a CPU-only PyTorch build: `import triton` fails
import torch
import fastmim.kernels as kernels
from fastmim.kernels import crop_resize, hog, masked_gather, recon_loss

assert not kernels.triton_available() and not recon_loss._use_kernel(torch.zeros(1))
g = torch.Generator().manual_seed(0)
img = torch.randn(2, 3, 16, 16, generator=g)
assert all(torch.equal(a, b) for a, b in zip(hog.hog(img, (4, 8)), hog.hog_ref(img, (4, 8))))
y, mask_token, pos = torch.randn(1, 2, 3, 6, generator=g), torch.randn(1, 6), torch.randn(1, 5, 6)
ids_restore = torch.tensor([[1, 0, 3, 2], [2, 1, 0, 3]])
assert torch.equal(masked_gather.decoder_input(y, ids_restore, mask_token, pos),
                   masked_gather.decoder_input_ref(y, ids_restore, mask_token, pos))
images = torch.randint(0, 256, (2, 20, 24, 3), dtype=torch.uint8, generator=g)
boxes, flips = torch.tensor([[0, 0, 20, 24], [2, 3, 10, 12]]), torch.tensor([False, True])
args = (images, boxes, flips, 8, (0.5,) * 3, (0.25,) * 3)
assert torch.equal(crop_resize.crop_resize(*args), crop_resize.crop_resize_ref(*args))
assert hasattr(torch.ops.fastmim, "recon_loss") and hasattr(torch.ops.fastmim, "encoder_input")
print("ok")
"""


def test_without_triton_every_module_imports_and_every_op_falls_back_to_its_reference():
    assert run_python(WITHOUT_TRITON, TRITON_INTERPRET="1").strip() == "ok"
