"""`python -m leaderboard show|build|regress`: the store's results as a text table, a page, or a verdict.

  show     every run with its evaluations, as a text table
  build    the leaderboard page: one self-contained HTML file (plotly.js inlined unless --cdn)
  claims   each paper's claim (leaderboard/claims.csv) against the store: measured effect, verdict, budget
  regress  compare each configuration between a baseline (commit or pinned file) and a candidate
           commit; exit status 1 when anything regressed (a CI step)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from harness.store import Store
from leaderboard import claims, page, regress
from leaderboard.text import format_table

SHOW_SQL = """
SELECT r.method, r.dataset, r.backbone, coalesce(r.weighting_variant, r.weighting) AS weighting,
       coalesce(r.positives_variant, r.positives) AS positives, r.seed, r.epochs, r.status,
       e.protocol, e.top1, e.top5, r.run_key, r.git_commit
FROM runs r LEFT JOIN evals e ON e.run_id = r.run_id AND e.split = 'test'
WHERE (? OR r.status = 'completed')
ORDER BY r.dataset, e.protocol, e.top1 DESC NULLS LAST, r.method
"""


def show(db: Path, include_all: bool) -> str:
    if not db.exists() and not Store(db).pending():
        raise SystemExit(f"error: --db = {db}: no such store (run a job first, or pass the store.path it used)")
    store = Store(db)
    rows = store.query(SHOW_SQL, [include_all])
    if not rows:
        text = "no completed runs yet" + ("" if include_all else " (--all lists running and failed ones)")
    else:
        text = format_table(rows, ["method", "dataset", "backbone", "weighting", "positives", "seed", "epochs",
                                   "status", "protocol", "top1", "top5", "run_key", "git_commit"])
    return text + rejected_note(store)


def rejected_note(store: Store) -> str:
    """A line on the spool files the store refused, or nothing when there are none."""
    n = store.rejected()
    return f"\n{n} spool file(s) rejected (not ingested): see {store.rejected_dir}, each with a .why line" if n else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leaderboard", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    show_cmd = commands.add_parser("show", help="print every completed run with its evaluations")
    show_cmd.add_argument("--db", type=Path, default=Path("outputs/results.duckdb"))
    show_cmd.add_argument("--all", action="store_true", help="include running, failed and diverged runs")
    build_cmd = commands.add_parser("build", help="write the leaderboard page")
    build_cmd.add_argument("--db", type=Path, default=Path("outputs/results.duckdb"))
    build_cmd.add_argument("--out", type=Path, default=Path("leaderboard.html"))
    build_cmd.add_argument("--cdn", action="store_true",
                           help="load plotly.js from its CDN (small file; viewing needs internet)")
    claims_cmd = commands.add_parser("claims", help="check the papers' claims against the store",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description=claims.__doc__)
    claims_cmd.add_argument("--db", type=Path, default=Path("outputs/results.duckdb"))
    claims_cmd.add_argument("--claims", type=Path, default=claims.CLAIMS,
                            help="a claims CSV (default: the shipped one)")
    claims_cmd.add_argument("--json", action="store_true", help="print the results as JSON")
    reg = commands.add_parser("regress", help="did any configuration get worse? (exit 1 if so)",
                              formatter_class=argparse.RawDescriptionHelpFormatter, description=regress.__doc__)
    reg.add_argument("--db", type=Path, default=Path("outputs/results.duckdb"))
    reg.add_argument("--baseline", required=True, help="a git commit (prefix ok) or a baseline file")
    reg.add_argument("--candidate", help="a git commit (prefix ok); default: the newest other commit in the store")
    reg.add_argument("--json", type=Path, help="write the verdicts as JSON here")
    reg.add_argument("--alpha", type=float, default=0.05, help="one-sided level of Welch's test (default 0.05)")
    reg.add_argument("--min-effect", type=float, default=0.5,
                     help="smallest drop in points that may count as a regression under the test (default 0.5)")
    reg.add_argument("--tolerance", type=float, default=1.0,
                     help="allowed drop in points when a side has one seed (default 1.0)")
    reg.add_argument("--write-baseline", type=Path, metavar="FILE",
                     help="pin the --baseline commit's values (with --tolerance) into FILE and exit")
    args = parser.parse_args(argv)
    if args.command == "show":
        print(show(args.db, args.all))
    elif args.command == "build":
        started = time.perf_counter()
        size = page.build(args.db, args.out, args.cdn)
        print(f"wrote {args.out} ({size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s")
    elif args.command == "claims":
        print(claims.run(args.db, args.claims, args.json))
    elif args.command == "regress":
        return regress.run(args.db, args.baseline, args.candidate, args.json, args.alpha, args.min_effect,
                           args.tolerance, args.write_baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
