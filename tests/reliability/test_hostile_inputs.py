"""Hostile inputs: every config key validated (type, range, combinations); checkpoints never execute code; other
models', versions' and tools' files refused by name; a run writes nothing outside its run directory."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastmim.cli import main
from fastmim.config import Config, key_types, load_config, to_dict, validate
from fastmim.errors import FastmimError
from fastmim.models import create_model
from fastmim.train import train
from fastmim.train.checkpoint_files import WEIGHTS_FORMAT, checkpoint_path, load_checkpoint, write_checkpoint
from tests.reliability._harness import FAST, config, pretrain_args, run

# For every key: an invalid value and what the one-line error says (ranges and combinations; types are below).
INVALID = {
    "model.name": ("localmim_vit_nope", "unknown model"),
    "model.impl": ("quick", "model.impl"),
    "model.img_size": ("-32", "model.img_size"),
    "model.mask_ratio": ("1.0", "model.mask_ratio must be in [0, 1)"),
    "model.target": ("depth", "model.target"),
    "model.nbins": ("-1", "model.nbins"),
    "model.hog_bias": ("maybe", "model.hog_bias"),
    "model.attn": ("fast", "model.attn"),
    "model.decoder_dim": ("-8", "model.decoder_dim"),
    "model.mask_rule": ("released", "mask_rule applies to Swin models only"),  # a combination: ViT + Swin rule
    "model.swin_coords": ("released", "swin_coords applies to Swin models only"),  # a combination, as above
    "data.source": ("web", "data.source"),
    "data.path": ("/nonexistent/images", "/nonexistent/images"),  # with data.source = folder, below
    "data.num_workers": ("-1", "data.num_workers"),
    "data.num_images": ("0", "data.num_images"),
    "data.holdout": ("-1", "data.holdout must be >= 0"),
    "data.min_scale": ("0", "data.min_scale"),
    "data.augment": ("tpu", "data.augment"),
    "data.decode": ("gpu", "data.decode = 'gpu' needs data.augment = 'gpu'"),  # with the default data.augment = cpu
    "data.stall_warn_s": ("0", "data.stall_warn_s must be positive"),
    "data.stall_limit_s": ("0.5", "data.stall_limit_s must be 0 (no limit) or at least data.stall_warn_s"),
    "train.batch_size": ("0", "train.batch_size"),
    "train.accum_steps": ("0", "train.accum_steps"),
    "train.steps": ("-1", "train.steps"),
    "train.epochs": ("0", "train.epochs must be positive when train.steps is 0"),  # with train.steps = 0
    "train.warmup_epochs": ("-1", "warm-up"),
    "train.warmup_steps": ("-2", "warm-up"),
    "train.blr": ("0", "train.blr (or train.lr)"),  # with train.lr = 0
    "train.lr": ("-1", "train.lr"),
    "train.min_lr": ("1", "train.min_lr must not exceed the peak learning rate"),
    "train.weight_decay": ("-0.1", "train.weight_decay"),
    "train.beta1": ("1", "train.beta1"),
    "train.beta2": ("-0.5", "train.beta2"),
    "train.clip_grad": ("-1", "train.clip_grad"),
    "train.precision": ("fp8", "train.precision"),
    "train.device": ("tpu", "train.device"),
    "train.compile": ("yes", "train.compile"),
    "train.seed": ("-1", "train.seed"),
    "train.out_dir": ("", "train.out_dir"),
    "train.log_every": ("0", "train.log_every"),
    "train.save_every": ("-1", "train.save_every"),
    "train.keep_last": ("-1", "train.keep_last"),
    "train.resume": ("/nonexistent/checkpoint.pt", "does not exist"),
    "train.max_nonfinite": ("0", "train.max_nonfinite"),
    "train.dist": ("mpi", "train.dist"),
    "train.zero_stage": ("2", "train.zero_stage needs train.dist = 'deepspeed'"),  # a combination
    "train.offload": ("optimizer", "train.offload needs train.dist = 'deepspeed'"),  # a combination
    "train.dist_timeout": ("0", "train.dist_timeout"),
}
CONTEXT = {"data.path": ["--data.source=folder"], "train.epochs": ["--train.steps=0"], "train.blr": ["--train.lr=0"]}
KEYS = [f"{s}.{k}" for s, values in to_dict(Config()).items() for k in values]
TYPES = {f"{s}.{k}": t for s in to_dict(Config()) for k, (t, _) in key_types(type(getattr(Config(), s))).items()}


def test_every_key_has_an_invalid_case():
    missing = sorted(set(KEYS) - set(INVALID))
    assert not missing, f"add an invalid value for {missing} to INVALID (and a check for it, if there is none)"


@pytest.mark.parametrize("key", sorted(set(KEYS) & set(INVALID)))
def test_invalid_value_is_one_line_error(tmp_path, key, capsys):
    value, message = INVALID[key]
    args = ["pretrain", *FAST, "--train.steps=1", f"--train.out_dir={tmp_path / 'run'}", *CONTEXT.get(key, [])]
    assert main([*args, f"--{key}={value}"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("fastmim: error:") and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("key", KEYS)
def test_wrong_types_and_non_finite_numbers_are_refused(key):
    typ = TYPES[key]
    bad = {int: ["x", "1.5"], float: ["x", "nan", "inf", "-inf"], str: ["a\x00b", "line\nbreak", "\udcff"]}[typ]
    for value in bad:
        with pytest.raises(FastmimError, match=key.replace(".", r"\.")):
            load_config(None, [f"--{key}={value}"])
    cfg = Config()  # built in Python: the type is checked by validate, not only by the parsers
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, [] if typ is str else "8")
    with pytest.raises(FastmimError, match=f"{key} must be {typ.__name__}"):
        validate(cfg)


def test_toml_recipe_with_wrong_types(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[train]\nsteps = '5'\n")
    with pytest.raises(FastmimError, match="train.steps must be int"):
        load_config(str(recipe))
    recipe.write_text("[train]\nkeep_last = true\n")
    with pytest.raises(FastmimError, match="train.keep_last must be int"):
        load_config(str(recipe))


def test_out_dir_that_is_a_file_or_unwritable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FastmimError, match="is not a directory"):
        train(config(tmp_path / "file", "--train.steps=1"))
    with pytest.raises(FastmimError, match="cannot create train.out_dir"):
        train(config(tmp_path / "file" / "run", "--train.steps=1"))


class _Exploit:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real checkpoint of the harness's model, after one step."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train(config(out, "--train.steps=1"))
    return load_checkpoint(checkpoint_path(out, 1))


@pytest.mark.parametrize("where", ["explicit", "auto"])
def test_checkpoint_with_code_is_refused_and_never_run(tmp_path, trained, where):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    out.mkdir()
    evil = checkpoint_path(out, 5)
    state = {**trained, "payload": _Exploit(marker)}
    write_checkpoint(state, evil)  # with a valid record: the checksum is not what stops it
    resume = f"--train.resume={evil}" if where == "explicit" else "--train.resume=auto"
    with pytest.raises(FastmimError, match="holds pickled Python objects.*never executes code"):
        train(config(out if where == "auto" else tmp_path / "other", "--train.steps=6", resume))
    assert not marker.exists()
    assert evil.exists()  # refused, not quarantined as if it were merely damaged


def test_foreign_and_tampered_checkpoints_are_refused_by_name(tmp_path, trained):
    good = trained
    cases = {
        "version": ({**good, "version": 3}, "has checkpoint version 3; this fastmim reads versions 1 to 2"),
        "weights": ({"format": "fastmim-weights", "model_name": "x", "model": good["model"]}, "weights file"),
        "released": ({"model": good["model"], "epoch": 3}, "not a fastmim checkpoint.*import-checkpoint"),
        "step": ({**good, "step": "3"}, "lacks a valid 'step'"),
        "position": ({**good, "data": {"epoch": 0, "batch": 99}}, "stopped at batch 99 .* 4 batches per epoch"),
        "config": ({**good, "config": "[model\nname ="}, "holds no readable config"),
        "shapes": ({**good, "model": {**good["model"], "encoder.pos_embed": torch.zeros(1, 3, 7)}}, "does not fit"),
        "model": ({**good, "model_name": "mae_vit_tiny_patch16"}, "is for mae_vit_tiny_patch16"),
    }
    for name, (state, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        write_checkpoint(state, path)
        with pytest.raises(FastmimError, match=message):
            train(config(tmp_path / f"run_{name}", "--train.steps=2", f"--train.resume={path}"))


def test_a_run_writes_nothing_outside_its_run_directory(tmp_path):
    """A real process whose working directory, HOME and TMPDIR are empty sandbox folders trains with rotation (and
    so deletes files); afterwards everything new is under its run directory, given as a relative path."""
    sandbox = {name: tmp_path / name for name in ("home", "tmp", "work")}
    for path in sandbox.values():
        path.mkdir()
    argv = ["pretrain", *FAST, "--train.out_dir=run", "--train.steps=4", "--train.save_every=1", "--train.keep_last=1"]
    code, output = run(argv, tmp_path / "log", sandbox=sandbox)
    assert code == 0, output
    assert [p.name for p in sandbox["work"].iterdir()] == ["run"]
    assert not list(sandbox["home"].iterdir()) and not list(sandbox["tmp"].iterdir())
    files = sorted(p.name for p in (sandbox["work"] / "run").iterdir())
    assert "checkpoint-0000004.pt" in files and not [name for name in files if name.startswith(".")], files
    assert "checkpoint: run/checkpoint-0000004.pt" in output


def test_a_hostile_image_folder_trains_and_says_what_it_skipped(tmp_path):
    """Links looping back to their folder (the listing hung), a FIFO named pipe.png (open() blocked forever, and a
    SIGTERM then neither stopped nor saved) and an unreadable file with a newline in its name, next to real images:
    the run lists each image once, skips and names the rest on one line each, and finishes."""
    images = tmp_path / "images" / "cls"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
    (images / "loop_a").symlink_to(images)
    (images / "loop_b").symlink_to(images)
    os.mkfifo(images / "pipe.png")
    (images / "bad\nname.png").write_text("not an image")
    argv = pretrain_args(tmp_path / "run", "--train.steps=4", "--data.source=folder", f"--data.path={images.parent}")
    code, output = run(argv, tmp_path / "log")
    assert code == 0, output
    assert "2 links to a folder listed already" in output and "1 image names that are not regular files" in output
    assert "skipped unreadable image " in output and "bad\\nname.png (not a recognised image)" in output, output
    assert "done: " in output


def _one_line_error(argv, capsys, message):
    """`fastmim ARGV` ends with status 2 and one line that contains ``message``."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmim: error:") and err.count("\n") == 1 and message in err, err


