"""fastmim.kernels.recon_loss: the fused multi-scale masked MSE against its reference and against the method-literal
heads + loss (ScaleHead on full maps, scale_weights, masked_mse), values and every gradient.

Runs on CUDA when there is one, else on CPU through Triton's interpreter (tests/kernels/conftest.py sets
TRITON_INTERPRET=1 unless the environment says otherwise); the gpu-marked test needs TRITON_INTERPRET=0, so that it
tests the compiled kernels.
"""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from fastmim.bench.harness import CorrectnessError, check_provider
from fastmim.kernels import recon_loss as rl
from fastmim.kernels._common import INTERPRETED
from fastmim.masking import num_kept, random_masking, scale_weights
from fastmim.models.base import masked_mse
from fastmim.models.decoder import ScaleHead
from fastmim.models.fast_heads import CellSelection, heads_and_loss, scatter_cells, select_cells

SCALES = (4, 2, 1, 0.5)
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup_module():
    assert rl._use_kernel(torch.zeros(1, device=DEV)), "no kernel can run: CPU needs TRITON_INTERPRET=1 before import"


def assert_rel_close(actual, expected, tol):
    """max |actual - expected| <= tol * max |expected|, and expected is not all zero (the check can fail)."""
    scale = expected.detach().abs().max().item()
    assert scale > 0
    err = (actual.detach().double() - expected.detach().double()).abs().max().item()
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol} x {scale:.3g}"


def make_mask(batch, grid, ratio, seed=0):
    g = torch.Generator().manual_seed(seed)
    return random_masking(torch.rand(batch, grid * grid, generator=g), ratio).mask.to(DEV)


