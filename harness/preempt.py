"""Stop cleanly on Slurm's pre-timeout or preemption signal, then let submitit requeue the job.

Submitit asks Slurm for `--signal=USR2@<signal_delay_s>` and installs a USR2 handler that
requeues the job and exits at once, wherever training is, losing the work since the last epoch's
checkpoint. `install()` puts our handler in front of it: the signal only raises a flag; the
trainer looks at the flag at its next step boundary where it already syncs with the host (every
20 steps and at each epoch end), all ranks agree on it, rank 0 writes a mid-epoch checkpoint, and
`Preempted` unwinds the job; `hand_over()` then runs submitit's handler, which requeues the job
(rank 0) and exits. The requeued job resumes from that step.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import torch

from harness import distributed

_flag = {"set": False}
_previous: dict[str, object] = {}


class Preempted(BaseException):
    """The job stopped at a step boundary after the signal; a checkpoint was written.

    A BaseException so that code catching Exception (a method's hook, a retry) lets it through.
    """


def _signal() -> int:
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, name, signal.SIGUSR2)


def _on_signal(signum: int, frame) -> None:
    _flag["set"] = True


def install() -> None:
    """Chain our handler in front of submitit's (only inside a submitit job, main thread)."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or "handler" in _previous:
        return
    try:
        _previous["handler"] = signal.signal(_signal(), _on_signal)
    except ValueError:  # not the main thread: leave submitit's handler alone
        pass


def requested() -> bool:
    """Whether any rank got the signal; a collective when there are several ranks."""
    if distributed.world_size() == 1:
        return _flag["set"]
    flag = torch.tensor([1.0 if _flag["set"] else 0.0],
                        device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def hand_over() -> None:
    """Run submitit's own handler (rank 0: checkpoint the submission, requeue, exit), then exit."""
    handler = _previous.get("handler")
    if isinstance(handler, Callable):  # type: ignore[arg-type]
        handler(_signal(), None)  # rank 0 does not come back from this
    raise SystemExit(-1)
