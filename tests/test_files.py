"""fastmim.files: the one way outputs are written (temporary file beside the target, fsync, rename, directory
fsync), fresh outputs that never replace a file, and the one-line OutputError."""

import errno
import os

import pytest

from fastmim import files
from fastmim.errors import FastmimError
from tests._trace import traced_syscalls  # noqa: F401  (the syscalls fixture)


def test_data_is_synced_before_its_name_and_the_directory_after(tmp_path, syscalls):
    target = tmp_path / "out.json"
    target.write_text("old")
    files.write_text(target, "new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.json"]
    (_, synced), (_, tmp, dst), (_, directory) = syscalls
    assert synced == tmp and tmp.parent == tmp_path and tmp.name.startswith(".out.json.") and dst == target
    assert directory == tmp_path


def test_a_fresh_output_is_linked_never_renamed_over_a_file(tmp_path, syscalls):
    target = tmp_path / "model.safetensors"
    with files.output(target, overwrite=False) as tmp:
        tmp.write_bytes(b"weights")
    assert [c[0] for c in syscalls] == ["fsync", "publish", "fsync"]
    assert target.read_bytes() == b"weights" and os.listdir(tmp_path) == ["model.safetensors"]


def test_appeared_meanwhile_is_one_line(tmp_path):
    target = tmp_path / "x.png"
    with pytest.raises(FastmimError, match=r"x\.png appeared while it was being written; it was left untouched"):
        with files.output(target, overwrite=False) as tmp:
            tmp.write_bytes(b"png")
            target.write_bytes(b"theirs")
    assert target.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["x.png"]


def test_a_folder_output_syncs_every_file_then_renames(tmp_path, syscalls):
    target = tmp_path / "images"
    with files.output(target, overwrite=False, directory=True) as tmp:
        for i in range(3):
            (tmp / f"{i}.jpg").write_bytes(b"jpeg")
    kinds = [c[0] for c in syscalls]
    assert kinds == ["fsync"] * 4 + ["publish", "fsync"]  # 3 files, the folder, the rename, the parent
    assert sorted(os.listdir(target)) == ["0.jpg", "1.jpg", "2.jpg"] and os.listdir(tmp_path) == ["images"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.jsonl"
    target.write_text("old\n")
    with pytest.raises(OSError):
        with files.output(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert os.listdir(tmp_path) == ["metrics.jsonl"] and target.read_text() == "old\n"


@pytest.mark.parametrize(
    "code,fix",
    [(errno.ENOSPC, "free disk space"), (errno.EROFS, "writable"), (errno.EIO, "fix the file system")],
)
def test_output_error_is_one_line_with_path_reason_and_fix(tmp_path, code, fix):
    with pytest.raises(files.OutputError) as info:
        with files.reported(tmp_path / "a\nb.json", "the summary", "nothing else changed", "run it again"):
            raise OSError(code, os.strerror(code))
    message = str(info.value)
    assert message.startswith(f"could not write the summary {tmp_path}/a\\nb.json ({os.strerror(code)}); nothing")
    assert fix in message and message.endswith("and run it again.") and "\n" not in message


def test_fresh_output_refuses_existing_paths_and_missing_folders(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(FastmimError, match="already exists; choose another --out"):
        files.fresh_output(tmp_path / "x", "--out")
    with pytest.raises(FastmimError, match="does not exist; create it"):
        files.fresh_output(tmp_path / "missing" / "x", "--out")
    assert files.fresh_output(tmp_path / "y", "--out") == tmp_path / "y"
