"""LocalMIM-Swin: per-batch unit masking, window packing, the sparse encoder against a dense Swin oracle (values and
gradients), the forward contract, and training through the trainer.

The oracle below is written independently of fastmim.models.swin_encoder, the way Swin is usually written: the
whole token map, cyclic shift + region mask, window partition, Swin's relative-position index, and patch merging by
strided slicing. Its attention is restricted to visible keys, which is what the sparse encoder must equal on the
visible tokens. It reads timm names (``layers.{i}.downsample`` before stage i) or, with ``released=True``, the
authors' pre-training names and merge order (``encoder.layers.{i-1}.downsample``, (0,0), (0,1), (1,0), (1,1)).
"""

import pytest
import torch
import torch.nn.functional as F

from fastmim import create_model
from fastmim.config import load_config
from fastmim.errors import FastmimError
from fastmim.masking import scale_weights
from fastmim.models import model_from_config
from fastmim.models.swin import num_masked_units, unit_masking
from fastmim.models.swin_encoder import pack_windows, unit_token_coords, window_layout
from fastmim.models.swin_weights import export_timm_swin
from fastmim.train.trainer import train
from tests.oracles_swin import released_swin_unit_mask, swin_token_coords

NAME = "localmim_swin_base_patch4_window7"
NANO = "localmim_swin_nano_patch4_window4"
TINY = {
    "img_size": 128,
    "embed_dim": 16,
    "depths": (2, 2, 2, 2),
    "num_heads": (1, 2, 2, 4),
    "window_size": 4,
    "decoder_dim": 32,
    "decoder_heads": 2,
}
STANDARD = [(0, 0), (1, 0), (0, 1), (1, 1)]  # (row, column) offsets of the merged 2 x 2 tokens, Swin / timm
RELEASED = [(0, 0), (0, 1), (1, 0), (1, 1)]  # the authors' pre-training code


def _ln(x, sd, key):
    return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], 1e-6)


def _rel_index(w):
    ys, xs = torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :] + w - 1) * (2 * w - 1) + (xs[:, None] - xs[None, :] + w - 1)


