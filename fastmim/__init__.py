"""fastmim: fast LocalMIM masked-image-modeling pre-training for vision transformers.

Public API: ``create_model``, ``list_models``, ``convert_released_state_dict``, ``export_released_state_dict``,
``import_released``, ``load_config``, ``train``.

The names that need torch are imported on first use, so that ``import fastmim.cli`` (the command) stays light (a
fraction of a second): a Ctrl-C during the seconds torch takes to import then reaches the command's own one-line
handling instead of ending in a traceback.
"""

import importlib

from fastmim.config import Config, load_config
from fastmim.errors import FastmimError

__version__ = "0.1.0"

_LAZY = {
    "MIMOutput": "fastmim.models",
    "create_model": "fastmim.models",
    "list_models": "fastmim.models",
    "convert_released_state_dict": "fastmim.models.released",
    "export_released_state_dict": "fastmim.models.released",
    "import_released": "fastmim.models.released",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'fastmim' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


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
