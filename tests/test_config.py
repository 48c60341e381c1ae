import tomllib

import pytest

from fastmim.config import (
    Config,
    choices,
    config_from_toml,
    dump_toml,
    key_types,
    list_recipes,
    load_config,
    reference_markdown,
)
from fastmim.errors import FastmimError


def test_default_is_the_tiny_cpu_recipe():
    cfg = load_config()
    assert cfg.model.name == "localmim_vit_tiny_patch16" and cfg.data.source == "demo"
    assert cfg.model.img_size == 64 and cfg.train.steps > 0


def test_published_recipes_load_with_spec_hyperparameters():
    assert {"tiny_cpu", "vit_base_1600", "vit_base_100", "vit_large_800", "mae_vit_base_1600"} <= set(list_recipes())
    base = load_config("vit_base_1600")
    assert base.train.batch_size * base.train.accum_steps == 2048 and base.train.blr == 2e-4
    assert (base.train.epochs, base.train.warmup_epochs) == (1600, 40)
    assert (base.train.beta1, base.train.beta2, base.train.weight_decay) == (0.9, 0.95, 0.05)
    short = load_config("vit_base_100")
    assert (short.train.epochs, short.train.warmup_epochs) == (100, 10)
    large = load_config("vit_large_800")
    assert large.train.batch_size * large.train.accum_steps == 4096 and large.train.blr == 1.5e-4
    assert large.model.nbins == 18 and large.model.hog_bias == "on"
    assert load_config("mae_vit_base_1600").model.name == "mae_vit_base_patch16"


def test_overrides_take_precedence_and_coerce_types():
    cfg = load_config("vit_base_100", ["--train.batch_size=8", "--model.mask_ratio", "0.6", "--data.path=/x"])
    assert cfg.train.batch_size == 8 and cfg.model.mask_ratio == 0.6 and cfg.data.path == "/x"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--train.bach_size=8"], "did you mean 'batch_size'"),
        (["--trian.steps=8"], "did you mean 'train'"),
        (["--train.steps=ten"], "train.steps must be int"),
        (["--train.precision=fp8"], "train.precision = 'fp8' is not one of"),
        (["--model.mask_ratio=1.5"], r"model.mask_ratio must be in \[0, 1\)"),
        (["steps=3"], "config overrides look like"),
        (["--train.steps"], "has no value"),
        (["--data.decode=nvjpeg"], "data.decode = 'nvjpeg' is not one of"),
        (["--data.decode=gpu", "--data.source=ffcv"], "data.decode = 'gpu' needs data.augment = 'gpu'"),
        (["--data.decode=gpu", "--data.augment=gpu"], "and data.source = 'ffcv'"),
    ],
)
def test_bad_overrides_are_one_line_errors(args, message):
    with pytest.raises(FastmimError, match=message) as e:
        load_config(None, args)
    assert "\n" not in str(e.value)


def test_bad_toml_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nbatch_size = '8'\n")
    with pytest.raises(FastmimError, match="train.batch_size must be int"):
        load_config(str(bad))
    bad.write_text("[train\n")
    with pytest.raises(FastmimError, match="not valid TOML"):
        load_config(str(bad))
    bad.write_text("[modle]\nname = 'x'\n")
    with pytest.raises(FastmimError, match="did you mean 'model'"):
        load_config(str(bad))
    with pytest.raises(FastmimError, match="not found"):
        load_config("vit_bse_1600")


def test_dump_round_trips():
    cfg = load_config("vit_large_800", ['--data.path=/data/a b"c'])
    text = dump_toml(cfg)
    assert tomllib.loads(text)["data"]["path"] == '/data/a b"c'
    assert config_from_toml(text) == cfg


def test_every_key_is_documented():
    table = reference_markdown()
    for section, values in vars(Config()).items():
        for key in vars(values):
            assert f"`{section}.{key}`" in table
    required = [
        "model.name",
        "model.impl",
        "data.source",
        "data.path",
        "train.batch_size",
        "train.steps",
        "train.epochs",
        "train.precision",
        "train.seed",
        "train.out_dir",
        "train.log_every",
        "train.save_every",
        "train.resume",
        "train.dist",
        "train.zero_stage",
    ]
    assert all(f"`{k}`" in table for k in required)


def test_choices_are_declared_once_where_the_key_is():
    """A key's Literal annotation is its list of choices: validation refuses anything else naming exactly those, and
    the key table (README, `fastmim config --keys`) lists them."""
    table = reference_markdown()
    declared = {}
    for section in vars(Config()):
        for key, (typ, options) in key_types(type(getattr(Config(), section))).items():
            if options is not None:
                declared[f"{section}.{key}"] = options
                assert typ is str and all(isinstance(c, str) for c in options)
    assert declared["model.impl"] == choices(type(Config().model), "impl") == ("reference", "fast")
    assert declared["train.dist"] == ("auto", "none", "ddp", "deepspeed") and len(declared) == 14
    for key, options in declared.items():
        listed = ", ".join(repr(c) for c in options)
        with pytest.raises(FastmimError, match=rf"{key} = 'bogus' is not one of {listed}\.$"):
            load_config(None, [f"--{key}=bogus"])
        row = next(line for line in table.splitlines() if line.startswith(f"| `{key}` |"))
        assert row.split(" | ")[1] == "one of " + ", ".join(f'`"{c}"`' for c in options)
