"""The evaluation config tree: same grammar as pre-training, README reference in sync, timm kept out of fastmim."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastmim.config import AdamWConfig, OptimizerConfig, TrainConfig, field_docs
from fastmim.errors import FastmimError
from fastmim.eval.config import (
    FinetuneConfig,
    LinprobeConfig,
    dump_toml,
    eval_config_from_toml,
    eval_reference_markdown,
    load_eval_config,
)

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_defaults_recipe_overrides_and_round_trip():
    cfg = load_eval_config(None, ["--finetune.layer_decay=0.65", "--linprobe.optimizer", "lars"])
    assert cfg.model.name == "localmim_vit_tiny_patch16" and cfg.data.source == "digits"  # eval_tiny_cpu
    assert cfg.finetune.layer_decay == 0.65 and cfg.linprobe.optimizer == "lars"
    assert eval_config_from_toml(dump_toml(cfg)) == cfg


@pytest.mark.parametrize(
    "override,message",
    [
        ("--finetune.layer_decy=0.6", "did you mean 'layer_decay'"),
        ("--linprobe.pool=max", "linprobe.pool"),
        ("--finetune.mixup=x", "finetune.mixup must be float"),
        ("--train.steps=3", "unknown config section 'train'"),
    ],
)
def test_errors_name_the_fix(override, message):
    with pytest.raises(FastmimError, match=message):
        load_eval_config(None, [override])


def test_readme_reference_is_current():
    start = README.index("<!-- eval-config-reference")
    body = README[README.index("\n", start) + 1 : README.index("<!-- /eval-config-reference -->")].strip()
    assert body == eval_reference_markdown(), "regenerate the README table with `fastmim finetune --keys`"


def test_import_fastmim_needs_no_eval_dependency():
    code = "import sys, fastmim, fastmim.cli; assert not {'timm', 'safetensors', 'sklearn'} & set(sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_optimizer_keys_are_declared_documented_and_checked_once():
    """[train], [finetune] and [linprobe] share fastmim.config's optimizer section: one docstring and one range check
    per key, named for the section; each section keeps its own defaults."""
    shared, adamw = field_docs(OptimizerConfig), field_docs(AdamWConfig)
    assert set(shared) == {"warmup_epochs", "blr", "lr", "min_lr", "weight_decay"}
    assert set(adamw) - set(shared) == {"beta1", "beta2", "clip_grad"}
    for cls in (TrainConfig, FinetuneConfig):
        docs = field_docs(cls)
        assert {key: docs[key] for key in adamw} == adamw, cls
    linprobe = field_docs(LinprobeConfig)
    assert {key: linprobe[key] for key in shared} == shared and "beta1" not in linprobe
    f, p = FinetuneConfig(), LinprobeConfig()
    assert (f.warmup_epochs, f.blr, f.min_lr, f.weight_decay, f.beta2) == (5.0, 5e-4, 1e-6, 0.05, 0.999)
    assert (p.warmup_epochs, p.blr, p.lr, p.min_lr, p.weight_decay) == (10.0, 0.1, 0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "override,message",
    [
        ("--finetune.warmup_epochs=-1", "finetune.warmup_epochs must be >= 0 (a warm-up length in epochs)."),
        ("--finetune.weight_decay=-0.1", "finetune.weight_decay must be >= 0."),
        ("--finetune.beta2=1", "finetune.beta1 and finetune.beta2 must be in [0, 1)."),
        ("--finetune.clip_grad=-1", "finetune.clip_grad must be >= 0 (0 = off)."),
        ("--linprobe.min_lr=-1", "linprobe.lr and linprobe.min_lr must be >= 0."),
        ("--linprobe.blr=0", "linprobe.blr (or linprobe.lr) must be positive."),
        ("--linprobe.warmup_epochs=-2", "linprobe.warmup_epochs must be >= 0 (a warm-up length in epochs)."),
    ],
)
def test_optimizer_keys_are_checked_in_every_section(override, message):
    with pytest.raises(FastmimError) as info:
        load_eval_config(None, [override])
    assert str(info.value) == message
