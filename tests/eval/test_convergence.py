"""`fastmim bench convergence` end to end on tiny IDX files: the record is complete, reruns continue, the summary
says what it claims."""

import json
import sys

import torch

import fastmim.train as fastmim_train
from fastmim.cli import main
from fastmim.config import load_config
from fastmim.eval.backbone import load_backbone
from fastmim.eval.convergence import METHODS, method_configs, seconds_to_reach, summarize
from fastmim.models import model_from_config
from tests.data.test_fashion_mnist import write_fashion

TINY_RUN = [
    "--model.img_size=32",
    "--model.decoder_dim=16",
    "--train.steps=4",
    "--train.warmup_steps=1",
    "--train.batch_size=4",
    "--train.log_every=1",
    "--points=2",
    "--finetune-steps=2",
    "--finetune-batch=4",
    "--linprobe=--linprobe.epochs=2",
]


def test_bench_convergence_writes_a_complete_record_and_continues_where_it_stopped(tmp_path, monkeypatch, capsys):
    data = write_fashion(tmp_path / "fmnist", n_train=24, n_test=8)
    work, out = tmp_path / "work", tmp_path / "results"
    argv = ["bench", "convergence", f"--data.path={data}", f"--work={work}", f"--out={out}", *TINY_RUN]
    monkeypatch.setattr(sys, "argv", ["fastmim", *argv])
    assert main(argv) == 0
    (path,) = out.glob("convergence-cpu-pt*.json")
    assert path.with_suffix(".png").stat().st_size > 0
    record = json.loads(path.read_text())
    assert record["command"].startswith("fastmim bench convergence") and record["git_sha"]
    assert record["git_shas"] == [record["git_sha"]]  # the commit when it started, once per invocation
    assert {"machine", "versions", "configs", "points", "baselines", "finetune", "eval_seconds"} <= set(record)
    assert "probes fit on 24 train images, scored on 8 (test split)" in record["data"]
    for m in METHODS:
        points = record["points"][m]
        assert [p["step"] for p in points] == [2, 4] and [p["images"] for p in points] == [8, 16]
        assert 0 < points[0]["pretrain_s"] < points[1]["pretrain_s"]
        assert all(0 <= p[probe] <= 100 for p in points for probe in ("knn", "linear"))
    assert "mae_vit_tiny_patch16" in record["configs"]["mae"] and "localmim_vit_tiny" in record["configs"]["localmim"]
    s = record["summary"]
    assert set(s) == {"localmim", "mae", "random", "pixels", "localmim_seconds_to_mae_final"}
    for m in METHODS:
        assert set(s[m]) == {"knn", "linear", "finetune", "pretrain_seconds"}
    assert set(s["random"]) == {"knn", "linear", "finetune"} and set(s["pixels"]) == {"knn", "linear"}
    assert set(s["localmim_seconds_to_mae_final"]) == {"knn", "linear", "finetune"}
    assert "LocalMIM reached MAE's final top-1" in capsys.readouterr().out

    # A rerun in the same --work redoes nothing that is done: drop MAE's last probe and the random fine-tune.
    state = json.loads((work / "state.json").read_text())
    state["points"]["mae"][1].update(knn=None, linear=None)
    del state["finetune"]["random"]
    (work / "state.json").write_text(json.dumps(state))
    calls = []
    monkeypatch.setattr(fastmim_train, "train", lambda *a, **k: calls.append(a))
    assert main(argv) == 0
    assert calls == []  # no pre-training again
    again = json.loads(max(out.glob("convergence-*.json"), key=lambda p: p.stat().st_mtime).read_text())
    assert again["points"]["localmim"] == record["points"]["localmim"]
    assert again["points"]["mae"][1]["pretrain_s"] == record["points"]["mae"][1]["pretrain_s"]
    assert again["points"]["mae"][1]["knn"] is not None and "random" in again["finetune"]
    # Other settings in the same --work are refused in one line.
    assert main([*argv, "--points=3"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_holdout_mode_scores_train_images_kept_out_of_pretraining(tmp_path):
    data = write_fashion(tmp_path / "fmnist", n_train=24, n_test=8)
    cfgs = method_configs("convergence_fmnist_cpu", [f"--data.path={data}"], tmp_path / "w", holdout=6)
    assert {c.data.holdout for c in cfgs.values()} == {6}
    assert (cfgs["localmim"].model.name, cfgs["mae"].model.name) == (
        "localmim_vit_tiny_patch16",
        "mae_vit_tiny_patch16",
    )


def test_summary_seconds_to_reach_mae_final():
    pts = [{"pretrain_s": 10.0, "knn": 50.0}, {"pretrain_s": 20.0, "knn": 70.0}, {"pretrain_s": 30.0, "knn": 65.0}]
    assert seconds_to_reach(pts, "knn", 60.0) == 20.0
    assert seconds_to_reach(pts, "knn", 71.0) is None
    point = {"knn": 1.0, "linear": 2.0, "pretrain_s": 5.0}
    state = {
        "points": {"localmim": [point], "mae": [{**point, "knn": 0.5, "linear": 3.0, "pretrain_s": 9.0}]},
        "baselines": {"random": {"knn": 0.1, "linear": 0.2}, "pixels": {"knn": 0.3, "linear": 0.4}},
        "finetune": {"localmim": {"top1": 80.0}, "mae": {"top1": 81.0}, "random": {"top1": 70.0}},
    }
    s = summarize(state)
    assert s["localmim_seconds_to_mae_final"] == {"knn": 5.0, "linear": None, "finetune": None}
    assert s["mae"] == {"knn": 0.5, "linear": 3.0, "finetune": 81.0, "pretrain_seconds": 9.0}


def test_gpu_recipe_is_valid_for_both_methods(tmp_path):
    cfgs = method_configs("convergence_imagenet100_gpu", [], tmp_path / "w", holdout=0)
    for m, cfg in cfgs.items():
        assert cfg.model.resolved_img_size == 224 and cfg.data.source == "folder" and cfg.train.steps > 0
        assert cfg.model.name == f"{m}_vit_base_patch16"


def test_random_baseline_is_the_pretraining_starting_point():
    cfg = load_config("tiny_cpu", ["--model.img_size=32"])
    torch.manual_seed(cfg.train.seed)
    start = model_from_config(cfg.model).encoder.state_dict()
    baseline = load_backbone("", cfg.model.name, 32, cfg.train.seed).state_dict
    assert all(torch.equal(baseline[k], v) for k, v in start.items())


def test_segments_stopped_with_stop_at_train_exactly_like_one_run(tmp_path):
    """train(cfg, stop_at) keeps the whole run's schedule: 2 + 2 resumed steps = 4 steps in one go, bit for bit."""
    from fastmim.train import train
    from fastmim.train.checkpoint_files import load_checkpoint

    def cfg(name):
        fast = ["--model.img_size=32", "--model.decoder_dim=16", "--data.num_images=16", "--train.batch_size=4"]
        extra = ["--train.steps=4", "--train.warmup_steps=1", "--train.device=cpu", "--train.resume=auto"]
        return load_config(None, [*fast, *extra, f"--train.out_dir={tmp_path / name}"])

    whole = train(cfg("whole"))
    first = train(cfg("parts"), stop_at=2)
    assert first["steps"] == 2 and first["total_steps"] == 4
    second = train(cfg("parts"), stop_at=4)
    assert second["steps"] == 4
    a, b = load_checkpoint(whole["checkpoint"])["model"], load_checkpoint(second["checkpoint"])["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stored_settings_compare_as_parsed_toml_not_as_text():
    from fastmim.eval.convergence import same_settings

    old = {"configs": {"localmim": "[train]\nbatch_size = 64\nblr = 0.0015\n"}, "options": {"points": 5}}
    reordered = {"configs": {"localmim": "[train]\nblr = 0.0015\nbatch_size = 64\n"}, "options": {"points": 5}}
    changed = {"configs": {"localmim": "[train]\nblr = 0.003\nbatch_size = 64\n"}, "options": {"points": 5}}
    assert same_settings(old, reordered) and not same_settings(old, changed)
    assert not same_settings(old, {**reordered, "options": {"points": 6}})
