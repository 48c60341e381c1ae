"""Stop signals outside the training loop (fastmim.errors.interrupt_on_stop_signals): one Interrupted, a swallowed
one raised again, and nothing repeated into the clean-up the first one runs through. Each case runs in a process
of its own (real signals; an at-fork hook cannot be unregistered), with a time limit."""

import subprocess
import sys
import textwrap

PRELUDE = """
import os, signal, sys, time
from fastmim.errors import Interrupted, interrupt_on_stop_signals
def wait_for_signal(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)
"""


def _run(body: str) -> str:
    script = PRELUDE + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_no_repeat_lands_in_the_clean_up():
    """The clean-up an Interrupted runs through (stopping workers, removing files; 1 s here) is not broken by a
    repeated signal. Before, the signal was sent again every 0.2 s until reported, raising a second Interrupted
    inside the clean-up: `data convert` then left its .partial file or live writer processes (a hang at exit)."""
    out = _run("""
    with interrupt_on_stop_signals() as reported:
        try:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                wait_for_signal(5)
                print("not interrupted")
            except Interrupted:
                wait_for_signal(1.0)  # the clean-up
                print("clean-up finished")
                raise
        except Interrupted as e:
            reported()
            print("reported", e.signal_name)
    """)
    assert out.splitlines() == ["clean-up finished", "reported SIGTERM"], out


def test_a_swallowed_interrupt_is_raised_again():
    """A signal whose exception Python swallows (raised inside an at-fork hook: "Exception ignored", as during
    FFCV's writer start) is sent again, so the command still stops, within a fraction of a second."""
    out = _run("""
    def hook():  # the signal arrives while the hook runs: its Interrupted is swallowed
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for_signal(0.5)
    os.register_at_fork(after_in_parent=hook)
    with interrupt_on_stop_signals() as reported:
        try:
            start = time.monotonic()
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            print("swallowed")  # os.fork() returned: the hook's Interrupted did not propagate
            wait_for_signal(3)
            print("not raised again")
        except Interrupted as e:
            reported()
            print("raised again", e.signal_name, time.monotonic() - start < 2)
    """)
    assert out.splitlines() == ["swallowed", "raised again SIGTERM True"], out
