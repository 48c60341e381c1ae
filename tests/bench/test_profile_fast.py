"""`fastmim profile` attributes the fast path's function-level stages (not only modules) to their stages."""

from fastmim.bench.profile import FAST_PATH_FUNCTIONS, function_ranges
from fastmim.cli import main
from fastmim.models import vit

TINY = ["--model.img_size=32", "--model.decoder_dim=32", "--data.num_images=16", "--train.batch_size=4"]


def test_function_ranges_wrap_and_restore():
    original = vit.visible_tokens
    with function_ranges():
        assert vit.visible_tokens is not original
    assert vit.visible_tokens is original
    assert {stage for *_, stage in FAST_PATH_FUNCTIONS} == {"patch embed", "decoders", "heads"}


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
