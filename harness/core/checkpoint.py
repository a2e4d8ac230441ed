"""Checkpoints that a crash, a full disk or a hostile file in the shared runs folder cannot turn
into a stuck or hijacked job.

A checkpoint lives at `path` (e.g. ``checkpoint.pt``) and the one before it at `previous_path(path)`
(``checkpoint.prev.pt``). `save_checkpoint` writes the new file whole to a temporary name (through
`harness.atomic.atomic_file`: fsynced, host+pid+random name, removed on failure), then renames the
current file to the previous name and the new file to the current name, so a crash at any point
leaves at least one complete checkpoint.

`load_checkpoint` reads with ``torch.load(weights_only=True)``: only tensors, numbers, strings and
plain containers come back, and nothing in the file is executed. A file that cannot be read that
way (cut short, zero bytes, refused) is reported in one line and moved aside (to
``checkpoint.pt.unreadable``, kept for inspection, never loaded); the previous checkpoint is used,
or the caller starts over when there is none.
"""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from harness.atomic import atomic_file, fsync_dir


def previous_path(path: Path) -> Path:
    """Where the checkpoint before `path` is kept: checkpoint.pt -> checkpoint.prev.pt."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def has_checkpoint(path: Path) -> bool:
    """Whether a run could resume from `path` or from the checkpoint before it."""
    return path.exists() or previous_path(path).exists()


def remove_checkpoints(path: Path) -> None:
    """Forget a run's checkpoints (a forced re-run starts over)."""
    for p in (path, previous_path(path)):
        p.unlink(missing_ok=True)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Publish `state` at `path`, keeping the checkpoint it replaces at `previous_path(path)`.

    Raises OSError naming `path` when the file cannot be written (a full disk); the temporary file
    is then removed and the checkpoints already there are untouched.
    """
    path = Path(path)
    # Serialise in memory first: a failing disk then surfaces as a plain OSError from write(),
    # not as torch's zip writer error, and nothing is written until the bytes are complete.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        with atomic_file(path) as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
            # The new bytes are durable under the temporary name: only now retire the current
            # checkpoint. Between this rename and atomic_file's, only the previous one exists;
            # load_checkpoint falls back to it.
            if path.exists():
                os.replace(path, previous_path(path))
                fsync_dir(path.parent)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


class _NotACheckpoint(ValueError):
    """The file was read but holds no checkpoint (or nothing at all)."""


def _reason(error: BaseException) -> str:
    """One short phrase for why a checkpoint could not be read."""
    text = str(error)
    if isinstance(error, _NotACheckpoint):
        return text
    refused = re.search(r"WeightsUnpickler error: ([^\n]*?)(?:\. |\n|$)", text)
    if refused:
        return f"refused by weights_only=True: {refused.group(1)}"
    first = text.strip().split("\n")[0].split(". ")[0]
    return (f"{type(error).__name__}: {first}" if first else f"{type(error).__name__}, the file is cut short")[:300]


def _read(path: Path, map_location, required: tuple[str, ...]) -> dict[str, Any]:
    if path.stat().st_size == 0:
        raise _NotACheckpoint("zero bytes")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or any(k not in state for k in required):
        raise _NotACheckpoint(f"not a checkpoint (expected a dict with keys {list(required)})")
    return state


def load_checkpoint(path: Path, map_location: Any = "cpu", label: str = "[train]", main: bool = True,
                    required: tuple[str, ...] = ("epoch",)) -> dict[str, Any] | None:
    """The newest readable checkpoint at `path` (else the previous one), or None: start over.

    `main`: this process reports what it found, moves an unreadable file aside and removes the
    temporary files of a killed writer (rank 0 of a job, holding the run's lock; the other ranks
    read the same files and reach the same answer silently).
    """
    path = Path(path)
    previous = previous_path(path)
    if main:
        # Temporary files of a writer that was killed (SIGKILL, node crash) before it could remove
        # them. The caller holds the run's lock, so no live writer owns one.
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
    candidates = [p for p in (path, previous) if p.exists()]
    problems: list[str] = []
    for candidate in candidates:
        try:
            state = _read(candidate, map_location, required)
        except Exception as e:  # noqa: BLE001 - any failure to read means: do not trust this file
            problems.append(f"{candidate.name} is unreadable ({_reason(e)})")
            if main and candidate == path:
                # Out of the way, so the next save does not retire it over the good previous one.
                try:
                    os.replace(path, path.with_name(path.name + ".unreadable"))
                except OSError:
                    pass  # a read-only folder: the save that follows fails and says so
            continue
        if problems and main:
            print(f"{label} {'; '.join(problems)}; resuming from {candidate.name}", file=sys.stderr, flush=True)
        return state
    if problems and main:
        print(f"{label} {'; '.join(problems)}; starting over", file=sys.stderr, flush=True)
    return None
