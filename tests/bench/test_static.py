"""fastmim.bench.static: every kernel config reachable at the shipped recipes' shapes compiles for sm_80 and sm_90
(no GPU: Triton's ahead-of-time compiler with the ptxas inside its wheel) with zero spill bytes, and the occupancy
estimate follows the CUDA rules.

The compile runs in a subprocess (`fastmim bench kernels --static`): the test suite has TRITON_INTERPRET set, and
triton fixes that when it is imported. The Triton cache lives under the test's temporary directory.
"""

import json
import re
from pathlib import Path

import pytest

from fastmim.bench.static import SM_LIMITS, resident_warps, step_launches
from fastmim.cli import main
from fastmim.config import load_config

# The 224 px pre-training recipes (vit_base_100 / swin_large_800 compile to the same launches as vit_base_1600 /
# swin_base_hog_400 and cost nothing extra); the CPU debug recipe and ViT-S (no recipe of its own) are slow.
RECIPES = ",".join(
    (
        "vit_base_100",
        "vit_base_1600",
        "vit_large_800",
        "mae_vit_base_1600",
        "swin_base_hog_400",
        "swin_base_pixel_400",
        "swin_large_800",
    )
)
RARE = "tiny_cpu,vit_small"
KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def launched_kernels() -> set[str]:
    """Every @triton.jit function in kernels/ that a launcher launches (named *_kernel; the others are helpers
    inlined into them)."""
    names = set()
    for path in KERNELS.glob("*.py"):
        names |= set(re.findall(r"@triton\.jit\s*\ndef (_\w+_kernel)\(", path.read_text()))
    return names


@pytest.fixture(scope="module")
def triton_cache(tmp_path_factory) -> Path:
    """One Triton cache for the module: the rare shapes reuse the common kernels' compilations."""
    return tmp_path_factory.mktemp("triton-cache")


def static_report(tmp_path: Path, recipes: str, cache: Path) -> tuple[int, list[dict]]:
    """(exit status, rows of the JSON record) of `fastmim bench kernels --static` for both targets."""
    out = tmp_path / "out"
    args = ["bench", "kernels", "--static", "--arch=80,90", f"--recipes={recipes}", f"--out={out}"]
    status = main([*args, f"--cache={cache}"])
    (path,) = out.glob("kernels_static-cpu-*.json")
    record = json.loads(path.read_text())
    assert record["bench"] == "kernels_static" and record["archs"] == ["sm_80", "sm_90"]
    return status, record["rows"]


def check_rows(status: int, rows: list[dict]) -> None:
    for row in rows:
        where = f"{row['kernel']} [{row['config']}] {row['arch']} ({row['recipes']})"
        assert row["spill_bytes"] == 0, f"{where} spills {row['spill_bytes']} bytes"
        assert row["registers"] < 255, f"{where} sits at the 255-register ceiling"
        assert row["warps_per_sm"] > 0, f"{where} cannot launch ({row['shared_bytes']} bytes of shared memory)"
    # every compiled variant for both targets
    variants = {}
    for row in rows:
        variants.setdefault((row["kernel"], row["config"], row["recipes"], json.dumps(row["constexprs"])), set()).add(
            row["arch"]
        )
    assert all(archs == {"sm_80", "sm_90"} for archs in variants.values())
    assert status == 0  # the command flags what the checks above name first


