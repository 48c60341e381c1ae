"""From fastmim encoders to timm's VisionTransformer (method 6): the one bridge used by finetune, linprobe and export.

fastmim's encoder (``model.encoder``: ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.{i}.{norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``) already uses timm's ViT names and layout: pre-norm blocks, qkv
bias, LayerNorm eps 1e-6, exact GELU, position embedding [1, 1 + L, D] added to the patches and (zero slot) to cls.
So the translation is a prefix strip. The evaluation model is timm's ViT with ``global_pool="avg"``: mean of the
patch tokens -> ``fc_norm`` (LayerNorm) -> ``head`` (Linear, trunc-normal std 2e-5), and no final ``norm`` (LocalMIM
has none; MAE's is dropped, as in MAE's fine-tuning). The tap norms, decoders and targets are pre-training only.

timm is imported lazily: ``import fastmim`` never needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastmim.errors import FastmimError
from fastmim.masking import Masking
from fastmim.models import create_model
from fastmim.train.checkpoint_files import FINETUNE_FORMAT, FINETUNE_VERSION, MODEL_FORMATS, ModelFile, load_file

_ENCODER = "encoder."
# Keys a classifier may lack when it starts from a pre-trained encoder: the fine-tuning head is new.
HEAD_KEYS = ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")


@dataclass
class Backbone:
    """An encoder ready for timm: ``state_dict`` uses timm's ViT names (encoder only, or a whole fine-tuned
    classifier), ``vit_kwargs`` are timm constructor arguments (patch_size, embed_dim, depth, num_heads, img_size)."""

    model_name: str
    vit_kwargs: dict[str, int]
    state_dict: dict[str, Tensor]
    source: str = "random init"
    classes: list[str] = field(default_factory=list)

    @property
    def timm_name(self) -> str:
        return timm_name(self.model_name)

    @property
    def img_size(self) -> int:
        return self.vit_kwargs["img_size"]


def timm_name(model_name: str) -> str:
    """timm's entrypoint for a fastmim ViT: localmim_vit_base_patch16 -> vit_base_patch16_224."""
    family, _, arch = model_name.partition("_")
    if family not in ("localmim", "mae") or not arch.startswith("vit_"):
        raise FastmimError(f"{model_name} has no timm ViT counterpart; evaluation supports the ViT models.")
    return f"{arch}_224"


def vit_kwargs(encoder: nn.Module) -> dict[str, int]:
    """timm VisionTransformer arguments describing a fastmim MaskedViTEncoder."""
    return {
        "patch_size": encoder.patch_size,
        "embed_dim": encoder.embed_dim,
        "depth": len(encoder.blocks),
        "num_heads": encoder.blocks[0].attn.num_heads,
        "img_size": encoder.grid * encoder.patch_size,
    }


