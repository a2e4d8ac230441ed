"""A really full disk for fault tests: a small file system mounted for the test, where one can be made."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _run(*cmd: str) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@contextmanager
def small_file_system(folder: Path, size_kib: int) -> Iterator[str | None]:
    """Mount a `size_kib` file system at `folder` (a tmpfs, else a loop-mounted ext4 image).

    Yields None when neither can be mounted here (not root, no mount in the sandbox), else what was
    mounted; it is unmounted when the block ends.
    """
    folder.mkdir(parents=True, exist_ok=True)
    kind = None
    if shutil.which("mount") and _run("mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(folder)):
        kind = "tmpfs"
    elif shutil.which("mkfs.ext4"):
        image = folder.with_name(folder.name + ".img")
        with open(image, "wb") as f:
            f.truncate(size_kib * 1024)
        if _run("mkfs.ext4", "-q", "-F", str(image)) and _run("mount", "-o", "loop", str(image), str(folder)):
            kind = "ext4 image"
    try:
        yield kind
    finally:
        if kind and not _run("umount", str(folder)):
            _run("umount", "-l", str(folder))
