"""The evaluation config tree: same grammar as pre-training, README reference in sync, timm kept out of fastmim."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastmim.errors import FastmimError
from fastmim.eval.config import dump_toml, eval_config_from_toml, eval_reference_markdown, load_eval_config

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
