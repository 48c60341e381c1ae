"""Import and export of the authors' released LocalMIM and MAE checkpoints (method section 9); LocalMIM-Swin's
are translated by fastmim.models.swin_weights.

One table of name templates per family drives both directions, so import and export cannot drift apart. The
released HOG layers (``hog_enc.{k}.conv``) hold the fixed Sobel kernels, checked on import and written back on export,
and (ViT-L) the frozen per-scale bias, which becomes the target's ``bias`` buffer [4, 2] (fastmim.models.keymap).
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor, nn

from fastmim.errors import FastmimError
from fastmim.models import keymap
from fastmim.models.keymap import unwrap_state_dict
from fastmim.models.registry import create_model, name_is_localmim, name_is_swin
from fastmim.models.swin_weights import convert_released_swin, export_released_swin, infer_swin_overrides

_COMMON = [
    ("patch_embed.proj.{p}", "encoder.patch_embed.proj.{p}"),
    ("cls_token", "encoder.cls_token"),
    ("pos_embed", "encoder.pos_embed"),
    ("blocks.{i}.{r}", "encoder.blocks.{i}.{r}"),
]
# (released, fastmim). In the released heads `pred` is a Sequential: s = 4: 0 ConvT, 1 LN2d, 2 GELU, 3 ConvT,
# 4 1x1 conv; s = 2: 0 ConvT, 1 conv; s = 1: 0 conv; s = 1/2: 0 AvgPool, 1 conv.
_LOCALMIM = _COMMON + [
    ("norm.{k}.{p}", "tap_norms.{k}.{p}"),
    ("decoder.{k}.embed.{p}", "decoders.{k}.embed.{p}"),
    ("decoder.{k}.mask_token", "decoders.{k}.mask_token"),
    ("decoder.{k}.pos_embed", "decoders.{k}.pos_embed"),
    ("decoder.{k}.blocks.{i}.{r}", "decoders.{k}.blocks.{i}.{r}"),
    ("decoder.{k}.norm.{p}", "decoders.{k}.norm.{p}"),
    ("decoder.0.pred.0.{p}", "decoders.0.head.up1.{p}"),
    ("decoder.0.pred.1.{p}", "decoders.0.head.norm.{p}"),
    ("decoder.0.pred.3.{p}", "decoders.0.head.up2.{p}"),
    ("decoder.0.pred.4.{p}", "decoders.0.head.proj.{p}"),
    ("decoder.1.pred.0.{p}", "decoders.1.head.up1.{p}"),
    ("decoder.1.pred.1.{p}", "decoders.1.head.proj.{p}"),
    ("decoder.2.pred.0.{p}", "decoders.2.head.proj.{p}"),
    ("decoder.3.pred.1.{p}", "decoders.3.head.proj.{p}"),
]
_MAE = _COMMON + [
    ("norm.{p}", "norm.{p}"),
    ("decoder_embed.{p}", "decoder.embed.{p}"),
    ("mask_token", "decoder.mask_token"),
    ("decoder_pos_embed", "decoder.pos_embed"),
    ("decoder_blocks.{i}.{r}", "decoder.blocks.{i}.{r}"),
    ("decoder_norm.{p}", "decoder.norm.{p}"),
    ("decoder_pred.{p}", "pred.{p}"),
]
_FIELDS = {"p": r"(weight|bias)", "i": r"\d+", "k": r"[0-3]", "r": r"[a-z0-9_.]+"}


def _rules(name: str, to_fastmim: bool) -> list[tuple[re.Pattern[str], str]]:
    table = _LOCALMIM if name_is_localmim(name) else _MAE
    pairs = table if to_fastmim else [(dst, src) for src, dst in table]
    return [(keymap.template_pattern(src, _FIELDS), dst) for src, dst in pairs]


def _translate(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in rules:
        match = pattern.fullmatch(key)
        if match:
            return template.format(**match.groupdict())
    return None


def convert_released_state_dict(state_dict: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """Translate a released LocalMIM / MAE state dict (method 9 names) to fastmim names for model ``name``.

    Every key is mapped or checked: the Sobel weights must be the fixed kernels, per-scale HOG biases are stacked
    into ``target.bias`` [4, 2]. Unknown keys are refused. Swin models: see fastmim.models.swin_weights.
    """
    if name_is_swin(name):
        return convert_released_swin(state_dict)
    state_dict = unwrap_state_dict(state_dict)
    rules, out, biases = _rules(name, to_fastmim=True), {}, {}
    for key, value in state_dict.items():
        if name_is_localmim(name) and keymap.take_hog_layer(key, value, biases):
            continue
        new = _translate(key, rules)
        if new is None:
            raise FastmimError(f"unexpected key '{key}' for {name}: this is not a released {name} checkpoint.")
        out[new] = value
    return {**out, **keymap.stacked_hog_bias(biases)}


def export_released_state_dict(state_dict: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """The reverse of :func:`convert_released_state_dict`: fastmim names -> released names (with Sobel weights)."""
    if name_is_swin(name):
        return export_released_swin(state_dict)
    rules, out = _rules(name, to_fastmim=False), {}
    for key, value in state_dict.items():
        if key == "target.bias":
            out.update(keymap.released_hog_biases(value))
            continue
        new = _translate(key, rules)
        if new is None:
            raise FastmimError(f"'{key}' has no released counterpart for {name}.")
        out[new] = value
    if name_is_localmim(name) and _has_hog(state_dict):
        out.update(keymap.released_sobel_weights())
    return out


def _has_hog(fastmim_sd: dict[str, Tensor]) -> bool:
    """A LocalMIM state dict predicts HOG unless its s = 1 head emits p * p * 3 pixel values."""
    patch = fastmim_sd["encoder.patch_embed.proj.weight"].shape[-1]
    return fastmim_sd["decoders.2.head.proj.weight"].shape[0] != 3 * patch * patch


def infer_overrides(sd: dict[str, Tensor], name: str) -> dict[str, Any]:
    """Constructor overrides that the shapes of released weights (fastmim names) imply: image size, decoder width,
    bins, bias, target. For the authors' files, which store no arguments; fastmim's own files store theirs
    (fastmim.train.checkpoint_files), except those of format version 1, which are read through this too."""
    if name_is_swin(name):
        return infer_swin_overrides(sd)
    patch = sd["encoder.patch_embed.proj.weight"].shape[-1]
    grid = round((sd["encoder.pos_embed"].shape[1] - 1) ** 0.5)
    kw: dict[str, Any] = {"img_size": grid * patch}
    if name_is_localmim(name):
        kw["decoder_dim"] = sd["decoders.0.embed.weight"].shape[0]
        if _has_hog(sd):
            kw.update(target="hog", nbins=sd["decoders.0.head.proj.weight"].shape[0] // 3, hog_bias="target.bias" in sd)
        else:
            kw["target"] = "pixel"
    else:
        kw["decoder_dim"] = sd["decoder.embed.weight"].shape[0]
        kw["decoder_depth"] = len({k.split(".")[2] for k in sd if k.startswith("decoder.blocks.")})
    return kw


def import_released(state_dict: dict[str, Tensor], name: str, impl: str = "reference", **overrides: Any) -> nn.Module:
    """Build model ``name`` from a released state dict; it computes the authors' loss and gradients (LocalMIM-Swin:
    with ``mask_rule="released"``, which selects the authors' mask count and token coordinates; the default,
    "exact", computes the true-coordinate variant with the same weights).

    Image size, decoder width, HOG bins and bias are read off the tensors; ``overrides`` set what shapes cannot
    tell (head counts), a non-registered size, or Swin's ``mask_rule`` / ``swin_coords``.
    """
    converted = convert_released_state_dict(state_dict, name)
    try:
        model = create_model(name, impl=impl, **{**infer_overrides(converted, name), **overrides})
    except KeyError as e:
        raise FastmimError(f"the checkpoint lacks {e} : it is not a released {name} checkpoint.") from None
    load_checked(model, converted, name)
    return model


def load_checked(model: nn.Module, state_dict: dict[str, Tensor], name: str) -> None:
    """load_state_dict(strict) with one clear sentence on missing, unexpected or mis-shaped tensors."""
    check_fits(model.state_dict(), state_dict, name)
    model.load_state_dict(state_dict, strict=True)


def check_fits(own: dict[str, Tensor], state_dict: dict[str, Tensor], name: str) -> None:
    """Refuse, in one sentence, a state dict whose names or shapes differ from ``own`` (model ``name``'s; shapes
    are enough, so ``own`` may be a meta-device model's)."""
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or wrong:
        detail = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {unexpected[:3]}"
            if unexpected
            else f"{wrong[0]} has shape {list(state_dict[wrong[0]].shape)}, {name} needs {list(own[wrong[0]].shape)}"
        )
        raise FastmimError(f"the weights do not fit {name} ({detail}); pick the model the checkpoint was made for.")
