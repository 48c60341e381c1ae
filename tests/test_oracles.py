"""Sanity tests of the method-literal oracle itself (tests/oracles.py). Fast, CPU, float64."""

import math

import pytest
import torch

from tests.oracles import (
    ReleasedLocalMIMViT,
    ReleasedMAEViT,
    literal_hog,
    literal_mask_weights,
    literal_pixel_target,
    literal_random_masking,
    sincos_pos_embed_2d,
    sobel_weight,
)

BLOCK_KEYS = [
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
]

TINY = {
    "img_size": 64,
    "patch_size": 16,
    "embed_dim": 32,
    "depth": 8,
    "num_heads": 4,
    "decoder_dim": 32,
    "decoder_heads": 4,
}


@pytest.fixture(autouse=True)
def _fp64_seeded(fp64):
    """Every test in float64 (tests/conftest.py) from seed 0."""
    torch.manual_seed(0)


def expected_localmim_keys(depth, hog_bias):
    keys = {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed"}
    for i in range(depth):
        keys |= {f"blocks.{i}.{k}" for k in BLOCK_KEYS}
    for k in range(4):
        keys |= {f"norm.{k}.weight", f"norm.{k}.bias"}
        d = f"decoder.{k}"
        keys |= {f"{d}.embed.weight", f"{d}.embed.bias", f"{d}.mask_token", f"{d}.pos_embed"}
        keys |= {f"{d}.blocks.0.{b}" for b in BLOCK_KEYS}
        keys |= {f"{d}.norm.weight", f"{d}.norm.bias"}
        pred_idx = {0: [0, 1, 3, 4], 1: [0, 1], 2: [0], 3: [1]}[k]
        keys |= {f"{d}.pred.{j}.{w}" for j in pred_idx for w in ("weight", "bias")}
        keys.add(f"hog_enc.{k}.conv.weight")
        if hog_bias:
            keys.add(f"hog_enc.{k}.conv.bias")
    return keys


@pytest.mark.parametrize("hog_bias", [False, True])
def test_localmim_state_dict_keys(hog_bias):
    model = ReleasedLocalMIMViT(**TINY, hog_bias=hog_bias)
    sd = model.state_dict()
    assert set(sd) == expected_localmim_keys(TINY["depth"], hog_bias)
    C = TINY["decoder_dim"]
    # ConvTranspose weights are in x out x 2 x 2, conv weights out x in x 1 x 1 (method 9)
    assert sd["decoder.0.pred.0.weight"].shape == (C, C // 2, 2, 2)
    assert sd["decoder.0.pred.1.weight"].shape == (C // 2,)
    assert sd["decoder.0.pred.3.weight"].shape == (C // 2, C // 4, 2, 2)
    assert sd["decoder.0.pred.4.weight"].shape == (27, C // 4, 1, 1)
    assert sd["decoder.1.pred.0.weight"].shape == (C, C // 2, 2, 2)
    assert sd["decoder.1.pred.1.weight"].shape == (27, C // 2, 1, 1)
    assert sd["decoder.2.pred.0.weight"].shape == (27, C, 1, 1)
    assert sd["decoder.3.pred.1.weight"].shape == (27, C, 1, 1)
    assert sd["cls_token"].shape == (1, 1, 32)
    assert sd["pos_embed"].shape == (1, 17, 32)
    assert sd["decoder.0.pos_embed"].shape == (1, 17, C)
    assert sd["hog_enc.0.conv.weight"].shape == (2, 1, 3, 3)
    assert model.taps == [1, 3, 5, 7]
    # a state dict round-trips strictly into a fresh model
    ReleasedLocalMIMViT(**TINY, hog_bias=hog_bias).load_state_dict(sd, strict=True)


def test_mae_state_dict_keys():
    depth, ddepth = 4, 2
    model = ReleasedMAEViT(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=depth,
        num_heads=4,
        decoder_dim=16,
        decoder_depth=ddepth,
        decoder_heads=2,
    )
    keys = {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "norm.weight", "norm.bias"}
    for i in range(depth):
        keys |= {f"blocks.{i}.{k}" for k in BLOCK_KEYS}
    keys |= {"decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed"}
    for i in range(ddepth):
        keys |= {f"decoder_blocks.{i}.{k}" for k in BLOCK_KEYS}
    keys |= {"decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    sd = model.state_dict()
    assert set(sd) == keys
    assert sd["decoder_pred.weight"].shape == (8 * 8 * 3, 16)
    assert sd["decoder_pos_embed"].shape == (1, 17, 16)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def test_mae_default_sizes():
    # released MAE decoder: 8 blocks, 16 heads, width 512 (built at tiny encoder size to stay fast)
    model = ReleasedMAEViT(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    assert len(model.decoder_blocks) == 8
    assert model.decoder_blocks[0].attn.num_heads == 16
    assert model.decoder_embed.weight.shape == (512, 32)
    assert model.decoder_pred.weight.shape == (16 * 16 * 3, 512)


def test_localmim_pred_shapes_and_loss_consistency():
    model = ReleasedLocalMIMViT(**TINY)
    imgs = torch.randn(2, 3, 64, 64)
    noise = torch.rand(2, 16)
    loss, losses = model(imgs, noise)
    assert [p.shape for p in model.last_preds] == [(2, 256, 27), (2, 64, 27), (2, 16, 27), (2, 4, 27)]
    assert [t.shape for t in model.last_targets] == [(2, 256, 27), (2, 64, 27), (2, 16, 27), (2, 4, 27)]
    assert len(losses) == 4
    assert torch.allclose(loss, losses[0] + losses[1] + losses[2] + losses[3])
    # recompute each L_k by explicit loops from the stored preds/targets/weights
    for k in range(4):
        P, T, M = model.last_preds[k], model.last_targets[k], model.last_weights[k]
        num = 0.0
        den = 0.0
        for b in range(P.shape[0]):
            for j in range(P.shape[1]):
                num += float(M[b, j]) * float(((P[b, j] - T[b, j]) ** 2).mean().detach())
                den += float(M[b, j])
        assert math.isclose(losses[k].detach().item(), num / den, rel_tol=1e-10)
    # the targets are the literal HOG of the given image at each cell size
    for k, cell in enumerate([4, 8, 16, 32]):
        assert torch.equal(model.last_targets[k], literal_hog(imgs, cell, 9))


def test_localmim_pixel_target_shapes():
    model = ReleasedLocalMIMViT(**TINY, target="pixel")
    assert not hasattr(model, "hog_enc")
    loss, _ = model(torch.randn(1, 3, 64, 64), torch.rand(1, 16))
    assert torch.isfinite(loss)
    assert [p.shape for p in model.last_preds] == [(1, 256, 48), (1, 64, 192), (1, 16, 768), (1, 4, 3072)]


def test_sincos_pos_embed_structure():
    D, g = 32, 4
    emb = sincos_pos_embed_2d(D, g)
    assert emb.shape == (1 + g * g, D)
    assert torch.all(emb[0] == 0)
    grid = emb[1:].reshape(g, g, D)  # [row, col, channel]
    first, second = grid[..., : D // 2], grid[..., D // 2 :]
    # first half depends only on the column, second half only on the row
    assert torch.allclose(first, first[:1].expand(g, g, D // 2))
    assert torch.allclose(second, second[:, :1].expand(g, g, D // 2))
    # each half is [sin | cos] of the same angles, frequencies 1/10000^(2i/(D/2))
    q = D // 4
    for half in (first, second):
        assert torch.allclose(half[..., :q] ** 2 + half[..., q:] ** 2, torch.ones(g, g, q))
    col = torch.arange(g, dtype=torch.float64)
    omega = 1.0 / 10000.0 ** (2 * torch.arange(q, dtype=torch.float64) / (D // 2))
    assert torch.allclose(first[0, :, :q], torch.sin(col[:, None] * omega[None]))
    assert torch.allclose(second[:, 0, q:], torch.cos(col[:, None] * omega[None]))
    # position (0, 0): sin part 0, cos part 1
    assert torch.allclose(grid[0, 0], torch.cat([torch.zeros(q), torch.ones(q)] * 2))
    # the models use it, frozen, for encoder and decoders
    model = ReleasedLocalMIMViT(**TINY)
    assert torch.equal(model.pos_embed[0], sincos_pos_embed_2d(32, 4))
    assert not model.pos_embed.requires_grad
    for dec in model.decoder:
        assert not dec.pos_embed.requires_grad
        assert torch.equal(dec.pos_embed[0], sincos_pos_embed_2d(32, 4))


def test_hog_constant_image_is_zero():
    # a dyadic value keeps the conv sums exact; with e.g. 0.7 the conv's rounding residual (~1e-16) is divided by
    # the 1e-12 eps and gives small non-zero, implementation-dependent histograms.
    imgs = torch.full((2, 3, 32, 32), 0.75)
    imgs[1] = -1.5
    for cell in (4, 8, 16):
        h = literal_hog(imgs, cell, 9)
        assert h.shape == (2, (32 // cell) ** 2, 27)
        assert torch.all(h == 0)


def test_hog_constant_image_with_bias_is_one_hot():
    imgs = torch.full((1, 3, 16, 16), -1.3)
    bias = torch.tensor([0.2, -0.1])
    h = literal_hog(imgs, 4, 9, bias=bias)
    b = math.floor(math.atan2(0.2, -0.1) / math.pi * 9) % 9
    expected = torch.zeros(27)
    expected[[b, 9 + b, 18 + b]] = 1.0
    assert torch.allclose(h, expected.expand(1, 16, 27))


def test_hog_ramps_hand_computed():
    # R: horizontal ramp I = x -> G0 = -8 (interior), G1 = 0, phi = -pi/2 -> floor(-4.5) = -5 mod 9 = 4
    # G: vertical ramp I = y -> G0 = 0, G1 = -8, phi = pi -> 9 mod 9 = 0
    # B: horizontal ramp I = -x -> G0 = +8, phi = +pi/2 -> floor(4.5) = 4 (unsigned orientation)
    # reflect padding makes the border gradients zero, so every cell is one-hot after normalisation.
    H = W = 16
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    img = torch.stack([x, y, -x]).unsqueeze(0)
    h = literal_hog(img, 4, 9)
    expected = torch.zeros(27)
    expected[4] = expected[9 + 0] = expected[18 + 4] = 1.0
    assert torch.allclose(h, expected.expand(1, 16, 27))
    # nbins = 18: -pi/2 -> floor(-9) = -9 mod 18 = 9; pi -> 0; pi/2 -> 9
    h18 = literal_hog(img, 8, 18)
    expected = torch.zeros(54)
    expected[9] = expected[18 + 0] = expected[36 + 9] = 1.0
    assert torch.allclose(h18, expected.expand(1, 4, 54))


def test_hog_layout_and_scale_invariance():
    torch.manual_seed(1)
    img = torch.randn(2, 3, 32, 32)
    h = literal_hog(img, 8, 9)
    # per (cell, channel) unit norm; channel c's bins are features 9c .. 9c+8
    norms = h.reshape(2, 16, 3, 9).norm(dim=-1)
    assert torch.allclose(norms, torch.ones(2, 16, 3))
    # channel separation: HOG of channel G alone equals the middle block
    h_g = literal_hog(img[:, [1, 1, 1]], 8, 9)
    assert torch.allclose(h[..., 9:18], h_g[..., :9])
    # no bias: invariant to a positive per-channel affine map (normalisation)
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    assert torch.allclose(literal_hog((img - mean) / std, 8, 9), h, atol=1e-10)
    # no grad is recorded
    img.requires_grad_(True)
    assert not literal_hog(img, 8, 9).requires_grad


def test_hog_row_major_cells():
    # only the pixels of cell (row 1, col 2) of an 8 x 8-cell grid vary; all other cells with zero gradient
    img = torch.zeros(1, 3, 32, 32)
    img[:, :, 10:14, 19:21] = 1.0  # strictly inside the cell rows 8..15, cols 16..23
    h = literal_hog(img, 8, 9)
    nonzero = (h.abs().sum(-1) > 0).nonzero()[:, 1].tolist()
    assert nonzero == [1 * 4 + 2]


def test_pixel_target_order_and_norm():
    torch.manual_seed(2)
    img = torch.randn(2, 3, 8, 12)
    p = 4
    t = literal_pixel_target(img, p, norm_pix=False)
    assert t.shape == (2, 6, 48)
    for b in range(2):
        for r in range(2):
            for c in range(3):
                vec = []
                for i in range(p):
                    for j in range(p):
                        for ch in range(3):
                            vec.append(img[b, ch, r * p + i, c * p + j])
                assert torch.equal(t[b, r * 3 + c], torch.stack(vec))
    tn = literal_pixel_target(img, p)
    expected = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, keepdim=True, unbiased=True) + 1e-6)
    assert torch.allclose(tn, expected)
    v = t[0, 0]
    var = ((v - v.mean()) ** 2).sum() / (v.numel() - 1)
    assert torch.allclose(tn[0, 0], (v - v.mean()) / torch.sqrt(var + 1e-6))


@pytest.mark.parametrize("L,ratio", [(196, 0.75), (16, 0.75), (49, 0.6), (16, 0.5)])
def test_random_masking(L, ratio):
    noise = torch.rand(3, L)
    ids_keep, ids_restore, mask = literal_random_masking(noise, ratio)
    len_keep = int(L * (1 - ratio))
    assert ids_keep.shape == (3, len_keep)
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(L).expand(3, L))
    assert torch.equal(torch.gather(ids_restore, 1, ids_shuffle), torch.arange(L).expand(3, L))
    assert torch.all(mask.sum(1) == L - len_keep)
    for b in range(3):
        kept = set(ids_keep[b].tolist())
        smallest = set(torch.topk(noise[b], len_keep, largest=False).indices.tolist())
        assert kept == smallest
        for t in range(L):
            assert mask[b, t] == (0 if t in kept else 1)
    if L == 196:
        assert len_keep == 49


def test_mask_weights():
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]])
    m = mask.reshape(4, 4)
    w4 = literal_mask_weights(mask, 4, 4).reshape(16, 16)
    for r in range(16):
        for c in range(16):
            assert w4[r, c] == m[r // 4, c // 4]
    w1 = literal_mask_weights(mask, 4, 1)
    assert torch.equal(w1, mask)
    w_half = literal_mask_weights(mask, 4, 0.5).reshape(2, 2)
    for r in range(2):
        for c in range(2):
            assert w_half[r, c] == m[2 * r : 2 * r + 2, 2 * c : 2 * c + 2].sum() / 4


def test_hog_enc_weights_and_bias():
    torch.manual_seed(3)
    model = ReleasedLocalMIMViT(**TINY, hog_bias=True)
    sobel = sobel_weight()
    assert torch.equal(sobel[0, 0], torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]))
    assert torch.equal(sobel[1, 0], torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]))
    biases = []
    for k in range(4):
        conv = model.hog_enc[k].conv
        assert torch.equal(conv.weight, sobel)
        assert not conv.weight.requires_grad and not conv.bias.requires_grad
        assert conv.bias.shape == (2,)
        assert torch.all(conv.bias.abs() <= 1.0 / 3.0)
        biases.append(conv.bias.clone())
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(biases[i], biases[j])
    # each scale uses its own bias: targets of a flat image are one-hot at that scale's bin
    imgs = torch.zeros(1, 3, 64, 64)
    model(imgs, torch.rand(1, 16))
    for k in range(4):
        b0, b1 = biases[k].tolist()
        b = math.floor(math.atan2(b0, b1) / math.pi * 9) % 9
        assert torch.allclose(model.last_targets[k][0, :, b], torch.ones(model.last_targets[k].shape[1]))
    assert not ReleasedLocalMIMViT(**TINY).hog_enc[0].conv.bias


def test_init():
    model = ReleasedLocalMIMViT(**TINY)
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)
    assert torch.all(model.decoder[2].embed.bias == 0)
    assert torch.all(model.norm[1].weight == 1) and torch.all(model.norm[1].bias == 0)
    assert torch.all(model.decoder[0].pred[1].weight == 1) and torch.all(model.decoder[0].pred[1].bias == 0)
    # xavier-uniform bound on the D x (3 p p) view of the patch embedding
    w = model.patch_embed.proj.weight
    bound = math.sqrt(6.0 / (w.shape[0] + w[0].numel()))
    assert w.abs().max() <= bound
    # heads keep PyTorch's default init (non-zero conv biases)
    assert model.decoder[3].pred[1].bias.abs().sum() > 0


def test_localmim_prediction_depends_only_on_visible_patches():
    model = ReleasedLocalMIMViT(**TINY)
    imgs = torch.randn(1, 3, 64, 64)
    noise = torch.rand(1, 16)
    model(imgs, noise)
    preds = [p.clone() for p in model.last_preds]
    mask = model.last_mask.reshape(4, 4)
    r, c = [int(i) for i in (mask == 1).nonzero()[0]]
    imgs2 = imgs.clone()
    imgs2[:, :, 16 * r : 16 * r + 16, 16 * c : 16 * c + 16] += 1.0
    model(imgs2, noise)
    for p0, p1 in zip(preds, model.last_preds):
        assert torch.equal(p0, p1)


def _check_grads(model, loss):
    loss.backward()
    n = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            n += 1
        else:
            assert p.grad is None, name
    assert n > 0


@pytest.mark.parametrize("hog_bias", [False, True])
def test_localmim_backward_fp64(hog_bias):
    model = ReleasedLocalMIMViT(**TINY, hog_bias=hog_bias, nbins=18 if hog_bias else 9).double()
    imgs = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    loss, losses = model(imgs, torch.rand(2, 16, dtype=torch.float64))
    assert loss.dtype == torch.float64
    assert torch.isfinite(loss) and all(torch.isfinite(x) for x in losses)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    expected_frozen = {"pos_embed"} | {f"decoder.{k}.pos_embed" for k in range(4)}
    expected_frozen |= {f"hog_enc.{k}.conv.weight" for k in range(4)}
    if hog_bias:
        expected_frozen |= {f"hog_enc.{k}.conv.bias" for k in range(4)}
    assert frozen == expected_frozen
    _check_grads(model, loss)


def test_localmim_small_patch_fp32():
    # img 32 / patch 8: cells 2, 4, 8, 16 px; float32 params and inputs
    torch.set_default_dtype(torch.float32)
    model = ReleasedLocalMIMViT(
        img_size=32, patch_size=8, embed_dim=32, depth=5, num_heads=2, decoder_dim=16, decoder_heads=2
    )
    assert model.taps == [1, 3, 2, 4]
    loss, _ = model(torch.randn(2, 3, 32, 32), torch.rand(2, 16))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert [p.shape[1] for p in model.last_preds] == [256, 64, 16, 4]
    _check_grads(model, loss)


def test_mae_backward_fp64():
    model = ReleasedMAEViT(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=4,
        decoder_dim=16,
        decoder_depth=2,
        decoder_heads=2,
    ).double()
    imgs = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    noise = torch.rand(2, 16, dtype=torch.float64)
    loss = model(imgs, noise)
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    assert model.last_pred.shape == (2, 16, 192)
    target = literal_pixel_target(imgs, 8)
    per_patch = ((model.last_pred - target) ** 2).mean(-1)
    assert torch.allclose(loss, (per_patch * model.last_mask).sum() / model.last_mask.sum())
    _check_grads(model, loss)
    # prediction depends only on visible patches
    pred = model.last_pred.detach().clone()
    t = int((model.last_mask[0] == 1).nonzero()[0])
    imgs2 = imgs.clone()
    imgs2[0, :, 8 * (t // 4) : 8 * (t // 4) + 8, 8 * (t % 4) : 8 * (t % 4) + 8] += 1.0
    model(imgs2, noise)
    assert torch.equal(model.last_pred.detach(), pred)