def test_files_that_are_not_toml_recipes(tmp_path, capsys, trained):
    """A checkpoint given as --config (invalid UTF-8) and TOML nested thousands of levels deep (the parser's
    RecursionError), as a recipe and as a checkpoint's config: tracebacks before."""
    binary = tmp_path / "checkpoint.pt"
    torch.save({"x": torch.zeros(3)}, binary)
    _one_line_error(["config", "--config", str(binary)], capsys, "cannot be read as a TOML recipe (not UTF-8 text)")
    deep = "a = " + "[" * 5000 + "]" * 5000 + "\n"
    (tmp_path / "deep.toml").write_text(deep)
    _one_line_error(["config", "--config", str(tmp_path / "deep.toml")], capsys, "not valid TOML (nested too deeply)")
    write_checkpoint({**trained, "config": deep}, tmp_path / "deep.pt")
    with pytest.raises(FastmimError, match=r"holds no readable config \(nested too deeply\)"):
        train(config(tmp_path / "run", "--train.steps=2", f"--train.resume={tmp_path / 'deep.pt'}"))


def test_weights_files_without_a_model_or_labelled_as_another(tmp_path, capsys, trained):
    """A weights file without model_name (KeyError tracebacks from export-released, export and visualize), and one
    labelled as a model its tensors do not fit (export exited 0 with a file timm cannot load)."""
    nameless = tmp_path / "nameless.pt"
    torch.save({"format": WEIGHTS_FORMAT, "model": trained["model"]}, nameless)
    for argv in (
        ["export-released", str(nameless), "--out", str(tmp_path / "r.pth")],
        ["export", str(nameless), "--out", str(tmp_path / "t.safetensors")],
        ["visualize", str(nameless), "--out", str(tmp_path / "v.png")],
    ):
        _one_line_error(argv, capsys, "names no registered model (model_name None)")
    mislabelled = tmp_path / "mislabelled.pt"
    torch.save(
        {"format": WEIGHTS_FORMAT, "model_name": "localmim_vit_base_patch16", "model": trained["model"]}, mislabelled
    )
    _one_line_error(
        ["export", str(mislabelled), "--out", str(tmp_path / "m.safetensors")],
        capsys,
        "the weights do not fit localmim_vit_base_patch16",
    )
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.p*g"))


