"""The README's promises: the config reference is current and the two set-up commands are the ones CI runs."""

from pathlib import Path

from fastmim.config import reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_config_reference_is_current():
    start = README.index("<!-- config-reference")
    body = README[README.index("\n", start) + 1 : README.index("<!-- /config-reference -->")].strip()
    assert body == reference_markdown(), "regenerate the README table with `fastmim config --keys`"


def test_two_setup_commands_present_and_used_by_ci():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install . && fastmim pretrain\n" in README
    marker = README.index("<!-- test-command")
    test_cmd = next(line for line in README[marker:].splitlines() if line.startswith(("apt-get ", "pip ")))
    # The ffcv extra compiles against system libraries: the command installs those first, so CI runs the FFCV tests;
    # the deepspeed extra (no pre-built ops) makes the ZeRO tests run.
    assert test_cmd == (
        "apt-get update && apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev && "
        'DS_BUILD_OPS=0 pip install -e ".[dev,ffcv,deepspeed]" && python -m pytest -q'
    )
    assert "/^(apt-get|pip) /" in ci
    assert "<!-- test-command" in ci and "fastmim pretrain" in ci
