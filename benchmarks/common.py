"""What every benchmark shares: the machine and versions it ran on, and appending to RESULTS.md.

Benchmarks compare things side by side in one run (ratios), print a table, and append it with
the date, machine and package versions to benchmarks/RESULTS.md. Timing never goes in tests.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python benchmarks/x.py`

from leaderboard.text import format_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PACKAGES = ("torch", "torchvision", "duckdb", "plotly", "diffusers")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    text = f"{os.cpu_count()} × {cpu}"
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if gpu:
            text += f", GPU {gpu.splitlines()[0]}"
    except (OSError, subprocess.SubprocessError):
        pass
    return text


def versions() -> str:
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return f"python {platform.python_version()}, " + ", ".join(found)


def report(name: str, rows: list[dict], columns: list[str], notes: str = "") -> str:
    """Print the table and append it to RESULTS.md under a dated heading."""
    table = format_table(rows, columns)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = f"## {name} — {when}\n\n{machine()}; {versions()}\n\n```\n{table}\n```\n"
    if notes:
        text += f"\n{notes}\n"
    print(text)
    with RESULTS.open("a") as f:
        f.write("\n" + text)
    return table
