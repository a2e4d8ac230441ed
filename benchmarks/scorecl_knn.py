"""Base method vs the same method + ScoreCL weights: k-NN top-1 side by side, same seeds.

Runs `python -m harness` for weighting none and scorecl at each seed (both share one score-net
artifact), then reports the k-NN top-1 of each run and the per-seed difference. Small budgets are
noisy: read a difference against the spread over seeds.

    python benchmarks/scorecl_knn.py --method simclr --seeds 0 1 --store /tmp/knn/results.duckdb \\
        [HYDRA OVERRIDES, default: the ConvNet on 2,000 CIFAR-10 images for 3 epochs, tiny score net]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python benchmarks/x.py`

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = ["backbone=convnet", "dataset.train_size=2000", "dataset.test_size=1000", "trainer.batch_size=256",
            "trainer.epochs=3", "trainer.warmup_epochs=0", "eval.every=1"]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--store", default="outputs/scorecl_knn/results.duckdb")
    parser.add_argument("--scorecl", default="scorecl_tiny", help="the weighting preset for the +ScoreCL runs")
    args, overrides = parser.parse_known_args(argv)
    overrides = overrides or DEFAULTS

    from benchmarks.common import report
    from harness.store import Store

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for seed in args.seeds:
        for weighting in ("none", args.scorecl):
            cmd = [sys.executable, "-m", "harness", f"method={args.method}", f"weighting={weighting}", f"seed={seed}",
                   f"store.path={args.store}", f"name=scorecl_knn:{weighting}", *overrides]
            print("$", " ".join(cmd[1:]), file=sys.stderr, flush=True)
            subprocess.run(cmd, cwd=REPO, env=env, check=True)
    rows_by = {}
    for r in Store(args.store).query(
            "select r.seed, r.weighting, e.protocol, e.top1 from runs r join evals e using (run_id) "
            "where r.status = 'completed' and e.split = 'test'"):
        rows_by.setdefault(r["seed"], {}).setdefault(r["protocol"], {})[r["weighting"]] = r["top1"]
    rows = []
    for seed in args.seeds:
        for protocol, by in sorted(rows_by.get(seed, {}).items()):
            base, plus = by.get("none"), by.get("scorecl")
            rows.append({"method": args.method, "seed": seed, "protocol": protocol,
                         "base": f"{base:.2f}" if base is not None else "-",
                         "+scorecl": f"{plus:.2f}" if plus is not None else "-",
                         "diff": f"{plus - base:+.2f}" if base is not None and plus is not None else "-"})
    notes = (f"k-NN top-1 (%) on the CIFAR-10 test subset. Overrides: {' '.join(overrides)}; ScoreCL preset "
             f"weighting={args.scorecl}. Tiny budgets: differences of a point or two are within seed noise. "
             f"Command: python benchmarks/scorecl_knn.py {' '.join(argv)}")
    report(f"{args.method}: base vs +ScoreCL k-NN", rows, ["method", "seed", "protocol", "base", "+scorecl", "diff"],
           notes)


if __name__ == "__main__":
    main(sys.argv[1:])