def test_evaluation_arguments(tmp_path, capsys, trained):
    weights = tmp_path / "w.pt"
    torch.save({"format": WEIGHTS_FORMAT, "model_name": "localmim_micro_test", "model": trained["model"]}, weights)
    _one_line_error(
        ["visualize", str(weights), "--out", str(tmp_path / "v.png"), "--num", "0"],
        capsys,
        "--num is 0; give 1 to 64 demo images",
    )
    _one_line_error(["linprobe", f"--model.pretrained={tmp_path}"], capsys, f"'{tmp_path}' is a directory")


@pytest.mark.parametrize("out_dir", ["/sys/kernel", "x" * 300], ids=["not-writable", "name-too-long"])
def test_out_dir_that_cannot_be_written(tmp_path, capsys, out_dir):
    """sysfs refuses new files even to root (PermissionError traceback before); a 300-character name (OSError)."""
    path = out_dir if out_dir.startswith("/") else str(tmp_path / out_dir)
    _one_line_error(["pretrain", *FAST, "--train.steps=1", f"--train.out_dir={path}"], capsys, "train.out_dir")


@pytest.mark.parametrize("value,message", [("100000000000", "out of memory"), ("10" * 10, "too large to compute")])
def test_sizes_beyond_the_machine_are_one_line(tmp_path, capsys, value, message):
    argv = ["pretrain", *FAST, "--train.steps=1", f"--data.num_images={value}", f"--train.out_dir={tmp_path / 'r'}"]
    _one_line_error(argv, capsys, message)


