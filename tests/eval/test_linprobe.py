"""fastmim linprobe: features extracted once, BatchNorm(no affine) + linear, SGD or LARS, fast on CPU."""

import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from fastmim.cli import main
from fastmim.eval.config import load_eval_config
from fastmim.eval.linprobe import LinearProbe, build_probe_optimizer, linprobe
from fastmim.train.rundir import hold_run_dir


def test_probe_head_is_mae_protocol():
    probe = LinearProbe(16, 4)
    bn, fc = probe
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and fc.bias.abs().sum() == 0
    assert 0.005 < fc.weight.std() < 0.015  # trunc-normal std 0.01
    lars = build_probe_optimizer(probe, "lars", 1.0, 0.9, 0.0)
    assert [g["always_adapt"] for g in lars.param_groups] == [True, False]  # trust ratio on the weight only


def test_features_extracted_once_and_digits_learned(monkeypatch, tmp_path):
    calls = []
    original = VisionTransformer.forward_features
    monkeypatch.setattr(
        VisionTransformer, "forward_features", lambda self, x: calls.append(len(x)) or original(self, x)
    )
    overrides = [
        "--model.img_size=32",
        "--linprobe.epochs=8",
        "--linprobe.warmup_epochs=1",
        "--linprobe.extract_batch_size=512",
        f"--linprobe.out_dir={tmp_path / 'lp'}",
    ]
    cfg = load_eval_config(None, overrides)
    summary = linprobe(cfg)
    assert calls == [512, 512, 413, 360]  # 1437 train + 360 val digits: each image through the encoder once
    assert summary["num_train"] == 1437 and summary["num_val"] == 360 and summary["feature_dim"] == 192
    assert summary["acc1"] > 50  # chance is 10%: even a random ViT-Ti separates digits linearly
    rows = [json.loads(line) for line in (tmp_path / "lp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(8)) and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert json.loads((tmp_path / "lp" / "result.json").read_text())["acc1"] == summary["acc1"]
    assert (tmp_path / "lp" / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("extra", [["--linprobe.optimizer=lars", "--linprobe.lr=2.0"], ["--linprobe.pool=cls"]])
def test_cli_linprobe_variants(tiny_weights, digits_tree, tmp_path, capsys, extra):
    out = tmp_path / "lp"
    args = [
        "linprobe",
        f"--model.pretrained={tiny_weights}",
        "--data.source=folder",
        f"--data.path={digits_tree}",
        "--linprobe.epochs=3",
        "--linprobe.batch_size=8",
        f"--linprobe.out_dir={out}",
        *extra,
    ]
    assert main(args) == 0
    assert "top-1" in capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert result["num_train"] == 24 and result["num_val"] == 12 and 0 <= result["acc1"] <= 100
    assert main(args) == 2  # never on top of an existing run
    assert "already holds a run" in capsys.readouterr().err
    with hold_run_dir(out, "linprobe.out_dir"):  # a running linprobe holds it: refused first, naming the holder
        assert main(args) == 2
    assert f"linprobe.out_dir {out} is in use by another run (pid " in capsys.readouterr().err
