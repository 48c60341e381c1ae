"""The command line as a user meets it: subprocesses, exit codes, one-line errors, nothing overwritten."""

import os
import subprocess
import sys

import pytest
import torch

from fastmim.cli import main
from tests.oracles import ReleasedLocalMIMViT


def _run(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "fastmim", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_python_dash_m_and_list_models():
    proc = _run("list-models")
    assert proc.returncode == 0 and "localmim_vit_base_patch16" in proc.stdout.split()


@pytest.mark.parametrize(
    "args,message",
    [
        (["pretrain", "--model.name=localmim_vit_bse_patch16"], "did you mean 'localmim_vit_base_patch16'"),
        (["pretrain", "--train.setps=3"], "did you mean 'steps'"),
        (["pretrain", "--train.steps=x"], "train.steps must be int"),
        (["pretrain", "--data.source=folder", "--data.path=/nonexistent/images"], "/nonexistent/images"),
        (["pretrain", "--config=nope.toml"], "not found"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, args, message, capsys):
    code = main([*args, f"--train.out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert err.count("\n") == 1 and err.startswith("fastmim: error:") and "Traceback" not in err


def test_unreadable_image_and_empty_class_folder(tmp_path, capsys):
    root = tmp_path / "imgs"
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    (root / "cats" / "a.jpg").write_bytes(b"")
    common = ["pretrain", "--data.source=folder", f"--data.path={root}", "--train.steps=1", "--train.batch_size=1"]
    assert main([*common, f"--train.out_dir={tmp_path / 'r1'}"]) == 2
    assert "dogs" in capsys.readouterr().err
    (root / "dogs").rmdir()
    assert main([*common, "--model.img_size=32", f"--train.out_dir={tmp_path / 'r2'}"]) == 2
    err = capsys.readouterr().err  # the progress bar may precede the error line
    assert "a.jpg" in err.strip().splitlines()[-1] and "Traceback" not in err


def test_import_and_export_released_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    released = ReleasedLocalMIMViT(
        img_size=64, embed_dim=384, depth=12, num_heads=6, decoder_dim=32, decoder_heads=2, nbins=18, hog_bias=True
    ).state_dict()
    src = tmp_path / "released.pth"
    torch.save({"model": released, "epoch": 799}, src)
    out = tmp_path / "weights.pt"
    assert main(["import-checkpoint", str(src), "--model", "localmim_vit_small_patch16", "--out", str(out)]) == 0
    assert main(["import-checkpoint", str(src), "--model", "localmim_vit_small_patch16", "--out", str(out)]) == 2
    assert "already exists; choose another --out (fastmim never overwrites)" in capsys.readouterr().err
    missing = tmp_path / "no-such-folder" / "weights.pt"
    assert main(["import-checkpoint", str(src), "--model", "localmim_vit_small_patch16", "--out", str(missing)]) == 2
    assert f"the folder {missing.parent} does not exist; create it or choose another --out" in capsys.readouterr().err
    back = tmp_path / "back.pth"
    assert main(["export-released", str(out), "--out", str(back)]) == 0
    exported = torch.load(back, weights_only=True)["model"]
    assert set(exported) == set(released) and all(torch.equal(exported[k], released[k]) for k in released)


def test_foreign_files_are_refused(tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_text("hello")
    args = ["--model", "localmim_vit_base_patch16", "--out", str(tmp_path / "o")]
    assert main(["import-checkpoint", str(junk), *args]) == 2
    assert "cannot be read" in capsys.readouterr().err
    other = tmp_path / "other.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, other)
    assert main(["import-checkpoint", str(other), *args]) == 2
    assert "unexpected key 'fc.weight'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_config_command_prints_resolved_toml_and_keys(capsys):
    assert main(["config", "--config", "vit_base_1600", "--train.batch_size=128"]) == 0
    out = capsys.readouterr().out
    assert "batch_size = 128" in out and 'name = "localmim_vit_base_patch16"' in out
    assert main(["config", "--keys"]) == 0 and "`train.resume`" in capsys.readouterr().out


@pytest.mark.parametrize(
    "processes,per_node,command",
    [
        (1, 1, "fastmim pretrain"),
        (2, 2, "torchrun --nproc_per_node 2 -m fastmim pretrain"),
        (16, 8, "torchrun --nnodes 2 --nproc_per_node 8 --rdzv-endpoint HOST:PORT -m fastmim pretrain"),
    ],
)
def test_the_printed_resume_command_uses_the_run_launcher(monkeypatch, capsys, processes, per_node, command):
    """A run of several processes is continued the way it was started (torchrun), not as one process."""
    import fastmim.train

    summary = {
        "model": "m",
        "steps": 2,
        "total_steps": 2,
        "steps_this_run": 2,
        "img_per_s": 1.0,
        "final_loss": 0.5,
        "skipped_steps": 0,
        "skipped_images": 3,
        "stopped_by": None,
        "device": "cpu",
        "processes": processes,
        "processes_per_node": per_node,
        "checkpoint": "c.pt",
        "metrics": "m.jsonl",
        "plot": None,
        "config": "runs/x/config.toml",
    }
    monkeypatch.setattr(fastmim.train, "train", lambda cfg: summary)
    assert main(["pretrain"]) == 0
    out = capsys.readouterr().out
    assert f"continue with: {command}" in out and "--config runs/x/config.toml --train.resume=auto" in out
    assert "3 unreadable images replaced" in out
