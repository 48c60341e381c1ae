"""Training: the loop, optimizer and schedule, checkpoints, metrics."""

from fastmim.train.trainer import train

__all__ = ["train"]
