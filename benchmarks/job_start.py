"""Seconds from `python -m harness` to the first training step, with the dataset cache warm.

    python benchmarks/job_start.py [--repeats 3] [--compare OTHER_CHECKOUT]

Runs the real command line in a subprocess and times the first progress line the trainer prints
after its first step; a first, untimed run warms the dataset cache. With `--compare`, the same
command runs alternately in this checkout and in OTHER_CHECKOUT (e.g. a `git worktree` of an earlier
commit), and the table gives each side's mean and the ratio.
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


def time_to_first_step(store: Path, extra: list[str], repo: Path = REPO) -> tuple[float, float]:
    """(seconds to the first step's progress line, seconds to the first line of any output) of the
    command run in checkout `repo`."""
    cmd = [sys.executable, "-m", "harness", "backbone=convnet", "dataset.train_size=2000", "dataset.test_size=200",
           "trainer.epochs=1", "trainer.log_every=0", f"store.path={store}", "force=true",
           f"hydra.run.dir={store}.hydra", *extra]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
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
    ap.add_argument("--compare", type=Path, default=None, help="another checkout, timed alternately with this one")
    args = ap.parse_args()
    sides = {"this": REPO} if args.compare is None else {"other": args.compare.resolve(), "this": REPO}
    times: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for side, repo in sides.items():
            time_to_first_step(Path(tmp) / f"warm-{side}.duckdb", [], repo)  # the dataset and page caches
        for i in range(args.repeats):
            for side, repo in sides.items():  # interleaved: a change in the machine's load hits both sides
                times[side].append(time_to_first_step(Path(tmp) / f"{side}{i}.duckdb", [], repo))
    rows = [{"side": f"{side} ({sides[side].name})", "first_output_s": "  ".join(f"{f:.2f}" for _, f in runs),
             "first_step_s": "  ".join(f"{s:.2f}" for s, _ in runs),
             "mean_first_step_s": f"{sum(s for s, _ in runs) / len(runs):.2f}"} for side, runs in times.items()]
    notes = f"`python benchmarks/job_start.py --repeats {args.repeats}" + (
        f" --compare {args.compare}`" if args.compare else "`") + f"; load average {os.getloadavg()[0]:.1f} after."
    if args.compare is not None:
        mean = {side: sum(s for s, _ in runs) / len(runs) for side, runs in times.items()}
        notes += f" First step, this / other: {mean['this'] / mean['other']:.2f}x."
    report("job_start: python -m harness to the first training step (cache warm)", rows,
           ["side", "first_output_s", "first_step_s", "mean_first_step_s"], notes=notes)


if __name__ == "__main__":
    main()
