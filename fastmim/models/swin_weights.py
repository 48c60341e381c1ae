"""LocalMIM-Swin weights: import of the authors' released checkpoints, export of the encoder as a timm Swin.

Released names (method 9 does not list them). They are derived from the module structure of the authors' Swin
pre-training model (``MaskedAutoencoderSwin``, built on GreenMIM), read from its public definition; no released Swin
checkpoint file could be inspected, so they remain an assumption until one is loaded:
    encoder.patch_embed.{proj,norm}.*                     patch embedding (conv 4 x 4) and its LayerNorm
    encoder.layers.{i}.blocks.{j}.{norm1,attn.qkv,attn.proj,attn.relative_position_bias_table,norm2,mlp.fc1,mlp.fc2}
    encoder.layers.{i}.blocks.{j}.attn.relative_position_index   a persistent buffer: checked, then dropped
    encoder.layers.{i}.downsample.{norm,reduction}.*      patch merging at the END of stage i (i = 0, 1, 2)
    encoder.norm.{k}.*                                    the four tap LayerNorms
    decoder.{k}.{embed,mask_token,pos_embed,blocks.0.*,norm,pred}.*   the four decoders (pred: the Linear head)
    hog_enc.{k}.conv.{weight,bias}                        fixed Sobel kernels (checked) and the frozen HOG bias
The released pre-training code concatenates the 2 x 2 merged tokens as (0,0), (0,1), (1,0), (1,1) (row, column),
where Swin (fine-tuning, timm, fastmim) uses (0,0), (1,0), (0,1), (1,1). Import therefore swaps channel blocks 1 and
2 of every ``downsample.norm`` and of the input side of ``downsample.reduction``, which leaves the network's function
unchanged in fastmim's order; export to the released layout swaps them back.

timm names (timm >= 0.9, e.g. ``swin_base_patch4_window7_224``): ``patch_embed.*``, ``layers.{i}.blocks.{j}.*``,
``layers.{i+1}.downsample.*`` (timm merges at the START of the next stage), ``norm.*`` (fastmim's last tap norm) and
the classifier ``head.fc.*``, which is not exported. timm's ``relative_position_index`` and ``attn_mask`` are
non-persistent buffers. timm's default LayerNorm eps is 1e-5; LocalMIM-Swin uses 1e-6, so build the timm model with
``norm_layer=partial(nn.LayerNorm, eps=1e-6)`` (see :func:`timm_swin_kwargs`) to get identical features.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from fastmim.errors import FastmimError
from fastmim.models import keymap
from fastmim.models.swin_encoder import SparseSwinEncoder

_BLOCK = r"(?:norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(?:weight|bias)|attn\.relative_position_bias_table"
_FIELDS = {
    "i": r"\d+",
    "j": r"\d+",
    "k": r"[0-3]",
    "p": r"weight|bias",
    "m": r"proj|norm",
    "b": _BLOCK,
    "d": r"norm\.weight|norm\.bias|reduction\.weight",
    "t": r"(?:embed|norm)\.(?:weight|bias)|mask_token|pos_embed|blocks\.0\.[a-z0-9_.]+",
}
# (released, fastmim)
_RELEASED = [
    ("encoder.patch_embed.{m}.{p}", "encoder.patch_embed.{m}.{p}"),
    ("encoder.layers.{i}.blocks.{j}.{b}", "encoder.layers.{i}.blocks.{j}.{b}"),
    ("encoder.layers.{i}.downsample.{d}", "encoder.layers.{i}.downsample.{d}"),
    ("encoder.norm.{k}.{p}", "tap_norms.{k}.{p}"),
    ("decoder.{k}.pred.{p}", "decoders.{k}.head.{p}"),
    ("decoder.{k}.{t}", "decoders.{k}.{t}"),
]
# (fastmim, timm); {n} = i + 1
_TIMM = [
    ("encoder.patch_embed.{m}.{p}", "patch_embed.{m}.{p}"),
    ("encoder.layers.{i}.blocks.{j}.{b}", "layers.{i}.blocks.{j}.{b}"),
    ("encoder.layers.{i}.downsample.{d}", "layers.{n}.downsample.{d}"),
    ("tap_norms.3.{p}", "norm.{p}"),
]
_INDEX = re.compile(r"encoder\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index")
_MERGE = re.compile(r"encoder\.layers\.\d+\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)")


def _translate(key: str, table: list[tuple[str, str]], forward: bool) -> str | None:
    for src, dst in table:
        match = keymap.template_pattern(src if forward else dst, _FIELDS).fullmatch(key)
        if match:
            fields = match.groupdict()
            if "i" in fields:
                fields["n"] = str(int(fields["i"]) + 1)
            return (dst if forward else src).format(**fields)
    return None


def swap_merge_order(t: Tensor, dim: int) -> Tensor:
    """Swap channel blocks 1 and 2 (of 4) along ``dim``: the released pre-training merge order (0,0), (0,1), (1,0),
    (1,1) <-> Swin's (0,0), (1,0), (0,1), (1,1). Its own inverse."""
    a, b, c, d = t.chunk(4, dim=dim)
    return torch.cat([a, c, b, d], dim=dim)


def _reorder_merge(key: str, value: Tensor) -> Tensor:
    return swap_merge_order(value, dim=1 if key.endswith("reduction.weight") else 0)


