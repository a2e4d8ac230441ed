"""One way to write a file that readers see whole or not at all, on any shared file system.

Every file a job publishes (checkpoints, spool rows, caches, markers, artifact manifests) goes
through `atomic_file`: the bytes go to a temporary name in the same folder that no other host or
process can pick (host + pid + random), are flushed and fsynced, the temporary file is renamed over
the final name, and the folder is fsynced so the rename itself survives a node crash. When the
writer fails (a full disk, a signal, a bug) the temporary file is removed, so nothing half-written
is left to fill the disk or be mistaken for a result.

This module must not import torch: the store (and so the leaderboard) uses it.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from filelock import FileLock, Timeout


def temp_name(path: Path) -> Path:
    """A hidden name beside `path` that no other host or process will choose."""
    host = socket.gethostname().split(".")[0] or "host"
    return path.with_name(f".{path.name}.{host}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename is then as durable as they allow
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file for writing; on a clean exit it replaces `path` durably.

    ``with atomic_file(p) as f: torch.save(obj, f)`` either leaves the old `p` (or none) or the new
    one, never a mix, and never a temporary file behind.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`atomic_file` for a small text file (markers, configs, manifests)."""
    with atomic_file(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------------- build once
# A build that many jobs may start at once (a decoded dataset, an artifact) runs in the one that
# takes `<file>.lock`; the others wait for it, never without a limit in a training job.
LOCK_TIMEOUT_OPTION = "artifacts.lock_timeout_min"


class LockWaitTimeout(RuntimeError):
    """A job waited longer than ``artifacts.lock_timeout_min`` for another job's build."""


def try_lock(lock_path: str | Path) -> FileLock | None:
    """The file lock `lock_path`, taken now, or None when another holder has it (never waits)."""
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def lock_or_wait(lock_path: str, waiting_message: str, timeout_s: float | None = None) -> FileLock:
    """Take a file lock; when another job holds it, say so once and wait for it, at most `timeout_s`
    seconds (None: no limit, for stage jobs whose only work is this build). Returns the held lock;
    raises LockWaitTimeout, naming the lock and the option, when the wait runs out."""
    lock = try_lock(lock_path)
    if lock is None:
        lock = FileLock(lock_path)
        limit = "" if timeout_s is None else f" (at most {timeout_s / 60:g} min, {LOCK_TIMEOUT_OPTION})"
        print(waiting_message + limit, file=sys.stderr, flush=True)
        try:
            lock.acquire(timeout=-1 if timeout_s is None else timeout_s)
        except Timeout:
            raise LockWaitTimeout(f"gave up after {timeout_s / 60:g} min waiting for {lock_path}, held by another "
                                  f"job building it; raise {LOCK_TIMEOUT_OPTION} or stage the sweep's artifacts "
                                  "first (harness/jobs/stages.py)") from None
    return lock
