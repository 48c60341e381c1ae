"""fastmim finetune: a few CPU steps with the whole method 6 recipe, top-1/top-5 each epoch, best/last, resume."""

import json

import pytest
import torch

from fastmim.cli import main
from fastmim.errors import FastmimError
from fastmim.eval.backbone import load_backbone
from fastmim.eval.config import load_eval_config
from fastmim.eval.finetune import build_finetune, finetune
from fastmim.train.rundir import hold_run_dir
from fastmim.weights import safe_load


def _cfg(tiny_weights, digits_tree, out_dir, *extra):
    return load_eval_config(
        None,
        [
            f"--model.pretrained={tiny_weights}",
            "--model.img_size=0",
            "--model.drop_path=0.1",
            "--data.source=folder",
            f"--data.path={digits_tree}",
            "--finetune.batch_size=8",
            "--finetune.epochs=1",
            "--finetune.warmup_epochs=0.5",
            "--finetune.layer_decay=0.65",
            "--finetune.blr=1e-3",
            "--finetune.log_every=1",
            f"--finetune.out_dir={out_dir}",
            *extra,
        ],
    )


def test_finetune_runs_writes_best_last_curves_and_resumes(tiny_weights, digits_tree, tmp_path):
    out = tmp_path / "ft"
    summary = finetune(_cfg(tiny_weights, digits_tree, out))
    assert summary["steps"] == 3  # 24 train images / batch 8
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0]
    assert 0 <= rows[0]["acc1"] <= rows[0]["acc5"] <= 100 and rows[0]["acc5"] == 100.0  # 3 classes: top-5 = all
    for name in ("checkpoint-best.pt", "checkpoint-last.pt", "curves.png", "config.toml"):
        assert (out / name).is_file(), name
    last = safe_load(out / "checkpoint-last.pt")
    assert last["format"] == "fastmim-finetune" and last["classes"] == ["digit0", "digit1", "digit2"]
    # The layer-wise decay reached the optimizer: every group ran at peak-schedule lr x its method 6 scale.
    groups = last["optimizer"]["param_groups"]
    ratio = {round(g["lr"] / g["lr_scale"], 12) for g in groups}
    assert len(ratio) == 1 and {round(g["lr_scale"], 12) for g in groups} == {round(0.65**k, 12) for k in range(14)}
    # Training moved the encoder away from the pre-trained weights, and only slightly (lr 3e-5, 3 steps).
    start = load_backbone(str(tiny_weights)).state_dict["blocks.11.mlp.fc2.weight"]
    diff = (last["model"]["blocks.11.mlp.fc2.weight"] - start).abs().max()
    assert 0 < diff < 1e-2
    # A second fresh run in the same directory is refused; resume=auto continues at the next epoch.
    with pytest.raises(FastmimError, match="already holds a run"):
        build_finetune(_cfg(tiny_weights, digits_tree, out))
    summary = finetune(_cfg(tiny_weights, digits_tree, out, "--finetune.epochs=2", "--finetune.resume=auto"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and summary["steps"] == 6
    best = safe_load(out / "checkpoint-best.pt")
    assert best["acc1"] == max(r["acc1"] for r in rows) and "optimizer" not in best


def test_cli_finetune_from_scratch(digits_tree, tmp_path, capsys):
    out = tmp_path / "ft"
    code = main(
        [
            "finetune",
            "--model.name=localmim_vit_tiny_patch16",
            "--model.img_size=32",
            "--data.source=folder",
            f"--data.path={digits_tree}",
            "--finetune.steps=2",
            "--finetune.batch_size=8",
            f"--finetune.out_dir={out}",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0 and "best top-1" in text and "[finetune]" in text
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 2 and 0 <= row["acc1"] <= row["acc5"] <= 100


def test_user_errors(tmp_path, digits_tree, capsys):
    cases = [
        (["finetune", "--finetune.layer_decay=0"], "finetune.layer_decay"),
        (["finetune", "--finetune.batch_size=7"], "even"),
        (["finetune", "--finetun.epochs=1"], "did you mean 'finetune'"),
        (["finetune", "--config=tiny_cpu"], "pre-training recipe"),
        (["linprobe", "--data.source=folder", f"--data.path={tmp_path}"], "train/ and val/"),
        (["linprobe", "--model.pretrained=/nonexistent.pt"], "/nonexistent.pt"),
    ]
    for args, message in cases:
        assert main([*args, f"--finetune.out_dir={tmp_path / 'f'}", f"--linprobe.out_dir={tmp_path / 'l'}"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)


def test_keys_reference(capsys):
    assert main(["finetune", "--keys"]) == 0
    text = capsys.readouterr().out
    assert "`finetune.layer_decay`" in text and "`linprobe.optimizer`" in text and "`model.pretrained`" in text


def test_eval_recipes_load():
    for recipe in (
        "eval_tiny_cpu",
        "finetune_vit_base_1600",
        "finetune_vit_base_100",
        "finetune_vit_large_800",
        "linprobe_vit_base",
    ):
        cfg = load_eval_config(recipe, ["--model.pretrained=x.pt"])
        assert cfg.finetune.auto_augment == "rand-m9-mstd0.5-inc1"
    b1600 = load_eval_config("finetune_vit_base_1600", ["--model.pretrained=x.pt"])
    f = b1600.finetune
    assert (f.epochs, f.warmup_epochs, f.batch_size * f.accum_steps, f.lr, f.min_lr, f.layer_decay) == (
        100,
        20,
        1024,
        2e-3,
        1e-5,
        0.65,
    )
    assert b1600.model.drop_path == 0.1 and (f.smoothing, f.mixup, f.cutmix, f.reprob) == (0.1, 0.8, 1.0, 0.25)
    large = load_eval_config("finetune_vit_large_800", ["--model.pretrained=x.pt"])
    assert (large.finetune.epochs, large.finetune.warmup_epochs, large.finetune.lr) == (50, 5, 3e-3)
    assert (large.finetune.layer_decay, large.model.drop_path) == (0.75, 0.2)
    b100 = load_eval_config("finetune_vit_base_100", ["--model.pretrained=x.pt"]).finetune
    assert (b100.lr, b100.min_lr, b100.layer_decay) == (4e-3, 1e-6, 0.75)


def test_a_second_finetune_on_one_directory_is_refused(tiny_weights, digits_tree, tmp_path):
    """finetune.out_dir is held like train.out_dir: a run that finds it held is refused before it writes."""
    out = tmp_path / "ft"
    cfg = _cfg(tiny_weights, digits_tree, out, "--finetune.steps=1")
    with hold_run_dir(out, "finetune.out_dir"):
        with pytest.raises(FastmimError, match=rf"finetune.out_dir {out} is in use by another run \(pid "):
            finetune(cfg)
        assert sorted(p.name for p in out.iterdir()) == ["run.lock"]
    assert finetune(cfg)["steps"] == 1  # released: the directory is free again


def _weights_like(tiny_weights, path, fn):
    """A copy of the tiny weights file with ``fn`` applied to every floating-point tensor."""
    obj = safe_load(tiny_weights)
    obj["model"] = {k: fn(v) if v.is_floating_point() else v for k, v in obj["model"].items()}
    torch.save(obj, path)
    return path


def _one_line_error(argv, capsys, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmim: error:") and err.count("\n") == 1 and message in err, err


def _finetune_argv(weights, digits_tree, out, *extra):
    return [
        "finetune",
        f"--model.pretrained={weights}",
        "--data.source=folder",
        f"--data.path={digits_tree}",
        "--finetune.batch_size=8",
        "--finetune.epochs=1",
        f"--finetune.out_dir={out}",
        *extra,
    ]


def test_weights_that_are_not_finite_are_refused(tiny_weights, digits_tree, tmp_path, capsys):
    """All-NaN weights used to fine-tune and save a "best" checkpoint with a NaN loss."""
    nan = _weights_like(tiny_weights, tmp_path / "nan.pt", lambda v: torch.full_like(v, float("nan")))
    out = tmp_path / "ft"
    _one_line_error(_finetune_argv(nan, digits_tree, out), capsys, f"'{nan}' holds non-finite weights (NaN or inf")
    _one_line_error(["export", str(nan), "--out", str(tmp_path / "x.safetensors")], capsys, "non-finite weights")
    assert not list(out.glob("checkpoint-*")) and not (tmp_path / "x.safetensors").exists()


def test_a_non_finite_training_loss_stops_before_anything_is_saved(tiny_weights, digits_tree, tmp_path, capsys):
    """Finite weights so large that the loss overflows: before, the loss was checked at log steps only (every 20
    steps: never in a 3-step epoch) and the epoch was evaluated and saved as the best."""
    huge = _weights_like(tiny_weights, tmp_path / "huge.pt", lambda v: v * 1e30)
    out = tmp_path / "ft"
    argv = _finetune_argv(huge, digits_tree, out, "--finetune.log_every=20")
    _one_line_error(argv, capsys, "the training loss was non-finite in epoch 0 (by step 3); nothing of this epoch")
    assert not list(out.glob("checkpoint-*"))


def test_an_unknown_auto_augment_policy_is_refused_when_the_config_loads(capsys):
    """timm's assertion traceback came from the first training batch."""
    _one_line_error(
        ["finetune", "--finetune.auto_augment=bogus-policy"],
        capsys,
        "finetune.auto_augment = 'bogus-policy' is not a timm auto-augment policy (Unknown AA policy bogus)",
    )
    with pytest.raises(FastmimError, match="Unknown RandAugment config section"):
        load_eval_config(None, ["--finetune.auto_augment=rand-n-1"])
    assert load_eval_config(None, ["--finetune.auto_augment=augmix-m5"]).finetune.auto_augment == "augmix-m5"
    assert load_eval_config(None, ["--finetune.auto_augment="]).finetune.auto_augment == ""