def compact_inputs(batch, grid, ratio, channels=(27, 27, 27, 27), dtype=torch.float32, seed=0):
    """Random compact predictions (requiring grad) and full targets for a random mask."""
    g = torch.Generator().manual_seed(seed)
    mask = make_mask(batch, grid, ratio, seed)
    sel = select_cells(mask, grid, grid * grid - num_kept(grid * grid, ratio))
    n, n_grp = sel.idx.shape[1], sel.gidx.shape[1]
    shapes = [(batch, n, 16), (batch, n, 4), (batch, n), (batch, n_grp)]
    preds = [torch.randn(*s, c, generator=g).to(DEV, dtype).requires_grad_() for s, c in zip(shapes, channels)]
    cells = [(grid * 4) ** 2, (grid * 2) ** 2, grid**2, (grid // 2) ** 2]
    targets = [torch.randn(batch, m, c, generator=g).to(DEV) for m, c in zip(cells, channels)]
    return preds, targets, mask, sel


def grads(losses, inputs, seed=1):
    upstream = torch.randn(losses.shape, generator=torch.Generator().manual_seed(seed)).to(losses)
    return torch.autograd.grad(losses, inputs, upstream)


@pytest.mark.parametrize(
    "dtype,batch,grid,ratio",
    [
        (torch.float32, 3, 4, 0.75),
        (torch.float32, 1, 4, 0.9),
        (torch.float32, 5, 6, 0.5),
        (torch.float32, 2, 4, 0.1),
        (torch.float16, 3, 4, 0.75),
        (torch.float16, 5, 6, 0.5),
    ],
)
def test_kernel_matches_reference(dtype, batch, grid, ratio):
    preds, targets, mask, sel = compact_inputs(batch, grid, ratio, dtype=dtype)
    got = rl.recon_loss(preds, targets, mask, sel.idx, sel.gidx, grid)
    want = rl.recon_loss_ref(preds, targets, mask, sel.idx, sel.gidx, grid)
    assert got.dtype == torch.float32 and got.shape == (4,)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # the residual is stored in the prediction dtype: one extra rounding (fp16: < 1 ulp of the gradient)
    for a, b in zip(grads(got, preds), grads(want, preds)):
        assert a.dtype == dtype
        assert_rel_close(a, b, 1e-6 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("dtype,batch,units,masked", [(torch.float32, 2, 3, 6), (torch.float16, 3, 2, 3)])
def test_swin_geometry_matches_reference_and_full_map_masked_mse(dtype, batch, units, masked):
    """LocalMIM-Swin's scales (SWIN_SUBS: 4 x 4, 2 x 2, 1, 1 cells per 32 px mask unit) on an odd or even unit grid,
    one mask row for the whole batch: kernel = reference (values and gradients), and the reference on the compact
    layout = masked_mse over full maps with the unit mask upsampled x4, x2, x1, x1 (method 4)."""
    g = torch.Generator().manual_seed(units)
    picked = torch.randperm(units * units, generator=g)[:masked].sort().values
    row = torch.zeros(units * units).index_fill(0, picked, 1.0)
    mask, idx = row.expand(batch, -1).to(DEV), picked.expand(batch, -1).to(DEV)
    gidx = torch.zeros(batch, 0, dtype=torch.long, device=DEV)
    channels = (12, 7, 40, 5)
    shapes = [rl.compact_shape(s, batch, masked, 0) for s in rl.SWIN_SUBS]
    preds = [torch.randn(*s, c, generator=g).to(DEV, dtype).requires_grad_() for s, c in zip(shapes, channels)]
    targets = [torch.randn(batch, (units * s) ** 2, c, generator=g).to(DEV) for s, c in zip(rl.SWIN_SUBS, channels)]
    args = (targets, mask, idx, gidx, units, rl.SWIN_SUBS)
    got, want = rl.recon_loss(preds, *args), rl.recon_loss_ref(preds, *args)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads(got, preds), grads(want, preds)):
        assert a.dtype == dtype
        assert_rel_close(a, b, 1e-6 if dtype == torch.float32 else 2e-3)
    sel = CellSelection(idx, gidx)
    full = [scatter_cells(p.detach().double(), sel, units, k, rl.SWIN_SUBS) for k, p in enumerate(preds)]
    spec = [
        masked_mse(f, t.double(), scale_weights(mask.double(), units, s))
        for f, t, s in zip(full, targets, rl.SWIN_SUBS)
    ]
    torch.testing.assert_close(want.double(), torch.stack(spec), rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=0)


def test_kernel_channel_loop_and_weight_zero_rows():
    """Wide targets (several column tiles), visible patches listed in idx and empty groups listed in gidx."""
    batch, grid = 2, 4
    preds, targets, mask, _ = compact_inputs(batch, grid, 0.75, channels=(5, 12, 130, 300))
    everything = torch.arange(grid * grid, device=DEV).expand(batch, -1)
    preds = [torch.randn(batch, grid * grid, *p.shape[2:], device=DEV).requires_grad_() for p in preds[:3]]
    preds.append(torch.randn(batch, 4, 300, device=DEV, requires_grad=True))
    args = (targets, mask, everything, torch.arange(4, device=DEV).expand(batch, -1).contiguous(), grid)
    got, want = rl.recon_loss(preds, *args), rl.recon_loss_ref(preds, *args)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    got_grads = grads(got, preds)
    for a, b in zip(got_grads, grads(want, preds)):
        assert_rel_close(a, b, 1e-6)
    visible = (mask == 0).nonzero()
    assert (got_grads[2][visible[:, 0], visible[:, 1]] == 0).all()  # weight 0 -> no gradient


def test_full_layout_equals_spec_masked_mse():
    """With idx = every patch the kernel is the method's loss over full maps (scale_weights + masked_mse)."""
    batch, grid = 3, 4
    mask = make_mask(batch, grid, 0.75)
    full = [torch.randn(batch, int(grid * s) ** 2, 27, device=DEV, requires_grad=True) for s in SCALES]
    targets = [torch.randn_like(p) for p in full]
    idx = torch.arange(grid * grid, device=DEV).expand(batch, -1)
    compact = []
    for k, sub in enumerate(rl.SUBS[:3]):
        cells = rl.cell_index(idx, grid, sub).flatten(1)
        compact.append(full[k].gather(1, cells.unsqueeze(-1).expand(-1, -1, 27)).view(batch, grid * grid, -1, 27))
    compact[2] = compact[2].squeeze(2)
    compact.append(full[3])
    gidx = torch.arange(4, device=DEV).expand(batch, -1)
    got = rl.recon_loss(compact, targets, mask, idx, gidx, grid)
    want = torch.stack([masked_mse(p, t, scale_weights(mask, grid, s)) for p, t, s in zip(full, targets, SCALES)])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads(got, full), grads(want, full)):
        assert_rel_close(a, b, 1e-6)


def make_heads(dim, out, grid, dtype=torch.float32, seed=0):
    """ScaleHeads with every parameter random (LN and biases too, so a mix-up of any of them shows)."""
    torch.manual_seed(seed)
    heads = torch.nn.ModuleList(ScaleHead(dim, out, s, grid) for s in SCALES)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 1.0))
    return heads.to(DEV, dtype)


