"""Export an encoder as a safetensors file for timm's ViT: ``export_timm(src, out) -> metadata``.

``src`` is a pre-training checkpoint, a fastmim weights file (e.g. from ``fastmim import-checkpoint``) or a
fine-tuned checkpoint. The file holds timm's ``vit_{tiny,small,base,large}_patch16_224`` state dict for the
``global_pool="avg"`` variant (no final ``norm``; ``fc_norm`` before the head), so

    model = timm.create_model("vit_base_patch16_224", global_pool="avg", num_classes=0)
    model.load_state_dict(safetensors.torch.load_file(FILE))            # strict: nothing missing or unexpected

loads it (a fine-tuned export also carries ``head``: create it with that ``num_classes``). A pre-trained encoder has
no ``fc_norm`` yet: the export writes the identity LayerNorm (weight 1, bias 0) timm itself would initialise, so
``forward_features`` returns exactly fastmim's encoder tokens. The safetensors metadata records the timm model name
and the constructor arguments (``img_size`` etc. for non-224 encoders); :func:`load_timm` uses them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastmim import files
from fastmim.errors import FastmimError
from fastmim.eval.backbone import load_backbone

FORMATS = ("timm",)


def timm_state(src: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(timm state dict, safetensors metadata) of the encoder or classifier in ``src``."""
    backbone = load_backbone(src)
    sd = {k: v.detach().to(torch.float32).contiguous() for k, v in backbone.state_dict.items()}
    dim = backbone.vit_kwargs["embed_dim"]
    sd.setdefault("fc_norm.weight", torch.ones(dim))
    sd.setdefault("fc_norm.bias", torch.zeros(dim))
    num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    kwargs = {**backbone.vit_kwargs, "global_pool": "avg", "num_classes": num_classes}
    metadata = {
        "format": "pt",  # what timm / HF loaders expect of a PyTorch safetensors file
        "fastmim_export": "timm",
        "timm_model": backbone.timm_name,
        "timm_kwargs": json.dumps(kwargs, sort_keys=True),
        "fastmim_model": backbone.model_name,
        "source": Path(src).name,
        "fine_tuned": str(bool(backbone.classes)).lower(),
        "classes": json.dumps(backbone.classes),
    }
    return sd, metadata


def export_timm(src: str, out: str | Path) -> dict[str, str]:
    """Write ``src``'s encoder (or fine-tuned classifier) as timm safetensors at ``out``; returns the metadata."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise FastmimError("export needs safetensors; run pip install 'fastmim[eval]'.") from None
    sd, metadata = timm_state(src)
    with files.reported(out), files.output(out, overwrite=False) as tmp:
        save_file(sd, str(tmp), metadata=metadata)
    return metadata


def load_timm(path: str | Path, **overrides: Any) -> nn.Module:
    """timm's ViT rebuilt from an exported file (metadata -> create_model) with its weights loaded strictly."""
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("fastmim_export") != "timm":
        raise FastmimError(f"{path} is not a fastmim timm export; create it with `fastmim export CKPT --format timm`.")
    kwargs = {**json.loads(metadata["timm_kwargs"]), **overrides}
    model = timm.create_model(metadata["timm_model"], pretrained=False, **kwargs)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model


__all__ = ["FORMATS", "export_timm", "load_timm", "timm_state"]
