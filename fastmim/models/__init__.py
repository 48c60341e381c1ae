"""Models: the masked ViT encoder, decoders and heads, LocalMIM (ViT and Swin), MAE, and the registry."""

from fastmim.models.base import MIMOutput
from fastmim.models.localmim import LocalMIMViT
from fastmim.models.mae import MAEViT
from fastmim.models.registry import create_model, list_models, model_from_config, register_model
from fastmim.models.swin import LocalMIMSwin

__all__ = [
    "LocalMIMSwin",
    "LocalMIMViT",
    "MAEViT",
    "MIMOutput",
    "create_model",
    "list_models",
    "model_from_config",
    "register_model",
]
