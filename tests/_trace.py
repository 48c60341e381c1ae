"""The ``syscalls`` fixture: the fsync, rename and link calls a test's code makes, in order, to check how an output
reaches the disk (fastmim.files). Import it into a test module to use it."""

import os
from pathlib import Path

import pytest


@pytest.fixture(name="syscalls")
def traced_syscalls(monkeypatch):
    """The calls made, in order: ("fsync", path) for os.fsync, ("publish", src, dst) for os.replace, os.rename and
    os.link."""
    calls = []
    fsync, replace, rename, link = os.fsync, os.replace, os.rename, os.link

    def traced_fsync(fd):
        calls.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        return fsync(fd)

    def traced(fn):
        def call(src, dst, *args, **kwargs):
            calls.append(("publish", Path(src), Path(dst)))
            return fn(src, dst, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "fsync", traced_fsync)
    for name, fn in (("replace", replace), ("rename", rename), ("link", link)):
        monkeypatch.setattr(os, name, traced(fn))
    return calls
