"""fastmim: fast LocalMIM masked-image-modeling pre-training for vision transformers.

Public API: ``create_model``, ``list_models``, ``convert_released_state_dict``, ``export_released_state_dict``,
``import_released``, ``load_config``, ``train``.
"""

from fastmim.config import Config, load_config
from fastmim.errors import FastmimError
from fastmim.models import MIMOutput, create_model, list_models
from fastmim.models.released import convert_released_state_dict, export_released_state_dict, import_released

__version__ = "0.1.0"


def train(cfg: Config) -> dict:
    """Pre-train per ``cfg`` (see :func:`fastmim.train.trainer.train`); imported lazily to keep import light."""
    from fastmim.train import train as _train

    return _train(cfg)


__all__ = [
    "Config",
    "FastmimError",
    "MIMOutput",
    "convert_released_state_dict",
    "create_model",
    "export_released_state_dict",
    "import_released",
    "list_models",
    "load_config",
    "train",
]