def spec_heads_and_loss(heads, tokens, targets, mask, grid):
    """method 2.3 step 6 + 2.4, literally: full-map heads, upsampled/averaged weights, masked MSE."""
    preds = [head(x) for head, x in zip(heads, tokens)]
    return torch.stack([masked_mse(p, t, scale_weights(mask, grid, s)) for p, t, s in zip(preds, targets, SCALES)])


def heads_case(batch, grid, ratio, dim=32, out=27, dtype=torch.float32, seed=0):
    heads = make_heads(dim, out, grid, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(batch, grid * grid, dim, generator=g).to(DEV, dtype).requires_grad_() for _ in SCALES]
    targets = [torch.rand(batch, int(grid * s) ** 2, out, generator=g).to(DEV) for s in SCALES]
    mask = make_mask(batch, grid, ratio, seed)
    return heads, tokens, targets, mask


def fast_losses(heads, tokens, targets, mask, grid):
    num_masked = int(mask.sum(1).max())
    return torch.stack(heads_and_loss(list(heads), tokens, targets, mask, grid, num_masked)[1])


@pytest.mark.parametrize("batch,grid,ratio", [(3, 4, 0.5), (5, 6, 0.75), (1, 4, 0.9), (2, 4, 0.1)])
def test_fast_heads_and_kernel_equal_spec_fp32(batch, grid, ratio):
    heads, tokens, targets, mask = heads_case(batch, grid, ratio)
    inputs = [*tokens, *heads.parameters()]
    got = fast_losses(heads, tokens, targets, mask, grid)
    want = spec_heads_and_loss(heads, tokens, targets, mask, grid)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    names = [f"tokens[{k}]" for k in range(4)] + [n for n, _ in heads.named_parameters()]
    for name, a, b in zip(names, grads(got, inputs), grads(want, inputs)):
        assert a.shape == b.shape, name
        assert_rel_close(a, b, 1e-5)  # every gradient: tokens, up1 / up2 (transposed convs), LN, proj


def test_fast_heads_and_kernel_fp16_within_twice_torch_error():
    """fp16 heads + loss: the fast path's error against fp32 is at most twice the reference path's own fp16 error."""
    batch, grid, ratio = 3, 4, 0.75
    heads, tokens, targets, mask = heads_case(batch, grid, ratio)
    inputs32 = [*tokens, *heads.parameters()]
    want = spec_heads_and_loss(heads, tokens, targets, mask, grid)
    want_grads = grads(want, inputs32)
    heads16 = make_heads(32, 27, grid, torch.float16)
    tokens16 = [x.detach().half().requires_grad_() for x in tokens]
    inputs16 = [*tokens16, *heads16.parameters()]
    results = {}
    for name, fn in [("spec", spec_heads_and_loss), ("fast", fast_losses)]:
        losses = fn(heads16, tokens16, targets, mask, grid)
        results[name] = [losses, *grads(losses, inputs16)]
    assert all(g.dtype == torch.float16 for g in results["fast"][1:])
    for i, (fast, spec, ref) in enumerate(zip(results["fast"], results["spec"], [want, *want_grads])):
        scale = ref.abs().max().item()
        err_fast = (fast.double() - ref.double()).abs().max().item()
        err_spec = (spec.double() - ref.double()).abs().max().item()
        assert err_fast <= 2 * err_spec + 1e-3 * scale, f"output {i}: {err_fast:.3g} vs torch fp16 {err_spec:.3g}"


def test_no_grad_skips_the_residual_and_gives_the_same_loss():
    preds, targets, mask, sel = compact_inputs(3, 4, 0.75)
    args = (targets, mask, sel.idx, sel.gidx, 4)
    with torch.no_grad():
        losses, residual = rl._recon_loss_op(preds, *args, False, list(rl.SUBS))
        assert residual.numel() == 0
        torch.testing.assert_close(losses, rl.recon_loss(preds, *args), rtol=0, atol=0)
    losses_with, residual = rl._recon_loss_op(preds, *args, True, list(rl.SUBS))
    assert residual.numel() == sum(p.numel() for p in preds)
    torch.testing.assert_close(losses, losses_with, rtol=0, atol=0)


def test_loss_is_bitwise_reproducible_and_nan_without_masked_patches():
    preds, targets, mask, sel = compact_inputs(3, 4, 0.75)
    args = (targets, mask, sel.idx, sel.gidx, 4)
    assert torch.equal(rl.recon_loss(preds, *args), rl.recon_loss(preds, *args))
    empty = [p[:, :0].detach() for p in preds]
    no_mask = torch.zeros_like(mask)
    got = rl.recon_loss(empty, targets, no_mask, sel.idx[:, :0], sel.gidx[:, :0], 4)
    assert torch.isnan(got).all()  # 0 / 0, as the method's masked mean over an all-visible batch
    spec_targets = [torch.randn(3, n, 3, device=DEV) for n in (256, 64, 16, 4)]
    spec = spec_heads_and_loss(make_heads(8, 3, 4), [torch.randn(3, 16, 8, device=DEV)] * 4, spec_targets, no_mask, 4)
    assert torch.isnan(spec).all()


