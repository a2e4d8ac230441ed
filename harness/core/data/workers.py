"""Run a function over tasks in worker processes, and fail at once, in one line, when a worker dies;
and the one pool of threads that decodes and augments each batch's images.

Why not concurrent.futures.ProcessPoolExecutor: on Python 3.11 a worker killed (by the OOM killer, by
a user) while it held the pool's shared queue lock left the decode hanging forever in CI, and the
pool's exit hook then held the whole interpreter at exit. Here each worker has a pipe of its own: the
parent hands it one task at a time and waits on the pipes and the workers' exit sentinels together, so
no lock is shared and a death is seen the moment it happens.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection, wait
from typing import Any


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which Slurm and taskset narrow), else all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_IMAGE_THREADS: list[ThreadPoolExecutor] = []


def set_image_threads(n: int) -> None:
    """Decode and augment images with `n` threads (default: one per usable core)."""
    _IMAGE_THREADS[:] = [ThreadPoolExecutor(max(1, n), thread_name_prefix="image-work")]


def image_threads() -> ThreadPoolExecutor:
    """The threads that decode JPEGs and make the CPU's views, one image per task: libjpeg-turbo, OpenCV
    and torch's kernels release the GIL, so the threads use every core without a process each. One pool
    for both, so the next batch's decode and this batch's views share the cores instead of doubling
    the threads on them."""
    if not _IMAGE_THREADS:
        set_image_threads(usable_cores())
    return _IMAGE_THREADS[0]


class DecodeFailed(RuntimeError):
    """Decoding or encoding a dataset stopped for a reason its one-line message says (a worker died)."""


class WorkerDied(RuntimeError):
    """A worker process ended before its work was done (killed, or out of memory); `how` says how."""

    def __init__(self, exitcode: int | None):
        if exitcode is not None and exitcode < 0:
            try:
                name = signal.Signals(-exitcode).name
            except ValueError:
                name = f"signal {-exitcode}"
            # SIGKILL comes from a user or from the kernel when memory runs out; the others from a user
            self.how = f"killed by {name}" + (", by a user or when memory ran out" if name == "SIGKILL" else "")
        else:  # its own error, printed by the worker above this line
            self.how = f"it exited with code {exitcode}; its error is printed above"
        super().__init__(f"a worker process died ({self.how})")


def _serve(conn: Connection, fn: Callable[[Any], Any]) -> None:
    """A worker: run `fn` on each task the parent sends until it sends None; a task's exception is sent
    back (the parent raises it) and the worker goes on."""
    while (task := conn.recv()) is not None:
        try:
            conn.send((True, fn(task)))
        except Exception as e:  # noqa: BLE001 - the parent raises it, with the task's context
            try:
                conn.send((False, e))
            except Exception:  # noqa: BLE001 - an exception that does not pickle: its text still travels
                conn.send((False, RuntimeError(f"{type(e).__name__}: {e}")))


@contextlib.contextmanager
def _main_left_out(fn: Callable[[Any], Any]) -> Iterator[None]:
    """Start workers that do not run the parent's __main__ again. A fork-server worker, like a spawned one,
    re-runs the script that started the parent (as __mp_main__) before its first task; in a script without
    an `if __name__ == "__main__":` guard that loads a dataset, each worker then loaded it again, waited for
    the decode lock its own parent held, and the decode hung. The tasks' functions live in `preload`'s
    module, so a worker needs nothing of __main__: while a worker starts, __main__ is a bare module. Not
    when the function is __main__'s own (`python -m harness.core.data.encoded`, a guarded module): the
    worker must import it to find the function."""
    main = sys.modules.get("__main__")
    if getattr(fn, "__module__", None) == "__main__":
        yield
        return
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def map_in_processes(fn: Callable[[Any], Any], tasks: Sequence[Any], workers: int,
                     preload: str) -> Iterator[Any]:
    """`fn(task)` for each task, in task order, computed in `workers` processes forked from a fork server
    that imported `preload` once (not fork: a fork of a process that may hold CUDA or many threads is not
    safe; not spawn: each worker would import torch again, seconds each). `fn` must be a module-level
    function of `preload`. Raises WorkerDied when a worker dies; a task's own exception is raised as is."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([preload])
    procs: list[Any] = []
    conns: list[Connection] = []
    completed = False
    try:
        for _ in range(max(1, min(workers, len(tasks)))):
            parent, child = context.Pipe()
            proc = context.Process(target=_serve, args=(child, fn), daemon=True)
            with _main_left_out(fn):
                proc.start()
            child.close()
            procs.append(proc)
            conns.append(parent)
        queue = iter(range(len(tasks)))
        busy: dict[Connection, int] = {}
        finished: dict[int, Any] = {}
        next_out = 0

        def hand_out(conn: Connection) -> None:
            index = next(queue, None)
            if index is not None:
                try:
                    conn.send(tasks[index])
                except OSError:  # its pipe is broken: it died
                    by_conn[conn].join()
                    raise WorkerDied(by_conn[conn].exitcode) from None
                busy[conn] = index

        by_sentinel = {proc.sentinel: proc for proc in procs}
        by_conn = dict(zip(conns, procs))
        for conn in conns:
            hand_out(conn)
        while busy:
            for ready in wait([*busy, *by_sentinel]):
                if ready in by_sentinel:  # a worker ended, and none ends before it is told to: it died
                    by_sentinel[ready].join()
                    raise WorkerDied(by_sentinel[ready].exitcode)
                try:
                    ok, value = ready.recv()
                except (EOFError, OSError):  # its pipe closed or reset: it is dying
                    by_conn[ready].join()
                    raise WorkerDied(by_conn[ready].exitcode) from None
                index = busy.pop(ready)
                if not ok:
                    raise value
                finished[index] = value
                hand_out(ready)
            while next_out in finished:
                yield finished.pop(next_out)
                next_out += 1
        completed = True
    finally:
        # Done: each worker is told to stop and exits at once. Stopped early (a death, a task's error, the
        # caller gone): the others are killed, not left to finish work nobody will read.
        for conn, proc in zip(conns, procs):
            try:
                conn.send(None) if completed else proc.kill()
            except OSError:
                pass
        for proc in procs:
            proc.join(timeout=10)  # a hang guard only
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in conns:
            conn.close()

