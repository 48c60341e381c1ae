"""The CPU convergence check runs end to end (on a subset here) and records what it measured."""

import json

import torch

import fastmim.eval.convergence as convergence
import fastmim.eval.data as eval_data
from fastmim.config import load_config
from fastmim.eval.backbone import load_backbone
from fastmim.models import model_from_config


class _FewDigits(eval_data.DigitsSource):
    """The first 40 images of a split: enough for every code path, a second of work."""

    def __init__(self, split, size):
        super().__init__(split, size)
        self.images, self.labels = self.images[:40], self.labels[:40]


def test_convergence_check_smoke(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(eval_data, "DigitsSource", _FewDigits)
    monkeypatch.setattr(convergence, "DigitsSource", _FewDigits)
    work = tmp_path / "conv"
    args = [
        "--steps",
        "2",
        "--work",
        str(work),
        "--json",
        str(tmp_path / "r.json"),
        "--probe=--linprobe.epochs=2",
        "--",
        "--model.img_size=32",
        "--train.batch_size=8",
    ]
    assert convergence.main(args) == 0
    record = json.loads((tmp_path / "r.json").read_text())
    assert record == json.loads((work / "convergence.json").read_text())
    assert record["pretrain"]["steps"] == 2 and record["data"]["pretrain_images"] == 40
    results = record["probe"]["results"]
    assert set(results) == {"pretrained_avg", "pretrained_cls", "random_avg", "random_cls"}
    assert all(0 <= r["acc1"] <= 100 and r["num_val"] == 40 for r in results.values())
    assert "random init" in capsys.readouterr().out
    assert convergence.main(args) == 2  # never into a used work directory


def test_random_baseline_is_the_pretraining_starting_point():
    cfg = load_config("tiny_cpu", ["--model.img_size=32"])
    torch.manual_seed(cfg.train.seed)
    start = model_from_config(cfg.model).encoder.state_dict()
    baseline = load_backbone("", cfg.model.name, 32, cfg.train.seed).state_dict
    assert all(torch.equal(baseline[k], v) for k, v in start.items())