@pytest.mark.parametrize(
    "model, masks",
    [
        (["--model.img_size=32"], "none of the 4 patches of a 32 px image"),
        (["--model.name=mae_vit_tiny_patch16", "--model.img_size=32"], "none of the 4 patches of a 32 px image"),
        (["--model.name=localmim_swin_nano_patch4_window4", "--model.img_size=64"], "none of the 4 32 px mask units"),
    ],
    ids=["vit", "mae", "swin"],
)
def test_a_mask_ratio_that_masks_nothing_is_one_line(tmp_path, capsys, model, masks):
    """model.mask_ratio = 0 passed validation, then every loss was NaN (a masked mean over no masked cell)."""
    argv = ["pretrain", *FAST, *model, "--model.mask_ratio=0", "--train.steps=1", f"--train.out_dir={tmp_path}/r"]
    _one_line_error(argv, capsys, f"model.mask_ratio = 0 masks {masks}")


def test_a_small_mask_ratio_that_masks_one_patch_trains(tmp_path):
    """At 32 px (4 patches) a ratio of 0.2 keeps int(4 x 0.8) = 3 patches: one masked, finite losses."""
    code, output = run(pretrain_args(tmp_path / "run", "--model.mask_ratio=0.2", "--train.steps=2"), tmp_path / "log")
    assert code == 0 and "final loss nan" not in output and "non-finite" not in output, output


def test_weights_whose_tensors_fit_no_size_of_the_named_model(tmp_path, capsys):
    """Tensors whose shapes imply sizes the model cannot be built at (a decoder 1 wide) were explained in terms of
    that inferred model ("cannot build ... 'decoder_dim': 1 ..."); now: which tensor does not fit."""
    name = "localmim_vit_tiny_patch16"
    state = create_model(name, img_size=32, decoder_dim=16).state_dict()
    ones = tmp_path / "ones.pt"
    torch.save(
        {
            "format": WEIGHTS_FORMAT,
            "model_name": name,
            "model": {k: torch.ones([1] * v.ndim) for k, v in state.items()},
        },
        ones,
    )
    fits = f"the weights do not fit {name} (encoder.cls_token has shape [1, 1, 1], {name} needs [1, 1, 192])"
    for argv in (
        ["export", str(ones), "--out", str(tmp_path / "t.safetensors")],
        ["visualize", str(ones), "--out", str(tmp_path / "v.png")],
        ["linprobe", f"--model.pretrained={ones}", f"--linprobe.out_dir={tmp_path / 'lp'}"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fastmim: error: {fits}") and "decoder_dim" not in err and err.count("\n") == 1, err
    narrow = tmp_path / "narrow.pt"  # one tensor implies a decoder 1 wide
    model = {**state, "decoders.0.embed.weight": torch.ones(1, 192)}
    torch.save({"format": WEIGHTS_FORMAT, "model_name": name, "model": model}, narrow)
    _one_line_error(["export", str(narrow), "--out", str(tmp_path / "t.safetensors")], capsys, f"do not fit {name} (")
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("steps", ["0", "-1"])
def test_bench_step_refuses_a_step_count_below_one(capsys, steps):
    _one_line_error(["bench", "step", "--steps", steps], capsys, f"--steps is {steps}; give a positive number")
