"""Seconds from `python -m harness` to the first training step, with the dataset cache warm.

    python benchmarks/job_start.py [--repeats 3]

Runs the real command line in a subprocess and times the first progress line the trainer prints
after its first step; a first, untimed run warms the dataset cache.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def time_to_first_step(store: Path, extra: list[str]) -> tuple[float, float]:
    """(seconds to the first step's progress line, seconds to the first line of any output)."""
    cmd = [sys.executable, "-m", "harness", "backbone=convnet", "dataset.train_size=2000", "dataset.test_size=200",
           "trainer.epochs=1", "trainer.log_every=0", f"store.path={store}", "force=true",
           f"hydra.run.dir={store}.hydra", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    first_output = first_step = None
    for line in proc.stderr:
        now = time.perf_counter() - started
        first_output = first_output or now
        if "[train] epoch 1/1 step" in line:
            first_step = now
            break
    proc.kill()
    proc.wait()
    if first_step is None:
        raise RuntimeError("the job never reached its first step")
    return first_step, first_output


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        time_to_first_step(Path(tmp) / "warm.duckdb", [])  # warms the dataset cache and the OS page cache
        rows = []
        for i in range(args.repeats):
            step, first = time_to_first_step(Path(tmp) / f"r{i}.duckdb", [])
            rows.append({"run": i + 1, "first_output_s": first, "first_step_s": step})
    report("job_start: python -m harness to the first training step (cache warm)", rows,
           ["run", "first_output_s", "first_step_s"], notes="Target: under 10 s.")


if __name__ == "__main__":
    main()
