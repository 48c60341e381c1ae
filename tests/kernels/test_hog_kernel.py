"""fastmim.kernels.hog: the fused multi-scale HOG kernel against hog_ref (method 3.1, 3.3), bins at exact bin edges
against exact arithmetic, the dispatch in hog() / HOGTarget / LocalMIM, and the benchmark's correctness gate.

Runs on CUDA when there is one, else on CPU through Triton's interpreter (tests/kernels/conftest.py sets
TRITON_INTERPRET=1 unless the environment says otherwise), on small images: the interpreter runs programs one by one
(one program per largest-cell tile of an image). The gpu-marked test needs TRITON_INTERPRET=0 (compiled kernels).

Where a pixel's angle lies within rounding of a bin edge, the kernel (exact edge tests) and hog_ref (fp32 atan2 and
division) may legitimately choose different bins: comparisons exclude the cells holding such pixels, found in fp64,
and bound how many there are.
"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastmim.bench.harness import check_provider
from fastmim.kernels import hog as hk
from fastmim.kernels._common import INTERPRETED
from fastmim.models.localmim import LocalMIMViT
from fastmim.targets import HOGTarget

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VIT = (4, 8, 16, 32)
SWIN = (8, 16, 32, 32)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def setup_module():
    assert hk._use_kernel(torch.zeros(1, device=DEV)), "no kernel can run: CPU needs TRITON_INTERPRET=1 before import"


def images(b, h, w, seed=0):
    """Smooth + noisy float images (every orientation and a range of magnitudes occurs)."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(b, 3, h // 4, w // 4, generator=g), size=(h, w), mode="bilinear")
    return (base + 0.1 * torch.randn(b, 3, h, w, generator=g)).to(DEV)


def ambiguous_pixels(img, nbins, bias_row=None, mean=None, std=None):
    """Pixels [B, 3, H, W] whose bin the fp32 reference may get wrong: within 1e-5 of a bin edge in exact (fp64)
    arithmetic, unless the reference's own fp32 gradient is exactly on the edge (G0 = 0: bin 0; G1 = 0: n / 2), where
    atan2 and the division are exact too (e.g. the border columns: reflection makes their G0 exactly 0)."""
    b, c, h, w = img.shape
    g0, g1 = (g.view(b, c, h, w) for g in hk._sobel(img.double().reshape(b * c, h, w)))
    x32 = img.float()
    if std is not None:  # uint8: exact integer gradients scaled by 1 / (255 std); the reference normalises in fp32
        s = 255 * torch.tensor(std, dtype=torch.float64, device=img.device).view(1, 3, 1, 1)
        g0, g1 = g0 / s, g1 / s
        m32, s32 = (torch.tensor(v, device=img.device).view(1, 3, 1, 1) for v in (mean, std))
        x32 = (x32 / 255 - m32) / s32
    r0, r1 = (g.view(b, c, h, w) for g in hk._sobel(x32.reshape(b * c, h, w)))
    if bias_row is not None:
        g0, g1 = g0 + bias_row[0].double(), g1 + bias_row[1].double()
        r0, r1 = r0 + bias_row[0].float(), r1 + bias_row[1].float()
    v = torch.atan2(g0, g1) / math.pi * nbins
    return ((v - v.round()).abs() < 1e-5) & (r0 != 0) & (r1 != 0)


