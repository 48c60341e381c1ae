"""The data section the loader tests build their loaders from: a real DataConfig, accepted by validate first, as
`fastmim pretrain` hands it to fastmim.data.build_loader (which checks nothing validate owns)."""

from fastmim.config import Config, DataConfig, validate


def data_config(**keys: object) -> DataConfig:
    """``DataConfig(**keys)`` after :func:`fastmim.config.validate` accepted it (in a default Config); a bad value
    raises validate's one-line FastmimError, the message a user gets."""
    cfg = Config(data=DataConfig(**keys))
    validate(cfg)
    return cfg.data
