"""fastmim.models.fast_heads and LocalMIMViT(impl="fast"): cell selection, the per-token heads against ScaleHead on
full maps (values and every parameter gradient), the lazily scattered predictions, and the whole model against
impl="reference" (loss, per-scale losses, every gradient, a few optimizer steps).

The loss runs through the Triton interpreter when TRITON_INTERPRET=1 is set (as in the full suite, by
tests/kernels/conftest.py), else through its PyTorch reference; both must agree with the reference model.
"""

import pytest
import torch

from fastmim import create_model
from fastmim.masking import num_kept, random_masking, scale_weights
from fastmim.models.decoder import ScaleHead
from fastmim.models.fast_heads import predict_cells, scatter_cells, select_cells

SCALES = (4, 2, 1, 0.5)
TINY = {"img_size": 64, "embed_dim": 32, "depth": 4, "num_heads": 2, "decoder_dim": 32, "decoder_heads": 2}


def make_mask(batch, grid, ratio, seed=0):
    noise = torch.rand(batch, grid * grid, generator=torch.Generator().manual_seed(seed))
    return random_masking(noise, ratio).mask


def selection(mask, grid, ratio):
    return select_cells(mask, grid, grid * grid - num_kept(grid * grid, ratio))


@pytest.mark.parametrize("grid,ratio", [(4, 0.75), (6, 0.5), (4, 0.1), (4, 0.9)])
def test_select_cells(grid, ratio):
    mask = make_mask(5, grid, ratio)
    sel = selection(mask, grid, ratio)
    for b in range(5):
        assert sel.idx[b].tolist() == mask[b].nonzero().flatten().tolist()  # every masked patch, raster order
    groups = scale_weights(mask, grid, 0.5) > 0
    n_grp = sel.gidx.shape[1]
    assert n_grp == min((grid // 2) ** 2, sel.idx.shape[1])
    for b in range(5):
        picked = sel.gidx[b].tolist()
        assert len(set(picked)) == n_grp and set(groups[b].nonzero().flatten().tolist()) <= set(picked)


def test_select_cells_pads_rows_with_fewer_masked_patches():
    mask = torch.tensor([[1.0, 1, 1, 0] * 4, [0.0, 0, 1, 0] * 4])
    sel = select_cells(mask, 4, 12)
    assert sel.idx.shape == (2, 12) and sel.gidx.shape == (2, 4)
    assert mask.gather(1, sel.idx)[1].sum() == 4  # 4 masked patches, then 8 visible ones (loss weight 0)


def random_heads(dim, out, grid, seed=0):
    torch.manual_seed(seed)
    heads = torch.nn.ModuleList(ScaleHead(dim, out, s, grid) for s in SCALES)
    with torch.no_grad():
        for p in heads.parameters():  # LN and biases random too, so a mix-up of any parameter shows
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 1.0))
    return heads


def gathered(full, sel, grid, k):
    """ScaleHead's full-map predictions [B, N_k, out] at the compact cells (the layout of predict_cells)."""
    from fastmim.kernels.recon_loss import cell_index

    sub = (4, 2, 1, 0)[k]
    cells = cell_index(sel.idx, grid, sub).flatten(1) if sub else sel.gidx
    picked = full.gather(1, cells.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    return picked.view(sel.idx.shape[0], -1, *([sub * sub] if sub > 1 else []), full.shape[-1])


@pytest.mark.parametrize("grid,ratio", [(4, 0.75), (6, 0.5)])
def test_predict_cells_equals_scale_head(grid, ratio):
    batch, dim, out = 3, 32, 11
    heads = random_heads(dim, out, grid)
    mask = make_mask(batch, grid, ratio)
    sel = selection(mask, grid, ratio)
    tokens = torch.randn(batch, grid * grid, dim, requires_grad=True)
    for k, head in enumerate(heads):
        fast = predict_cells(head, tokens, sel)
        want = gathered(head(tokens), sel, grid, k)
        assert fast.shape == want.shape
        torch.testing.assert_close(fast, want, rtol=1e-5, atol=1e-5)
        upstream = torch.randn_like(fast)
        inputs = [tokens, *head.parameters()]
        for a, b in zip(torch.autograd.grad(fast, inputs, upstream), torch.autograd.grad(want, inputs, upstream)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_scatter_cells_places_every_prediction():
    grid, batch = 4, 2
    mask = make_mask(batch, grid, 0.75)
    sel = selection(mask, grid, 0.75)
    heads = random_heads(16, 5, grid)
    tokens = torch.randn(batch, grid * grid, 16)
    for k, (head, s) in enumerate(zip(heads, SCALES)):
        full = scatter_cells(predict_cells(head, tokens, sel), sel, grid, k)
        weight = scale_weights(mask, grid, s) > 0
        torch.testing.assert_close(full[weight], head(tokens)[weight], rtol=1e-5, atol=1e-5)
        assert (full[~weight] == 0).all()


def tiny_pair(**overrides):
    torch.manual_seed(0)
    ref = create_model("localmim_vit_small_patch16", **TINY, **overrides)
    fast = create_model("localmim_vit_small_patch16", impl="fast", **TINY, **overrides)
    assert list(fast.state_dict()) == list(ref.state_dict())  # same parameters and names: released import unchanged
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def assert_same_grads(ref, fast, tol):
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            err = (p.grad - q.grad).abs().max().item()
            assert err <= tol * p.grad.abs().max().item(), f"{name}: {err:.3g}"


@pytest.mark.parametrize("target", ["hog", "pixel"])
def test_fast_model_matches_reference(target):
    ref, fast = tiny_pair(target=target)
    imgs, noise = torch.randn(3, 3, 64, 64), torch.rand(3, 16)
    a, b = ref(imgs, noise), fast(imgs, noise)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(b.losses), torch.stack(a.losses), rtol=1e-5, atol=1e-6)
    assert torch.equal(a.mask, b.mask)
    upstream = torch.randn(4)
    torch.autograd.backward(a.losses, list(upstream))
    torch.autograd.backward(b.losses, list(upstream))
    assert_same_grads(ref, fast, 1e-5)
    # preds: the reference's shapes; equal where the loss sees them, zero elsewhere, built once
    assert len(b.preds) == 4 and [p.shape for p in b.preds] == [p.shape for p in a.preds]
    for k, s in enumerate(SCALES):
        weight = scale_weights(a.mask, 4, s) > 0
        torch.testing.assert_close(b.preds[k][weight], a.preds[k][weight], rtol=1e-5, atol=1e-5)
        assert (b.preds[k][~weight] == 0).all() and b.preds[k] is b.preds[k]
    assert [tuple(p.shape[:2]) for p in b.preds.compact] == [(3, 12)] * 3 + [(3, 4)]


def test_fast_training_steps_track_reference():
    ref, fast = tiny_pair()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (ref, fast)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        imgs, noise = torch.randn(2, 3, 64, 64, generator=gen), torch.rand(2, 16, generator=gen)
        losses = []
        for model, opt in zip((ref, fast), opts):
            out = model(imgs, noise)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(out.loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_fast_model_all_visible_but_one_and_batch_of_one():
    ref, fast = tiny_pair(mask_ratio=0.97)  # 16 patches: one kept
    imgs, noise = torch.randn(1, 3, 64, 64), torch.rand(1, 16)
    a, b = ref(imgs, noise), fast(imgs, noise)
    assert int(a.mask.sum()) == 15
    torch.testing.assert_close(torch.stack(b.losses), torch.stack(a.losses), rtol=1e-5, atol=1e-6)
    a.loss.backward()
    b.loss.backward()
    assert_same_grads(ref, fast, 1e-5)