def test_input_checks():
    preds, targets, mask, sel = compact_inputs(2, 4, 0.75)
    with pytest.raises(ValueError, match="compact layout"):
        rl.recon_loss_fwd([preds[1], *preds[1:]], targets, mask, sel.idx, sel.gidx, 4)
    with pytest.raises(ValueError, match=r"targets\[2\]"):
        rl.recon_loss_fwd(preds, [*targets[:2], targets[1], targets[3]], mask, sel.idx, sel.gidx, 4)
    with pytest.raises(ValueError, match="one dtype"):
        rl.recon_loss_fwd([preds[0].half(), *preds[1:]], targets, mask, sel.idx, sel.gidx, 4)
    with pytest.raises(ValueError, match="at most one 0"):
        rl.recon_loss_fwd(preds, targets, mask, sel.idx, sel.gidx, 4, subs=(4, 2, 0, 0))
    with pytest.raises(ValueError, match="detached targets"):
        rl.recon_loss(preds, [t.requires_grad_() for t in targets], mask, sel.idx, sel.gidx, 4)


def test_custom_op_registration_and_compile_without_graph_break():
    preds, targets, mask, sel = compact_inputs(2, 4, 0.75)
    torch.library.opcheck(
        rl._recon_loss_op,
        (preds, targets, mask, sel.idx, sel.gidx, 4, True, list(rl.SUBS)),
        test_utils=("test_autograd_registration", "test_faketensor"),
    )
    fn = torch.compile(
        lambda *p: rl.recon_loss(list(p), targets, mask, sel.idx, sel.gidx, 4), backend="aot_eager", fullgraph=True
    )
    got = fn(*preds)
    want = rl.recon_loss_ref(preds, targets, mask, sel.idx, sel.gidx, 4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads(got, preds), grads(want, preds)):
        assert_rel_close(a, b, 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_vit_base_shapes_within_twice_torch_error(dtype):
    """ViT-B head shapes (C = 256, 27 outputs, 14 x 14 patches) on CUDA under autocast, as training runs them."""
    assert not INTERPRETED, "run gpu tests with TRITON_INTERPRET=0: they must test the compiled kernels"
    batch, grid = 16, 14
    heads, tokens, targets, mask = heads_case(batch, grid, 0.75, dim=256)
    inputs = [*tokens, *heads.parameters()]
    heads64 = copy.deepcopy(heads).double()  # fp64: no TF32 in cuDNN's transposed convolutions
    tokens64 = [x.detach().double().requires_grad_() for x in tokens]
    ref = spec_heads_and_loss(heads64, tokens64, targets, mask, grid)
    ref_grads = grads(ref, [*tokens64, *heads64.parameters()])
    results = {}
    for name, fn in [("spec", spec_heads_and_loss), ("fast", fast_losses)]:
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            losses = fn(heads, tokens, targets, mask, grid)
        results[name] = [losses, *grads(losses, inputs)]
    for i, (fast, spec, want) in enumerate(zip(results["fast"], results["spec"], [ref, *ref_grads])):
        scale = want.abs().max().item()
        err_fast = (fast.double() - want.double()).abs().max().item()
        err_spec = (spec.double() - want.double()).abs().max().item()
        assert err_fast <= 2 * err_spec + 1e-4 * scale, f"output {i}: {err_fast:.3g} vs torch {err_spec:.3g}"


def test_bench_heads_loss_gate_passes_the_kernel_and_fails_a_wrong_provider():
    """benchmarks/bench_recon_loss.py: its triton provider (the kernel, here interpreted) passes the fp32 gate, and
    the gate's tolerances catch a 0.1 % error."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_recon_loss.py"
    spec = importlib.util.spec_from_file_location("bench_recon_loss", path)
    bench_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_module)
    bench = bench_module.make_bench(DEV, quick=True)
    case = bench.cases[0]
    for mode in ("fwd", "full"):
        assert check_provider(bench, "triton", case, mode) < 1e-6
    fast = bench.providers["triton"]
    bench.providers["wrong"] = lambda *inputs: fast(*inputs) * 1.001
    with pytest.raises(CorrectnessError):
        check_provider(bench, "wrong", case, "full")
