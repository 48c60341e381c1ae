"""`fastmim profile` attributes the fast path's function-level stages (not only modules) to their stages."""

import torch
from torch.profiler import ProfilerActivity, profile

from fastmim.cli import main
from fastmim.config import load_config
from fastmim.models.base import STAGE_RANGE
from fastmim.models.registry import model_from_config

TINY = ["--model.img_size=32", "--model.decoder_dim=32", "--data.num_images=16", "--train.batch_size=4"]


def test_the_fast_path_opens_the_ranges_of_its_function_stages_itself():
    """No hooks and no patching: the parts of impl "fast" that run as functions mark their stages in the model."""
    model = model_from_config(load_config(None, [*TINY, "--model.impl=fast"]).model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(torch.randn(2, 3, 32, 32)).loss.backward()
    ranges = {e.name.removeprefix(STAGE_RANGE) for e in prof.events() if e.name.startswith(STAGE_RANGE)}
    assert ranges == {"patch embed", "decoders", "heads"}


def test_fast_impl_profile_charges_the_fused_ops_to_their_stages(tmp_path):
    assert main(["profile", *TINY, "--model.impl=fast", "--steps", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    (run_dir,) = tmp_path.iterdir()
    rows = {}
    for line in (run_dir / "stages.txt").read_text().splitlines()[3:]:
        cells = line.split()
        if len(cells) >= 6:
            rows[" ".join(cells[:-5])] = float(cells[-2])  # stage -> total_ms
    for stage in ("patch embed", "encoder blocks", "decoders", "heads"):
        assert rows.get(stage, 0.0) > 0.0, (stage, rows)