def encoder_state_to_timm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The encoder's tensors of a fastmim LocalMIM / MAE state dict, under timm's names (prefix stripped)."""
    out = {k.removeprefix(_ENCODER): v for k, v in state_dict.items() if k.startswith(_ENCODER)}
    if "cls_token" not in out or "patch_embed.proj.weight" not in out:
        raise FastmimError("the weights hold no fastmim ViT encoder; give a LocalMIM / MAE ViT checkpoint.")
    return out


def backbone_from_model(model: nn.Module, model_name: str, source: str = "random init") -> Backbone:
    """A Backbone from a built fastmim model (its encoder's current weights)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Backbone(model_name, vit_kwargs(model.encoder), encoder_state_to_timm(sd), source)


def load_backbone(pretrained: str, name: str = "", img_size: int = 0, seed: int = 0) -> Backbone:
    """The encoder a run starts from: a fastmim checkpoint / weights file, a fine-tuned checkpoint, or (empty
    ``pretrained``) model ``name`` freshly initialised with fastmim's method 2.1 init, seeded by ``seed``."""
    if not pretrained:
        torch.manual_seed(seed)
        return backbone_from_model(create_model(name, img_size=img_size or 224), name)
    obj = load_file(pretrained, (*MODEL_FORMATS, FINETUNE_FORMAT))
    if obj["format"] == FINETUNE_FORMAT:
        return Backbone(obj["model_name"], dict(obj["vit_kwargs"]), obj["model"], pretrained, list(obj["classes"]))
    file = ModelFile.of(obj, pretrained)
    timm_name(file.name)  # refuses non-ViT models with a clear message
    skeleton = file.build(meta=True)  # shapes only; weights that do not fit are refused
    return Backbone(file.name, vit_kwargs(skeleton.encoder), encoder_state_to_timm(file.state), pretrained)


def build_vit(backbone: Backbone, num_classes: int, drop_path: float = 0.0, img_size: int = 0) -> nn.Module:
    """timm's VisionTransformer (global average pool -> fc_norm -> head) initialised from ``backbone``.

    ``num_classes = 0`` gives a feature extractor without head. The position embedding is resampled (bicubic, as
    timm does) when ``img_size`` differs from the backbone's. A head of another class count is re-initialised.
    """
    import timm
    from timm.layers import resample_abs_pos_embed

    kwargs = {**backbone.vit_kwargs, "img_size": img_size or backbone.img_size}
    # weight_init="skip": every tensor but the new head is loaded below (LayerNorms init themselves), and timm's
    # trunc-normal init of a whole ViT-B would cost seconds on CPU for nothing.
    model = timm.create_model(
        backbone.timm_name,
        pretrained=False,
        num_classes=num_classes,
        global_pool="avg",
        drop_path_rate=drop_path,
        weight_init="skip",
        **kwargs,
    )
    sd = dict(backbone.state_dict)
    grid = kwargs["img_size"] // kwargs["patch_size"]
    if sd["pos_embed"].shape != model.pos_embed.shape:
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"].float(), [grid, grid], num_prefix_tokens=1)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if not (k.startswith("head.") and (k not in own or own[k].shape != v.shape))}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or set(missing) - set(HEAD_KEYS):
        raise FastmimError(
            f"the weights do not fit timm's {backbone.timm_name} (missing {sorted(set(missing) - set(HEAD_KEYS))[:3]}, "
            f"unexpected {unexpected[:3]}); give a fastmim ViT checkpoint."
        )
    if "head.weight" in missing:
        nn.init.trunc_normal_(model.head.weight, std=2e-5)  # method 6
        nn.init.zeros_(model.head.bias)
    return model


def encode_all(encoder: nn.Module, imgs: Tensor) -> Tensor:
    """fastmim encoder output with every patch visible: [B, 3, H, W] -> [B, 1 + L, D] (last block, un-normed)."""
    b, length = imgs.shape[0], encoder.num_patches
    ids = torch.arange(length, device=imgs.device).expand(b, length)
    masking = Masking(ids, ids, torch.zeros(b, length, device=imgs.device))
    return encoder(imgs, masking, [len(encoder.blocks) - 1])[0]


def finetune_state(backbone: Backbone, model: nn.Module, classes: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    """A fine-tuned checkpoint: the classifier under timm names plus what rebuilds it (see load_backbone)."""
    kwargs = {**backbone.vit_kwargs, "img_size": model.patch_embed.img_size[0]}
    return {
        "format": FINETUNE_FORMAT,
        "version": FINETUNE_VERSION,
        "model_name": backbone.model_name,
        "vit_kwargs": kwargs,
        "classes": list(classes),
        "model": model.state_dict(),
        **extra,
    }


def describe(backbone: Backbone) -> str:
    kw = backbone.vit_kwargs
    return (
        f"{backbone.model_name} encoder ({kw['embed_dim']} wide, {kw['depth']} blocks, {kw['img_size']} px) "
        f"from {Path(backbone.source).name if backbone.source != 'random init' else 'random init'}"
    )
