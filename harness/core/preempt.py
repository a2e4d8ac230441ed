"""Stop cleanly on Slurm's pre-timeout or preemption signal, then let submitit requeue the job.

Submitit asks Slurm for `--signal=USR2@<signal_delay_s>` and installs a USR2 handler that
requeues the job and exits at once, wherever training is, losing the work since the last epoch's
checkpoint. `install()` puts our handler in front of it. The rule for where the signal lands:

- In the training loop (`defer(True)`, from the first step to the last epoch's end): the signal
  only raises a flag. The trainer reads it at its next sync point (every 20 steps and at each
  epoch end, in the one collective that also carries "loss not finite"), so all ranks agree; rank
  0 writes a checkpoint (mid-epoch, or the epoch's own) and `Preempted` unwinds every rank.
- Everywhere else inside `run()` (`stop_at_once()`: process-group set-up, waiting for the run
  key's lock, dataset decode, artifact builds, the final evaluation): no checkpoint can be written
  before the next one the loop writes, which may be far away, so the handler raises `Preempted`
  where the signal lands. A flag still unread when the loop ends (the last epoch's end) is
  honoured the same way, before the final evaluation. The requeued job resumes from the last
  checkpoint (the final evaluation's epoch is trained again: its checkpoint comes after it).
- `run()` catches `Preempted`, records the run as `requeued`, ends the process group, and
  `hand_over()` runs submitit's handler: rank 0 requeues the job; every rank exits.
- After `run()`'s outcome is decided (recording what happened) the signal only raises a flag:
  the job ends in moments, completed or requeued.

A stage job (harness/jobs/stages.py ``StageJob``: a dataset decode, a score net, a DDPM, a shard)
follows the same rule with its build in place of the loop: it stops where the signal lands and is
requeued; a resumable build (the DDPM) goes on from its saved state, another starts over.

Slurm signals every task of the job, so every rank stops the same way. Outside a submitit job
nothing is installed and the signal keeps its default action.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_state = {"flag": False, "at_once": False, "deferred": False}
_previous: dict[str, object] = {}


class Preempted(BaseException):
    """The job stops for a requeue after the signal (at a step boundary with a checkpoint, or at once).

    A BaseException so that code catching Exception (a method's hook, a retry) lets it through.
    """


def _signal() -> int:
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, name, signal.SIGUSR2)


def _on_signal(signum: int, frame) -> None:
    _state["flag"] = True
    if _state["at_once"] and not _state["deferred"]:
        raise Preempted("the requeue signal arrived outside the training loop: stopped at once, "
                        "to resume from the last checkpoint")


def install() -> None:
    """Chain our handler in front of submitit's (only inside a submitit job, main thread)."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or "handler" in _previous:
        return
    try:
        _previous["handler"] = signal.signal(_signal(), _on_signal)
    except ValueError:  # not the main thread: leave submitit's handler alone
        pass


def signalled() -> bool:
    """Whether this process got the signal (its own flag; ranks agree on it at a sync point)."""
    return _state["flag"]


@contextmanager
def stop_at_once() -> Iterator[None]:
    """Within: a signal raises Preempted where it lands (a job's work outside the training loop)."""
    _state.update(at_once=True, deferred=False)
    try:
        yield
    finally:
        _state.update(at_once=False, deferred=False)


def defer(on: bool, where: str = "") -> None:
    """From defer(True) to defer(False) a signal only raises the flag, read at the trainer's sync points.

    defer(False) (before the final evaluation) honours a flag nobody has read yet, at once.
    `stop_at_once()` ends a deferral that an exception left open.
    """
    _state["deferred"] = on
    if not on and _state["flag"] and _state["at_once"]:
        raise Preempted(f"the requeue signal arrived {where}: stopped to resume from the last checkpoint")


def hand_over() -> None:
    """Run submitit's own handler (rank 0: checkpoint the submission, requeue, exit), then exit."""
    handler = _previous.get("handler")
    if isinstance(handler, Callable):  # type: ignore[arg-type]
        handler(_signal(), None)  # rank 0 does not come back from this
    raise SystemExit(-1)