def test_every_kernel_at_the_recipes_shapes_compiles_without_spills(tmp_path, triton_cache, capfd):
    status, rows = static_report(tmp_path, RECIPES, triton_cache)
    check_rows(status, rows)
    assert {r["kernel"] for r in rows} == launched_kernels(), "a kernel is missing from the static report"
    recipes = {name for r in rows for name in r["recipes"].split(",")}
    assert recipes == set(RECIPES.split(","))
    # the fused loss forward: at most 128 registers and at least 16 resident warps per SM on sm_90
    loss = [r for r in rows if r["kernel"] == "_recon_loss_fwd_kernel" and r["arch"] == "sm_90"]
    assert len({r["recipes"] for r in loss}) == 4  # ViT-B, ViT-L, Swin HOG, Swin pixel
    assert all(r["registers"] <= 128 and r["warps_per_sm"] >= 16 for r in loss), loss
    # MAE's 512-wide decoder input, which no hand-kept list of launches had
    mae = {r["kernel"] for r in rows if "mae_vit_base_1600" in r["recipes"].split(",") and "512" in r["config"]}
    assert mae == {"_decoder_input_fwd_kernel", "_decoder_input_bwd_kernel"}
    table = capfd.readouterr().out
    assert "warps_per_sm" in table and "_hog_fwd_kernel" in table


def _name(kernel) -> str:
    while hasattr(kernel, "fn"):  # Autotuner -> JITFunction -> the Python function
        kernel = kernel.fn
    return kernel.__name__


@pytest.mark.parametrize(
    "recipe, kernels",
    [
        (
            "mae_vit_base_1600",
            ["_patch_gather", "_encoder_epilogue", "_decoder_input_fwd", "_decoder_input_bwd", "_encoder_input_bwd"],
        ),
        ("swin_base_hog_400", ["_hog_fwd", "_recon_loss_fwd", "_recon_loss_bwd"]),
    ],
)
def test_the_report_takes_its_launches_from_the_models_training_step(recipe, kernels):
    """The launches are the model's own, forward then backward, recorded on fake tensors at the recipe's shapes."""
    cfg = load_config(recipe, ["--model.impl=fast", "--model.attn=sdpa", "--train.batch_size=2"])
    launches = step_launches(cfg)
    assert [_name(launch.kernel) for launch in launches] == [f"{k}_kernel" for k in kernels]
    if recipe.startswith("mae"):  # the decoder input of MAE's 512-wide decoder, its image at 224 px
        assert launches[2].arguments["C"] == 512 and launches[0].arguments["img_ptr"].shape == (2, 3, 224, 224)
    else:  # Swin-B: 49 units, 37 masked by the released rule; targets and predictions of its 18-bin HOG
        assert launches[1].arguments["n_sel"] == 37 and launches[1].arguments["C0"] == 54


@pytest.mark.slow
def test_rare_shapes_compile_without_spills(tmp_path, triton_cache):
    check_rows(*static_report(tmp_path, RARE, triton_cache))


def test_occupancy_follows_the_cuda_rules():
    # registers: 32 r per warp rounded up to 256, warps granted in fours, 64K registers per SM
    assert resident_warps(90, 255, 0, 4) == 8
    assert resident_warps(90, 128, 0, 4) == 16
    assert resident_warps(90, 129, 0, 4) == 12  # 129 -> 4352 per warp: 15 warps -> 12
    assert resident_warps(80, 72, 5120, 4) == 28
    assert resident_warps(90, 16, 0, 1) == 32  # the 32-block limit
    assert resident_warps(90, 16, 0, 8) == 64  # the 64-warp limit
    # shared memory: per-SM capacity with a 1 KB reserve per block; too much for one block cannot launch
    assert resident_warps(80, 32, 100 * 1024, 4) == 4
    assert resident_warps(90, 32, 100 * 1024, 4) == 8
    assert resident_warps(80, 32, SM_LIMITS[80].shared_per_block + 1, 4) == 0
    assert resident_warps(90, 32, SM_LIMITS[80].shared_per_block + 1, 4) == 4


def test_bad_arguments_end_in_one_line(capfd):
    assert main(["bench", "kernels", "--static", "--arch=75"]) == 2
    assert main(["bench", "kernels", "--static", "--recipes=vit_huge"]) == 2
    err = capfd.readouterr().err
    assert "fastmim: error: --arch takes compute capabilities among [80, 90]" in err
    assert "fastmim: error: unknown recipe(s) vit_huge" in err and "Traceback" not in err
