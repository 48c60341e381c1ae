"""fastmim's file formats: model arguments stored and rebuilt from, version 1 files (today's layout before the
arguments were stored, written here as that release wrote them) still read, one reader per format that verifies."""

import pytest
import torch

from fastmim.errors import FastmimError
from fastmim.models import create_model
from fastmim.targets import PixelTarget
from fastmim.train.checkpoint_files import (
    FINETUNE_FORMAT,
    MODEL_FORMATS,
    WEIGHTS_FORMAT,
    CorruptCheckpoint,
    ModelFile,
    load_file,
    read_record,
    write_checkpoint,
    write_weights,
)

TINY = "localmim_vit_tiny_patch16"
# What the tensors' shapes cannot tell: the decoders' head count and the mask ratio.
UNSEEN = {"img_size": 32, "decoder_dim": 32, "decoder_heads": 4, "mask_ratio": 0.6, "target": "pixel"}


def _heads(model):
    return model.decoders[0].blocks[0].attn.num_heads


def test_a_weights_file_rebuilds_the_model_it_was_written_from(tmp_path):
    model = create_model(TINY, **UNSEEN)
    write_weights(model, tmp_path / "w.pt")
    file = ModelFile.read(tmp_path / "w.pt")
    assert (file.name, file.kwargs, file.inferred) == (TINY, UNSEEN, False)
    rebuilt = file.build()
    assert _heads(rebuilt) == 4 and rebuilt.mask_ratio == 0.6 and isinstance(rebuilt.target, PixelTarget)
    rebuilt.load_state_dict(file.state, strict=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in rebuilt.state_dict().items())
    with pytest.raises(FastmimError, match="is a fastmim weights file .*; give a fine-tuned checkpoint"):
        load_file(tmp_path / "w.pt", (FINETUNE_FORMAT,))


def test_a_version_1_weights_file_still_loads_from_its_shapes(tmp_path):
    """Today's layout without a version or arguments (as `fastmim import-checkpoint` wrote it): the sizes are read off
    the tensors, what they cannot tell takes the defaults."""
    model = create_model(TINY, **UNSEEN)
    torch.save({"format": WEIGHTS_FORMAT, "model_name": TINY, "model": model.state_dict()}, tmp_path / "v1.pt")
    file = ModelFile.read(tmp_path / "v1.pt")
    assert file.inferred and file.kwargs == {"img_size": 32, "decoder_dim": 32, "target": "pixel"}
    rebuilt = file.build()
    assert _heads(rebuilt) == 8 and rebuilt.mask_ratio == 0.75  # the defaults: version 2 stores the real ones
    rebuilt.load_state_dict(file.state, strict=True)


def test_stored_arguments_are_checked(tmp_path):
    state = create_model(TINY, img_size=32, decoder_dim=32).state_dict()
    header = {"format": WEIGHTS_FORMAT, "version": 2, "model_name": TINY}
    cases = {
        "missing": ({}, "lacks a valid 'model_args' entry"),
        "other-name": ({"model_args": {"name": "mae_vit_tiny_patch16", "kwargs": {}}}, "names two models"),
        "not-plain": ({"model_args": {"name": TINY, "kwargs": {"img_size": {"px": 32}}}}, "lacks a valid 'model_args'"),
        "newer": ({"version": 3}, "has checkpoint version 3; this fastmim reads versions 1 to 2"),
    }
    for name, (entries, message) in cases.items():
        torch.save({**header, "model": state, **entries}, tmp_path / f"{name}.pt")
        with pytest.raises(FastmimError, match=message):
            ModelFile.read(tmp_path / f"{name}.pt")
    unbuildable = {"model_args": {"name": TINY, "kwargs": {"img_size": 33}}}
    torch.save({**header, "model": state, **unbuildable}, tmp_path / "unbuildable.pt")
    with pytest.raises(FastmimError, match=f"{TINY} cannot be built with the arguments its file stores"):
        ModelFile.read(tmp_path / "unbuildable.pt").build(meta=True)
    assert MODEL_FORMATS == ("fastmim-checkpoint", "fastmim-weights")


def _finetune(acc1):
    return {
        "format": FINETUNE_FORMAT,
        "version": 1,
        "model_name": TINY,
        "vit_kwargs": {"img_size": 32},
        "classes": ["a", "b"],
        "model": {"head.weight": torch.full((2, 3), acc1)},
        "optimizer": {},
        "scaler": {},
        "epoch": 0,
        "step": 3,
        "best_acc1": acc1,
    }


def test_a_rewritten_file_verifies_as_the_new_or_the_replaced_one(tmp_path):
    """A fine-tune's checkpoint-last.pt is rewritten every epoch: a kill between its record and its rename leaves
    the replaced file under the new record, which must still verify; other bytes must not."""
    path = tmp_path / "checkpoint-last.pt"
    write_checkpoint(_finetune(1.0), path)
    old = path.read_bytes()
    write_checkpoint(_finetune(2.0), path)
    record = read_record(path)
    assert record["previous"]["size"] == len(old)
    assert load_file(path, (FINETUNE_FORMAT,))["best_acc1"] == 2.0
    path.write_bytes(old)  # the record written, the rename not done
    assert load_file(path, (FINETUNE_FORMAT,))["best_acc1"] == 1.0
    flipped = bytearray(old)
    flipped[len(flipped) // 2] ^= 1
    path.write_bytes(bytes(flipped))
    with pytest.raises(CorruptCheckpoint, match="is corrupt"):
        load_file(path, (FINETUNE_FORMAT,))
    write_checkpoint({**_finetune(3.0), "epoch": "0"}, path)
    with pytest.raises(FastmimError, match="lacks a valid 'epoch' entry; give a fine-tuned checkpoint"):
        load_file(path, (FINETUNE_FORMAT,))


def test_a_file_written_before_records_is_replaced_safely(tmp_path):
    """A checkpoint-last.pt written before records existed (no .json): its first rewrite still records it as
    ``previous``, so a kill between that record and the rename leaves a file that verifies."""
    path = tmp_path / "checkpoint-last.pt"
    write_checkpoint(_finetune(1.0), path)
    old = path.read_bytes()
    path.with_name(path.name + ".json").unlink()  # as an earlier fastmim left it
    write_checkpoint(_finetune(2.0), path)
    path.write_bytes(old)  # the record written, the rename not done
    assert load_file(path, (FINETUNE_FORMAT,))["best_acc1"] == 1.0
