"""Shared fixtures for the evaluation tests: tiny encoders and data sets that build in a second on CPU."""

import pytest
import torch

from fastmim.eval.data import DigitsSource
from fastmim.models import create_model
from fastmim.train.checkpoint_files import write_weights

TINY = "localmim_vit_tiny_patch16"


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A fastmim weights file of a ViT-Ti LocalMIM at 32 px (random weights, distinct from a fresh init)."""
    torch.manual_seed(123)
    model = create_model(TINY, img_size=32, decoder_dim=32)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    write_weights(model, path)
    return path


@pytest.fixture(scope="session")
def digits_tree(tmp_path_factory):
    """A small ImageFolder root with train/ (3 classes x 8) and val/ (3 classes x 4) digit images at 32 px."""
    root = tmp_path_factory.mktemp("digits_tree")
    for split, per_class in (("train", 8), ("val", 4)):
        source, counts = DigitsSource(split, 32), {}
        for i in range(len(source)):
            image, label = source.load(i)
            if label < 3 and counts.get(label, 0) < per_class:
                counts[label] = counts.get(label, 0) + 1
                folder = root / split / f"digit{label}"
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f"{i}.png")
    return root