def relative_position_index(window: int) -> Tensor:
    """Swin's [w^2, w^2] index into the relative-position table for a w x w window (raster order)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def _window_of(table: Tensor) -> int:
    return (round(table.shape[0] ** 0.5) + 1) // 2


def convert_released_swin(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Released LocalMIM-Swin state dict -> fastmim names, in fastmim's (Swin's) merge order. Sobel kernels and
    relative-position indices are checked and dropped; per-scale HOG biases become ``target.bias`` [4, 2]."""
    state_dict = keymap.unwrap_state_dict(state_dict)
    out, biases = {}, {}
    for key, value in state_dict.items():
        if keymap.take_hog_layer(key, value, biases):
            continue
        if _INDEX.fullmatch(key):
            table = state_dict.get(key.replace("relative_position_index", "relative_position_bias_table"))
            expected = relative_position_index(_window_of(table)) if table is not None else None
            if (
                expected is None
                or value.shape != expected.shape
                or (not value.is_meta and not torch.equal(value.cpu().long(), expected))
            ):
                raise FastmimError(
                    f"{key} is not Swin's relative position index; this is not a LocalMIM-Swin checkpoint."
                )
            continue
        new = _translate(key, _RELEASED, forward=True)
        if new is None:
            raise FastmimError(f"unexpected key '{key}': this is not a released LocalMIM-Swin checkpoint.")
        out[new] = _reorder_merge(key, value) if _MERGE.fullmatch(new) else value
    return {**out, **keymap.stacked_hog_bias(biases)}


def export_released_swin(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The reverse of :func:`convert_released_swin` (merge order swapped back, indices and Sobel kernels added)."""
    out = {}
    for key, value in state_dict.items():
        if key == "target.bias":
            out.update(keymap.released_hog_biases(value))
            continue
        new = _translate(key, _RELEASED, forward=False)
        if new is None:
            raise FastmimError(f"'{key}' has no released LocalMIM-Swin counterpart.")
        out[new] = _reorder_merge(key, value) if _MERGE.fullmatch(key) else value
        if key.endswith("relative_position_bias_table"):
            index = new.replace("relative_position_bias_table", "relative_position_index")
            out[index] = relative_position_index(_window_of(value))
    if not _is_pixel(state_dict):
        out.update(keymap.released_sobel_weights())
    return out


def _is_pixel(sd: dict[str, Tensor]) -> bool:
    """The last tap predicts 32 px cells: 3 * 32 * 32 values for pixels, 3 * nbins for HOG."""
    cell = sd["encoder.patch_embed.proj.weight"].shape[-1] * 8
    return sd["decoders.3.head.weight"].shape[0] == 3 * cell * cell


def infer_swin_overrides(sd: dict[str, Tensor]) -> dict[str, Any]:
    """Constructor arguments that a fastmim-named LocalMIM-Swin state dict's shapes imply: image size, width,
    depths, heads, window, decoder width, target, HOG bins and bias. (Decoder heads cannot be read off shapes.)"""
    patch = sd["encoder.patch_embed.proj.weight"].shape[-1]
    stages = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    depths = [len({k.split(".")[4] for k in sd if k.startswith(f"encoder.layers.{s}.blocks.")}) for s in stages]
    tables = [sd[f"encoder.layers.{s}.blocks.0.attn.relative_position_bias_table"] for s in stages]
    kw: dict[str, Any] = {
        "img_size": round(sd["decoders.0.pos_embed"].shape[1] ** 0.5) * patch * 2,
        "patch_size": patch,
        "embed_dim": sd["encoder.patch_embed.proj.weight"].shape[0],
        "depths": tuple(depths),
        "num_heads": tuple(t.shape[1] for t in tables),
        "window_size": _window_of(tables[0]),
        "decoder_dim": sd["decoders.1.embed.weight"].shape[0],
    }
    if _is_pixel(sd):
        kw["target"] = "pixel"
    else:
        kw.update(target="hog", nbins=sd["decoders.0.head.weight"].shape[0] // 3, hog_bias="target.bias" in sd)
    return kw


def export_timm_swin(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The encoder of a fastmim LocalMIM-Swin state dict (a model's, or a checkpoint's "model") as a timm Swin
    state dict: timm's names, Swin's merge order, the last tap norm as timm's final ``norm``; no classifier head.
    Load it with ``timm_model.load_state_dict(sd, strict=False)`` (only ``head.fc.*`` missing)."""
    state_dict = keymap.unwrap_state_dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        new = _translate(key, _TIMM, forward=True)
        if new is not None:
            out[new] = value
    if "patch_embed.norm.weight" not in out or "layers.0.blocks.0.attn.relative_position_bias_table" not in out:
        raise FastmimError("this is not a fastmim LocalMIM-Swin state dict (no Swin encoder or last tap norm).")
    return out


def timm_swin_kwargs(encoder: SparseSwinEncoder) -> dict[str, Any]:
    """timm ``SwinTransformer`` constructor arguments that describe ``encoder`` (pass num_classes yourself)."""
    fc1 = encoder.layers[0].blocks[0].mlp.fc1
    return {
        "img_size": encoder.units_per_side * encoder.unit_size,
        "patch_size": encoder.patch_size,
        "embed_dim": encoder.embed_dim,
        "depths": tuple(len(layer.blocks) for layer in encoder.layers),
        "num_heads": tuple(layer.blocks[0].attn.num_heads for layer in encoder.layers),
        "window_size": encoder.window_size,
        "mlp_ratio": fc1.out_features / fc1.in_features,
        "norm_layer": partial(nn.LayerNorm, eps=1e-6),
    }
