"""`fastmim bench ablations` on tiny IDX files: each variant is its recipe plus its overrides, scored on held-out
train images only; reruns continue; bad options are one line."""

import json
import sys

import pytest

import fastmim.train as fastmim_train
from fastmim.cli import main
from fastmim.errors import FastmimError
from fastmim.eval.ablations import VARIANTS, select, variant_config
from tests.data.test_fashion_mnist import write_fashion

TINY = [
    "--model.img_size=32",
    "--model.decoder_dim=16",
    "--train.steps=2",
    "--train.warmup_steps=1",
    "--train.batch_size=4",
    "--train.log_every=1",
    "--linprobe=--linprobe.epochs=2",
]


def test_variants_change_only_what_they_name(tmp_path):
    base = variant_config("convergence_fmnist_cpu", [], tmp_path, 100, select("localmim")[0])
    for v in VARIANTS:
        cfg = variant_config("convergence_fmnist_cpu", [], tmp_path, 100, v)
        assert cfg.model.name.startswith(f"{v.method}_vit_tiny") and cfg.data.holdout == 100
        assert cfg.train.steps == round(base.train.steps * v.steps_factor)
        assert str(cfg.train.out_dir).endswith(f"{v.label}/{v.method}")
    cfg = variant_config("convergence_fmnist_cpu", [], tmp_path, 100, select("localmim-pixel")[0])
    assert cfg.model.target == "pixel" and cfg.model.img_size == base.model.img_size


def test_ablations_score_held_out_train_images_and_continue(tmp_path, monkeypatch, capsys):
    data = write_fashion(tmp_path / "fmnist", n_train=24, n_test=8)
    work, out = tmp_path / "work", tmp_path / "results"
    argv = ["bench", "ablations", f"--data.path={data}", f"--work={work}", f"--out={out}", "--holdout=8"]
    argv += ["--only=localmim,mae-2x", *TINY]
    monkeypatch.setattr(sys, "argv", ["fastmim", *argv])
    assert main(argv) == 0
    (path,) = out.glob("convergence_ablations-cpu-pt*.json")
    record = json.loads(path.read_text())
    assert [r["label"] for r in record["variants"]] == ["localmim", "mae-2x"]
    assert [r["steps"] for r in record["variants"]] == [2, 4]
    assert "scored on 8 (last 8 train images" in record["data"]["32 px"]
    assert set(record["baselines"]) == {"random@32", "pixels@32"}
    for r in record["variants"]:
        assert 0 <= r["knn"] <= 100 and 0 <= r["linear"] <= 100 and r["pretrain_s"] > 0
        assert r["git_sha"] == record["git_sha"]
    assert "localmim-pixel" not in capsys.readouterr().out
    # A rerun trains nothing already done.
    calls = []
    monkeypatch.setattr(fastmim_train, "train", lambda *a, **k: calls.append(a))
    assert main(argv) == 0 and calls == []
    # Other settings under the same label are refused in one line, as are an unknown label and no hold-out.
    assert main([*argv, "--train.blr=1e-2"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert main([*argv[:-1], "--only=nonsense"]) == 2
    assert "unknown ablations nonsense" in capsys.readouterr().err


def test_ablations_refuse_to_score_without_a_holdout(tmp_path):
    from fastmim.eval.ablations import run_ablations
    from fastmim.eval.convergence import Options

    with pytest.raises(FastmimError, match="--holdout N"):
        run_ablations("convergence_fmnist_cpu", [], tmp_path, Options(holdout=0))