def assert_matches_ref(out, ref, img, cells, nbins, bias=None, mean=None, std=None, atol=1e-5, max_ties=1e-3):
    """out == ref within atol except in cells holding an ambiguous pixel; at most max_ties of the pixels are."""
    assert len(out) == len(ref) == len(cells)
    b, _, h, w = img.shape
    for k, cell in enumerate(cells):
        assert out[k].shape == ref[k].shape == (b, (h // cell) * (w // cell), 3 * nbins)
        assert out[k].dtype == torch.float32 and out[k].device == img.device
        near = ambiguous_pixels(img, nbins, None if bias is None else bias[k], mean, std)
        assert near.double().mean() <= max_ties
        tie_cells = F.max_pool2d(near.any(1, keepdim=True).double(), cell).flatten(1).bool()  # [B, N]
        diff = (out[k] - ref[k]).abs().amax(-1)
        assert (diff[~tie_cells] <= atol).all(), f"scale {cell}: {diff[~tie_cells].max():.3g} away from bin edges"


@pytest.mark.parametrize(
    "shape,cells,nbins,biased",
    [
        ((2, 3, 32, 32), VIT, 9, False),
        ((1, 3, 32, 32), VIT, 18, True),
        ((1, 3, 32, 64), SWIN, 18, True),
        ((2, 3, 64, 32), SWIN, 18, False),  # two equal 32 px scales pooled from the same sums (hog_bias=off)
        ((1, 3, 96, 64), VIT, 9, False),
        ((1, 3, 32, 48), (2, 4, 8, 16), 9, False),
        ((1, 3, 32, 32), (8, 4, 32, 16), 18, False),
    ],
    ids=["vit", "vit-18-bias", "swin-18-bias", "swin-18", "96x64", "32x48-patch8", "unsorted-18"],
)
def test_matches_reference_on_random_images(shape, cells, nbins, biased):
    img = images(*shape[:1], *shape[2:], seed=sum(shape))
    bias = (torch.rand(len(cells), 2, generator=torch.Generator().manual_seed(1)) * 2 / 3 - 1 / 3).to(DEV)
    bias = bias if biased else None
    out = hk.hog_fwd(img, cells, nbins, bias)
    assert_matches_ref(out, hk.hog_ref(img, cells, nbins, bias), img, cells, nbins, bias)
    for t in out:  # L2-normalised over the bins of each cell and channel, non-negative
        assert t.min() >= 0
        torch.testing.assert_close(t.view(*t.shape[:2], 3, nbins).norm(dim=-1), torch.ones(*t.shape[:2], 3, device=DEV))


@pytest.mark.parametrize("biased", [False, True])
def test_uint8_pixels_normalised_in_the_kernel(biased):
    g = torch.Generator().manual_seed(2)
    img = torch.randint(0, 256, (1, 3, 32, 32), generator=g, dtype=torch.uint8).to(DEV)
    if biased:  # the normalisation matters: against the reference on the normalised image
        bias = torch.tensor([[0.3, -0.1], [0.15, 0.2], [-0.25, 0.05], [0.1, 0.1]], device=DEV)
        out = hk.hog(img, VIT, 9, bias, mean=MEAN, std=STD)
        assert_matches_ref(out, hk.hog_ref(img, VIT, 9, bias, mean=MEAN, std=STD), img, VIT, 9, bias, MEAN, STD)
    else:  # the normalisation cancels: against the reference on the raw pixels, whose integer gradients are exact
        # (the reference on the normalised image misses the exact ties, e.g. G0 = 0, that ~0.1 % of pixels hit)
        out = hk.hog(img, VIT, 9, mean=MEAN, std=STD)
        assert_matches_ref(out, hk.hog_ref(img.float(), VIT, 9), img.float(), VIT, 9)


def test_bf16_output():
    img = images(1, 32, 32, seed=3)
    out = hk.hog_fwd(img, VIT, 9, out_dtype=torch.bfloat16)
    ref = hk.hog_ref(img, VIT, 9)
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=0, atol=4e-3)  # bf16 rounding of values <= 1: <= 2^-8


def exact_bins(img, nbins):
    """Bins in exact arithmetic for integer-valued images [B, 3, H, W]: the gradients are exact in fp64; an angle on
    a bin edge is exactly on it (G0 = 0, G1 = 0 or |G0| = |G1|: the only rational directions), where floor gives the
    edge's own index."""
    b, c, h, w = img.shape
    g0, g1 = hk._sobel(img.double().reshape(b * c, h, w))
    v = torch.atan2(g0, g1) / math.pi * nbins
    on_edge = (v - v.round()).abs() < 1e-9
    assert ((g0 == 0) | (g1 == 0) | (g0.abs() == g1.abs()))[on_edge].all()
    bins = torch.where(on_edge, v.round(), v.floor()).remainder(nbins).long()
    return bins.view(b, c, h, w), on_edge.view(b, c, h, w), (g0 * g0 + g1 * g1 > 0).view(b, c, h, w)


def pixel_bins(targets_1px, b, h, w, nbins):
    """Per-pixel bins from cell-size-1 targets (each pixel's normalised histogram is its one-hot bin)."""
    return targets_1px.view(b, h, w, 3, nbins).argmax(-1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("nbins", [9, 18, 4])
def test_bins_at_exact_edges_match_exact_arithmetic(nbins):
    """Ramps (horizontal, vertical, diagonal, anti-diagonal) and random small integers put many pixels exactly on
    edges: 0 degrees (G0 = 0, both signs of G1), 90 (an edge for even nbins) and 45 / 135 (edges for nbins = 4)."""
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    noise = torch.randint(0, 4, (3, 16, 16), generator=torch.Generator().manual_seed(4)).float()
    img = torch.stack([torch.stack([xs, ys, xs + ys]), torch.stack([xs - 2 * ys, noise[0], 3 * noise[1] - xs])])
    img = img.to(DEV)
    truth, on_edge, moving = exact_bins(img, nbins)
    assert on_edge[moving].sum() >= 100  # the image really is full of ties
    got = pixel_bins(hk.hog_fwd(img, (1, 16), nbins)[0], 2, 16, 16, nbins)
    assert torch.equal(got[moving], truth[moving])
    ref = pixel_bins(hk.hog_ref(img, (1, 16), nbins)[0], 2, 16, 16, nbins)
    wrong = (ref != truth) & moving
    assert (wrong <= on_edge).all()  # the fp32 reference may err, but only on exact edges


def test_reflect_border_and_single_bright_pixel():
    img = torch.zeros(2, 3, 16, 16, device=DEV)
    img[0, :, :, 0] = 1.0  # a step between columns 0 and 1 on the left border
    img[0, :, 15, :] += 2.0  # and between rows 14 and 15 on the bottom border
    img[1, 0, 0, 0] = img[1, 1, 7, 9] = img[1, 2, 15, 3] = 1.0  # bright pixels: a corner, inside, on the border
    out = hk.hog_fwd(img, (1, 16), 9)
    ref = hk.hog_ref(img, (1, 16), 9)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    px = out[0].view(2, 16, 16, 3, 9)
    # reflect padding mirrors column 1 into column -1 and row 14 into row 16: the border pixels' own gradients across
    # the step cancel (zero or replicate padding would give them a gradient), the neighbours' do not
    assert torch.equal(px[0, :14, 0], torch.zeros(14, 3, 9)) and (px[0, :14, 1].sum(-1) == 1).all()
    assert (px[0, 14, 2:].sum(-1) == 1).all() and torch.equal(px[0, 15, 2:], torch.zeros(14, 3, 9))
    moving = px[1].sum(-1) > 0  # [16, 16, 3]: only pixels whose 3 x 3 neighbourhood holds the bright pixel
    # the corner: its 3 neighbours, while (0, 0) itself sees its mirror images on both sides and cancels
    assert moving[:, :, 0].sum() == 3 and moving[:2, :2, 0].sum() == 3 and not moving[0, 0, 0]
    assert moving[:, :, 1].sum() == 8 and moving[6:9, 8:11, 1].sum() == 8  # inside: the 8 neighbours, not the centre
    assert moving[:, :, 2].sum() == 5 and moving[14:16, 2:5, 2].sum() == 5  # the bottom border: 5 neighbours


def test_constant_image_gives_zero_histograms_and_bias_one_orientation():
    img = torch.full((1, 3, 32, 32), 0.75, device=DEV)  # exactly representable: the Sobel sums cancel exactly
    for t in hk.hog_fwd(img, VIT, 9):
        assert torch.equal(t, torch.zeros_like(t))
    bias = torch.tensor([[0.2, 0.0], [0.0, -0.3], [-0.1, -0.1], [0.0, 0.0]], device=DEV)
    out = hk.hog_fwd(img, VIT, 9, bias)
    # (0.2, 0): theta = 90 deg -> bin 4; (0, -0.3): theta = 180 = 0 deg -> bin 0; (-0.1, -0.1): -135 = 45 deg -> bin 2
    for t, expected in zip(out[:3], (4, 0, 2)):
        per_channel = t.view(-1, 3, 9)
        assert torch.equal(per_channel.argmax(-1), torch.full_like(per_channel[..., 0], expected, dtype=torch.long))
        torch.testing.assert_close(per_channel.amax(-1), torch.ones_like(per_channel[..., 0]))
    assert torch.equal(out[3], torch.zeros_like(out[3]))  # a zero bias on a flat image: no gradient at all


def test_hog_dispatch_and_input_checks(monkeypatch):
    calls = []
    monkeypatch.setattr(hk, "hog_fwd", lambda *a, **k: calls.append(1) or [])
    img = images(1, 24, 24, seed=5)
    assert hk.hog(img, (4, 8), 9) == [] and len(calls) == 1  # the kernel where it can run
    for args in [(img.double(), (4, 8)), (img, (3, 6)), (img, (2, 2, 2, 4, 8))]:  # fp64, not powers of two, 5 scales
        out = hk.hog(*args, 9)
        for a, b in zip(out, hk.hog_ref(*args, 9)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(calls) == 1
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        hk.hog_fwd(img[:, :2], (4, 8))
    with pytest.raises(ValueError, match="divisor"):
        hk.hog_fwd(img, (16,))
    with pytest.raises(ValueError, match="mean and std"):
        hk.hog(img.to(torch.uint8), (4, 8))
    with pytest.raises(ValueError, match=r"bias must be \[2, 2\]"):
        hk.hog_fwd(img, (4, 8), bias=torch.zeros(3, 2, device=DEV))
    with pytest.raises(ValueError, match="power-of-two cell sizes"):
        hk.hog_fwd(img, (3, 6))


def test_custom_op_is_opaque_to_torch_compile():
    img = images(1, 8, 8, seed=6)
    torch.library.opcheck(torch.ops.fastmim.hog.default, (img, None, [4, 8], 9, None, torch.float32))
    target = HOGTarget((4, 8), nbins=9, impl="fast").to(DEV)
    compiled = torch.compile(target.forward, fullgraph=True, backend="eager")
    for a, b in zip(compiled(img), hk.hog_ref(img, (4, 8), 9)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hog_target_and_localmim_fast_match_reference(monkeypatch):
    kernel_calls = []
    original = hk.hog_fwd
    monkeypatch.setattr(hk, "hog_fwd", lambda *a, **k: kernel_calls.append(1) or original(*a, **k))
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2, decoder_dim=16, decoder_heads=2)
    ref = LocalMIMViT(**kw, impl="reference").to(DEV)
    fast = LocalMIMViT(**kw, impl="fast").to(DEV)
    fast.load_state_dict(ref.state_dict())
    assert fast.target.impl == "fast" and ref.target.impl == "reference"
    imgs, noise = images(2, 32, 32, seed=7), torch.rand(2, 4, generator=torch.Generator().manual_seed(8)).to(DEV)
    out_ref = ref(imgs, noise)
    assert kernel_calls == []
    out_fast = fast(imgs, noise)
    assert kernel_calls == [1]
    for a, b in zip(out_fast.targets, out_ref.targets):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_fast.loss, out_ref.loss, rtol=1e-5, atol=1e-6)


def test_bench_gate_runs_the_triton_provider():
    """benchmarks/bench_hog.py: the triton provider (here interpreted) passes the gate that precedes any timing."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_hog.py"
    spec = importlib.util.spec_from_file_location("bench_hog", path)
    bench_hog = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_hog)
    bench = bench_hog.make_bench(DEV, quick=True)
    assert check_provider(bench, "triton", bench.cases[0], "fwd") < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gpu_vit_base_batch(out_dtype):
    """B = 64, 224 px on CUDA, compiled: real-valued images against hog_ref with ties bounded; bf16 output within
    bf16 rounding of the fp32 reference."""
    assert not INTERPRETED, "run gpu tests with TRITON_INTERPRET=0: they must test the compiled kernels"
    img = images(64, 224, 224, seed=9)
    out = hk.hog_fwd(img, VIT, 9, out_dtype=out_dtype)
    ref = hk.hog_ref(img, VIT, 9)
    if out_dtype == torch.float32:
        assert_matches_ref(out, ref, img, VIT, 9)
    else:
        for a, b in zip(out, ref):
            near = (a.float() - b).abs().amax(-1) > 4e-3
            assert near.double().mean() <= 1e-3
    bias = torch.rand(4, 2, device=DEV) * 2 / 3 - 1 / 3
    out = hk.hog_fwd(img[:16], SWIN, 18, bias)
    assert_matches_ref(out, hk.hog_ref(img[:16], SWIN, 18, bias), img[:16], SWIN, 18, bias)
