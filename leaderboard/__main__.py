"""`python -m leaderboard show --db FILE`: the store's results as a text table, one row per run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.store import Store
from leaderboard.text import format_table

SHOW_SQL = """
SELECT r.method, r.dataset, r.backbone, r.weighting, r.positives, r.seed, r.epochs, r.status,
       e.protocol, e.top1, e.top5, r.run_key, r.git_commit
FROM runs r LEFT JOIN evals e ON e.run_id = r.run_id AND e.split = 'test'
WHERE (? OR r.status = 'completed')
ORDER BY r.dataset, e.protocol, e.top1 DESC NULLS LAST, r.method
"""


def show(db: Path, include_all: bool) -> str:
    if not db.exists() and not Store(db).pending():
        raise SystemExit(f"error: --db = {db}: no such store (run a job first, or pass the store.path it used)")
    rows = Store(db).query(SHOW_SQL, [include_all])
    if not rows:
        return "no completed runs yet" + ("" if include_all else " (--all lists running and failed ones)")
    return format_table(rows, ["method", "dataset", "backbone", "weighting", "positives", "seed", "epochs",
                               "status", "protocol", "top1", "top5", "run_key", "git_commit"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leaderboard", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    show_cmd = commands.add_parser("show", help="print every completed run with its evaluations")
    show_cmd.add_argument("--db", type=Path, default=Path("outputs/results.duckdb"))
    show_cmd.add_argument("--all", action="store_true", help="include running, failed and diverged runs")
    args = parser.parse_args(argv)
    if args.command == "show":
        print(show(args.db, args.all))
    return 0


if __name__ == "__main__":
    sys.exit(main())