def _partition(t, w):
    """[B, H, W, ...] -> [B * (H / w) * (W / w), w * w, ...]"""
    b, h, wd, *rest = t.shape
    t = t.reshape(b, h // w, w, wd // w, w, *rest).transpose(2, 3)
    return t.reshape(b * (h // w) * (wd // w), w * w, *rest)


def _unpartition(t, w, b, h, wd):
    return t.reshape(b, h // w, wd // w, w, w, -1).transpose(2, 3).reshape(b, h, wd, -1)


def _dense_block(x, sd, pre, heads, w, shift, vis):
    b, h, wd, c = x.shape
    y = _ln(x, sd, pre + "norm1")
    region = torch.zeros(h, wd, dtype=torch.long)
    if shift:
        y, vis = torch.roll(y, (-shift, -shift), (1, 2)), torch.roll(vis, (-shift, -shift), (0, 1))
        slices = (slice(0, -w), slice(-w, -shift), slice(-shift, None))
        for n, (hs, ws) in enumerate((hs, ws) for hs in slices for ws in slices):
            region[hs, ws] = n
    rw, vw = _partition(region[None], w), _partition(vis[None], w)  # [nW, N]
    n = w * w
    allowed = (rw[:, :, None] == rw[:, None, :]) & (vw[:, None, :] | torch.eye(n, dtype=torch.bool))
    qkv = F.linear(_partition(y, w), sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"])
    q, k, v = qkv.reshape(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    table = sd[pre + "attn.relative_position_bias_table"]
    attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1) + table[_rel_index(w)].permute(2, 0, 1)
    attn = attn.reshape(b, -1, heads, n, n).masked_fill(~allowed[None, :, None], float("-inf")).softmax(-1)
    out = (attn.reshape(-1, heads, n, n) @ v).transpose(1, 2).reshape(-1, n, c)
    out = _unpartition(F.linear(out, sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"]), w, b, h, wd)
    x = x + (torch.roll(out, (shift, shift), (1, 2)) if shift else out)
    hidden = F.gelu(F.linear(_ln(x, sd, pre + "norm2"), sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"]))
    return x + F.linear(hidden, sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])


def _dense_merge(x, sd, pre, order):
    parts = {(dy, dx): x[:, dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)}
    x = torch.cat([parts[o] for o in order], dim=-1)
    return F.linear(_ln(x, sd, pre + "norm"), sd[pre + "reduction.weight"])


def dense_swin(sd, imgs, heads, window, vis_units, released=False):
    """Dense Swin taps [B, h, w, C] (after merging for stages 1-3, un-normed); attention keys restricted to the tokens
    of visible units (vis_units: bool [u, u])."""
    enc = "encoder." if released else ""
    proj = sd[enc + "patch_embed.proj.weight"]
    x = F.conv2d(imgs, proj, sd[enc + "patch_embed.proj.bias"], stride=proj.shape[-1]).permute(0, 2, 3, 1)
    x = _ln(x, sd, enc + "patch_embed.norm")
    taps = []
    for i, nh in enumerate(heads):
        if i:
            merge = f"encoder.layers.{i - 1}.downsample." if released else f"layers.{i}.downsample."
            x = _dense_merge(x, sd, merge, RELEASED if released else STANDARD)
            taps.append(x)
        res = x.shape[1]
        w, shift = (res, 0) if res <= window else (window, window // 2)
        vis = vis_units.repeat_interleave(res // vis_units.shape[0], 0).repeat_interleave(res // vis_units.shape[1], 1)
        j = 0
        while f"{enc}layers.{i}.blocks.{j}.norm1.weight" in sd:
            x = _dense_block(x, sd, f"{enc}layers.{i}.blocks.{j}.", nh, w, shift if j % 2 else 0, vis)
            j += 1
    return [*taps, x]


def visible_part(dense, visible, u):
    """Dense tap [B, R, R, C] -> the visible units' tokens [B, V, r, r, C] (unit-major)."""
    b, side, _, c = dense.shape
    r = side // u
    return dense.reshape(b, u, r, u, r, c).permute(0, 1, 3, 2, 4, 5).reshape(b, u * u, r, r, c)[:, visible]


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_registry_published_sizes_and_geometry():
    with torch.device("meta"):
        base, large = create_model(NAME), create_model("localmim_swin_large_patch4_window14")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # timm 1.0.31's swin_base_patch4_window7_224 without its head has 86,743,224 parameters: our encoder plus the
    # last tap norm (timm's final norm, 2 x 1024).
    assert count(base.encoder) + count(base.tap_norms[3]) == 86_743_224
    assert base.num_patches == 49 and base.cell_sizes == [8, 16, 32, 32] and base.tokens_per_unit == [4, 2, 1, 1]
    assert [d.embed.out_features for d in base.decoders] == [64, 128, 128, 128]
    assert [d.blocks[0].attn.num_heads for d in base.decoders] == [4] * 4
    assert [d.pos_embed.shape[1] for d in base.decoders] == [784, 196, 49, 49]
    assert [n.normalized_shape[0] for n in base.tap_norms] == [256, 512, 1024, 1024]
    assert [d.head.out_features for d in base.decoders] == [54] * 4 and base.target.bias.shape == (4, 2)
    assert [(s.window, s.shift) for s in base.encoder.layers] == [(7, 3), (7, 3), (7, 3), (7, 0)]
    assert [(s.window, s.shift) for s in large.encoder.layers] == [(14, 7), (14, 7), (14, 0), (7, 0)]
    assert large.encoder.layers[3].blocks[0].attn.relative_position_bias_table.shape == (169, 48)
    pixel = create_model(NAME, **TINY, target="pixel")
    assert [d.head.out_features for d in pixel.decoders] == [192, 768, 3072, 3072]
    with pytest.raises(FastmimError, match="multiple of the 32 px mask unit"):
        create_model(NAME, img_size=112)


@pytest.mark.parametrize("ratio,exact,released", [(0.75, 37, 37), (0.6, 29, 30), (0.5, 25, 25), (0.0, 0, 1)])
def test_mask_rules(ratio, exact, released):
    assert num_masked_units(49, ratio, "exact") == exact
    assert num_masked_units(49, ratio, "released") == released
    if ratio:  # the authors' randperm test (at ratio 0 it masks unit 0; fastmim then masks one by noise)
        assert released_swin_unit_mask(torch.randperm(49), ratio).sum() == released
    assert num_masked_units(4, 0.75, "released") == 3  # one unit always stays visible


def test_noise_contract_reproduces_the_batch_mask():
    noise = torch.rand(3, 49)
    m = unit_masking(noise, 49, 0.75)
    assert torch.equal(m.visible, torch.argsort(noise[0])[:12].sort().values)
    assert m.mask.sum() == 37 and torch.equal(m.mask[m.visible], torch.zeros(12))
    again = unit_masking(torch.cat([noise[:1], torch.rand(5, 49)]), 49, 0.75)  # only the first row counts
    assert torch.equal(again.visible, m.visible) and torch.equal(unit_masking(noise[0], 49, 0.75).mask, m.mask)
    with pytest.raises(ValueError, match=r"noise must have shape \[49\] or \[B, 49\]"):
        unit_masking(torch.rand(3, 196), 49, 0.75)


@pytest.mark.parametrize("rule", ["true", "released"])
@pytest.mark.parametrize("units,r,window", [(7, 8, 7), (2, 8, 7), (4, 4, 3), (7, 2, 7), (4, 8, 4)])
def test_packing_places_every_visible_token_exactly_once(units, r, window, rule):
    g = torch.Generator().manual_seed(units * 100 + r + window)
    res = units * r
    for trial in range(4):
        keep = max(1, int(units * units * [0.25, 0.5, 0.1, 1.0][trial]))
        visible = torch.randperm(units * units, generator=g)[:keep].sort().values
        coords = unit_token_coords(visible, units, r, rule)
        w = min(window, res)
        for shift in {0, w // 2 if res > window else 0}:
            lay = window_layout(coords, w, shift)
            slots = lay.gather.reshape(lay.num_groups, lay.group_size)
            real = lay.allowed.diagonal(dim1=1, dim2=2)  # every slot sees itself
            assert real.all() and lay.group_size <= w * w
            # each token sits in exactly one packed slot, and scatter points back at it
            assert torch.equal(lay.gather[lay.scatter], torch.arange(len(coords)))
            assert len(set(lay.scatter.tolist())) == len(coords)
            padding = torch.ones(slots.numel(), dtype=torch.bool)
            padding[lay.scatter] = False
            assert lay.allowed.reshape(-1, lay.group_size)[padding].sum() == padding.sum()  # padding sees itself only
            win = (coords + (w - shift) % w) // w
            same = (win[:, None] == win[None, :]).all(-1)
            pos = lay.scatter
            group_of = pos // lay.group_size
            # allowed pairs are exactly the same-window pairs, and a window never spans two groups
            assert torch.equal(same, same & (group_of[:, None] == group_of[None, :]))
            a = lay.allowed[group_of[:, None], pos[:, None] % lay.group_size, pos[None, :] % lay.group_size]
            assert torch.equal(a & (group_of[:, None] == group_of[None, :]), same)


@pytest.mark.parametrize("rule", ["true", "released"])
@pytest.mark.parametrize("units,r", [(2, 4), (2, 2), (7, 4), (7, 2), (7, 1), (3, 8)])
def test_token_coords_follow_the_oracle(units, r, rule):
    """fastmim's coordinates of the visible tokens after a merge equal the oracle's literal transcription of each
    rule (tests/oracles_swin.py); the two rules differ whenever r > 1."""
    g = torch.Generator().manual_seed(units * 10 + r)
    for keep in (1, units, units * units // 2, units * units):
        visible = torch.randperm(units * units, generator=g)[:keep].sort().values
        masked = torch.ones(units * units, dtype=torch.bool)
        masked[visible] = False
        ours = unit_token_coords(visible, units, r, rule)
        assert torch.equal(ours, swin_token_coords(masked, units, r, rule, merged=True))
        other = unit_token_coords(visible, units, r, "true" if rule == "released" else "released")
        assert torch.equal(ours, other) == (r == 1)


def test_pack_windows_greedy():
    groups = pack_windows([49, 3, 40, 9, 20, 29, 1], 49)
    assert sorted(i for g in groups for i in g) == list(range(7))
    assert all(sum([49, 3, 40, 9, 20, 29, 1][i] for i in g) <= 49 for g in groups) and len(groups) == 4


def _taps_and_grads(fn, params, weights):
    for p in params:
        p.grad = None
    taps = fn()
    sum((t * w).sum() for t, w in zip(taps, weights)).backward()
    return [t.detach() for t in taps], [p.grad.clone() for p in params]


@pytest.mark.parametrize("window,ratio", [(4, 0.75), (8, 0.5), (4, 0.0)])
def test_sparse_encoder_equals_dense_swin_on_visible_tokens(fp64, window, ratio):
    """Values and gradients (random upstream gradient) of all four taps, fp64."""
    torch.manual_seed(window)
    model = create_model(NAME, **{**TINY, "window_size": window, "mask_ratio": ratio})
    enc, u = model.encoder, model.encoder.units_per_side
    imgs = torch.randn(2, 3, 128, 128)
    masking = unit_masking(torch.rand(u * u), u * u, ratio)
    vis_units = (masking.mask == 0).reshape(u, u)
    timm_sd = export_timm_swin(model.state_dict(keep_vars=True))
    params = [p for p in enc.parameters()]
    shapes = [t.shape for t in enc(imgs, masking.visible)]
    weights = [torch.randn(s) for s in shapes]
    sparse, g_sparse = _taps_and_grads(lambda: enc(imgs, masking.visible), params, weights)
    dense, g_dense = _taps_and_grads(
        lambda: [
            visible_part(t, masking.visible, u) for t in dense_swin(timm_sd, imgs, TINY["num_heads"], window, vis_units)
        ],
        params,
        weights,
    )
    for s, d in zip(sparse, dense):
        assert _rel(s, d) < 1e-10
    for (name, _), a, b in zip(enc.named_parameters(), g_sparse, g_dense):
        assert _rel(a, b) < 1e-10, name


def test_forward_contract_and_loss_weights():
    model = create_model(NAME, **TINY)
    imgs, noise = torch.randn(3, 3, 128, 128), torch.rand(3, model.num_patches)
    out = model(imgs, noise)
    assert [p.shape for p in out.preds] == [(3, 256, 54), (3, 64, 54), (3, 16, 54), (3, 16, 54)]  # 8/16/32/32 px
    assert [t.shape for t in out.targets] == [p.shape for p in out.preds]
    assert out.mask.shape == (3, 16) and out.mask.sum() == 3 * 12 and (out.mask == out.mask[:1]).all()
    assert torch.equal(out.mask[0], unit_masking(noise, 16, 0.75).mask)
    assert len(out.losses) == 4 and torch.allclose(out.loss, sum(out.losses))
    # scale 8 px: each masked 32 px unit covers its 4 x 4 cells; the loss is the plain mean over those cells
    cells = out.mask[0].reshape(4, 4).repeat_interleave(4, 0).repeat_interleave(4, 1).flatten().bool()
    manual = (out.preds[0] - out.targets[0]).pow(2).mean(-1)[:, cells].mean()
    torch.testing.assert_close(out.losses[0], manual)
    again = model(imgs, noise)
    assert torch.equal(again.loss, out.loss)


def test_prediction_ignores_masked_pixels_and_every_parameter_learns():
    model = create_model(NAME, **TINY).eval()
    imgs, noise = torch.randn(2, 3, 128, 128), torch.rand(16)
    out = model(imgs, noise)
    edited = imgs.clone()
    for unit in out.mask[0].nonzero().flatten().tolist():
        row, col = divmod(unit, 4)
        edited[..., row * 32 : (row + 1) * 32, col * 32 : (col + 1) * 32] = 5.0
    out2 = model(edited, noise)
    for p, q in zip(out.preds, out2.preds):
        torch.testing.assert_close(p, q)
    out.loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
    assert "target.bias" not in dict(model.named_parameters())
    assert model.no_weight_decay() == {n for n, _ in model.named_parameters() if "relative_position" in n} | {
        f"decoders.{k}.mask_token" for k in range(4)
    }


CONFIG_RULES = [
    ("exact", "default", "true"),
    ("released", "default", "released"),
    ("released", "true", "true"),
    ("exact", "released", "released"),
]


@pytest.mark.parametrize("mask_rule,swin_coords,rule", CONFIG_RULES)
def test_released_rules_through_the_config(mask_rule, swin_coords, rule):
    """model.mask_rule = "released" selects the released coordinates unless model.swin_coords says otherwise."""
    args = [
        f"--model.name={NAME}",
        "--model.img_size=224",
        f"--model.mask_rule={mask_rule}",
        "--model.mask_ratio=0.6",
        f"--model.swin_coords={swin_coords}",
    ]
    with torch.device("meta"):
        model = model_from_config(load_config(None, args).model)
    assert model.mask_rule == mask_rule and model.swin_coords == rule == model.encoder.coords
    assert num_masked_units(model.num_units, 0.6, model.mask_rule) == {"exact": 29, "released": 30}[mask_rule]
    for key in ("mask_rule", "swin_coords"):
        with pytest.raises(FastmimError, match=f"{key} applies to Swin models only"):
            model_from_config(load_config(None, [f"--model.{key}=released"]).model)


def test_coordinate_rule_is_not_in_the_state_dict():
    """The rule is a setting, not a weight: the state dicts of both rules have the same keys (a checkpoint or released
    import made before the rule existed loads into either), and weights move strictly between them."""
    torch.manual_seed(0)
    true = create_model(NANO, img_size=64)
    released = create_model(NANO, img_size=64, mask_rule="released")
    assert (true.swin_coords, released.swin_coords) == ("true", "released")
    assert list(true.state_dict()) == list(released.state_dict())
    released.load_state_dict(true.state_dict(), strict=True)
    imgs, noise = torch.randn(2, 3, 64, 64), torch.tensor([0.9, 0.1, 0.8, 0.3])
    with torch.no_grad():  # 3 of 4 units masked, unit 1 visible: its tokens move under the released rule
        assert true(imgs, noise).losses[0] == released(imgs, noise).losses[0]  # the first tap: stage 1, before a merge
        assert true(imgs, noise).losses[1] != released(imgs, noise).losses[1]
    with pytest.raises(FastmimError, match="unknown coordinate rule 'raster'"):
        create_model(NANO, img_size=64, swin_coords="raster")


def test_trains_a_few_steps_through_the_trainer(tmp_path):
    """`fastmim pretrain --model.name=localmim_swin_nano_patch4_window4` at 64 px (2 x 2 units, one visible)."""
    args = [
        "--model.name=localmim_swin_nano_patch4_window4",
        "--model.img_size=64",
        "--data.num_images=16",
        "--train.batch_size=4",
        "--train.steps=3",
        "--train.precision=fp32",
        "--train.device=cpu",
        "--train.log_every=1",
        "--train.warmup_steps=0",
        f"--train.out_dir={tmp_path / 'run'}",
    ]
    summary = train(load_config(None, args))
    assert summary["steps"] == 3 and summary["final_loss"] is not None and summary["final_loss"] > 0
    assert (tmp_path / "run" / "loss.png").exists()


@pytest.mark.parametrize(
    "recipe,name,batch,blr,epochs,target",
    [
        ("swin_base_hog_400", NAME, 2048, 1e-4, 400, "hog"),
        ("swin_base_pixel_400", NAME, 2048, 1e-4, 400, "pixel"),
        ("swin_large_800", "localmim_swin_large_patch4_window14", 4096, 1e-4, 800, "hog"),
    ],
)
def test_swin_recipes_follow_spec_5(recipe, name, batch, blr, epochs, target):
    cfg = load_config(recipe, ["--data.path=/data"])
    t = cfg.train
    assert cfg.model.name == name and cfg.model.mask_ratio == 0.75 and cfg.model.mask_rule == "released"
    assert t.batch_size * t.accum_steps == batch and t.blr == blr and (t.epochs, t.warmup_epochs) == (epochs, 40)
    assert (t.min_lr, t.weight_decay, t.beta1, t.beta2, t.clip_grad) == (0.0, 0.05, 0.9, 0.95, 0.0)
    with torch.device("meta"):
        model = model_from_config(cfg.model)
    assert type(model.target).__name__ == {"hog": "HOGTarget", "pixel": "PixelTarget"}[target]
    # the released computation, which produced the published numbers: 37 of 49 units, the released coordinates
    assert num_masked_units(model.num_units, 0.75, model.mask_rule) == 37 and model.swin_coords == "released"
    if target == "hog":
        assert model.target.nbins == 18 and model.target.bias is not None
    assert model.target.cell_sizes == (8, 16, 32, 32)


# ----------------------------------------------------------------------------------------------- impl = "fast"


def _fast_pair(**kw):
    torch.manual_seed(0)
    ref = create_model(NANO, img_size=64, **kw)
    fast = create_model(NANO, img_size=64, impl="fast", **kw)
    assert list(fast.state_dict()) == list(ref.state_dict())  # same parameters: checkpoints move between impls
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _step(model, imgs, noise, autocast=False):
    """Per-scale losses, the outputs, and every parameter gradient of a random combination of the scale losses
    (each scale's gradient path is checked, not only their sum)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(imgs, noise)
    upstream = torch.rand(4, generator=torch.Generator().manual_seed(5)) + 0.5
    (torch.stack(out.losses) * upstream).sum().backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("target", ["hog", "pixel"])
def test_fast_impl_equals_reference_fp32(target, monkeypatch):
    """Triton kernels (interpreted on CPU) for the HOG targets (18 bins, a bias per scale, 8/16/32/32 px) and the
    fused loss; heads on masked units only: same losses, targets, predictions where the loss sees them, gradients."""
    from fastmim.kernels import hog as hk
    from fastmim.kernels import recon_loss as rl

    calls = {"hog": 0, "loss": 0}
    for module, fn, key in ((hk, "hog_fwd", "hog"), (rl, "recon_loss_fwd", "loss")):
        original = getattr(module, fn)
        monkeypatch.setattr(
            module, fn, lambda *a, _f=original, _k=key, **k: calls.__setitem__(_k, calls[_k] + 1) or _f(*a, **k)
        )
    ref, fast = _fast_pair(target=target)
    g = torch.Generator().manual_seed(1)
    imgs, noise = torch.randn(2, 3, 64, 64, generator=g), torch.rand(4, generator=g)
    (want, want_grads), (got, got_grads) = _step(ref, imgs, noise), _step(fast, imgs, noise)
    assert calls == {"hog": int(target == "hog"), "loss": 1}  # the kernels ran, not their references
    torch.testing.assert_close(torch.stack(got.losses), torch.stack(want.losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=0)
    assert torch.equal(got.mask, want.mask) and got.mask.sum() == 2 * 3
    for k in range(4):
        torch.testing.assert_close(got.targets[k], want.targets[k], rtol=0, atol=1e-5)
        seen = scale_weights(want.mask, 2, fast.tokens_per_unit[k]).bool()  # cells of masked units
        torch.testing.assert_close(got.preds[k][seen], want.preds[k][seen], rtol=1e-5, atol=1e-6)
        assert (got.preds[k][~seen] == 0).all()  # never computed: loss weight 0
    assert got_grads.keys() == want_grads.keys() and len(want_grads) == len(list(ref.parameters()))
    for name, grad in want_grads.items():
        assert _rel(got_grads[name], grad) < 1e-4, name


def test_fast_impl_bf16_autocast_within_twice_the_reference_error():
    """Under bf16 autocast each loss and gradient of the fast impl is within 2 x the reference impl's own bf16 error
    (both against the fp32 reference) + 0.5 % of its magnitude: the kernel keeps w * (P - T) in bf16 for backward, one
    rounding more than the reference's fp32 residual."""
    ref, fast = _fast_pair(target="pixel")  # the HOG kernel is autocast-independent (fp32 in, fp32 out)
    g = torch.Generator().manual_seed(2)
    imgs, noise = torch.randn(2, 3, 64, 64, generator=g), torch.rand(4, generator=g)
    outs = [_step(ref, imgs, noise), _step(ref, imgs, noise, autocast=True), _step(fast, imgs, noise, autocast=True)]
    (want, want_grads), (low, low_grads), (got, got_grads) = outs
    pairs = [("losses", torch.stack(want.losses), torch.stack(low.losses), torch.stack(got.losses))]
    pairs += [(n, w, low_grads[n], got_grads[n]) for n, w in want_grads.items()]
    for name, w, r, f in pairs:
        scale = w.abs().max().item()
        err_ref, err_fast = ((x.float() - w).abs().max().item() for x in (r, f))
        assert err_fast <= 2 * err_ref + 5e-3 * scale, f"{name}: {err_fast:.3g} vs reference bf16 {err_ref:.3g}"
