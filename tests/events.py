"""Faults keyed to events, never to time: a test acts when the job under test has printed the line
(or made the file, or reached the Slurm state) it waits for, so it lands at the same point of the
run on a machine three times faster or slower. The only time limits here are hang guards."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from tests.conftest import REPO, harness_env

HANG_GUARD_S = 900  # a job that prints nothing for this long is hung: the test fails instead of waiting forever


@dataclass
class Outcome:
    returncode: int
    stderr: str
    signalled: bool  # whether the event came and the signal was sent (False: the job ended first)


def signal_at_line(args: list[str], when: Callable[[str], bool], sig: int = signal.SIGKILL, nth: int = 1,
                   env: dict[str, str] | None = None) -> Outcome:
    """Run `python ARGS` (stderr read line by line) and send `sig` right after the `nth` stderr line for
    which `when(line)` holds; then read the rest and wait for the end."""
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env or harness_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines, seen, signalled = [], 0, False
    try:
        for line in proc.stderr:
            lines.append(line)
            if not signalled and when(line):
                seen += 1
                if seen == nth:
                    proc.send_signal(sig)
                    signalled = True
        proc.wait(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Outcome(proc.returncode, "".join(lines), signalled)


def read_until(stream, when: Callable[[str], bool]) -> str:
    """Lines of a job's text stream up to and including the first for which `when(line)` holds (all of
    them if the stream ends first)."""
    text = ""
    for line in stream:
        text += line
        if when(line):
            break
    return text


def wait_for(what: str, check: Callable[[], object], every: float = 0.1, guard_s: float = HANG_GUARD_S,
             explain: Callable[[], str] | None = None):
    """Poll `check` until it returns something true (an event outside our processes: a file, a Slurm
    state), and return it; `guard_s` is a hang guard, not a timing assumption. `explain` says, when the
    guard runs out, what the system around the test looked like (a Slurm job's state, its node's)."""
    deadline = time.monotonic() + guard_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"gave up waiting for {what} after {guard_s:.0f} s (hung?)"
                         + (f"\n{explain()}" if explain else ""))
