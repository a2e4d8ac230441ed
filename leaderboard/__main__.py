"""`python -m leaderboard show|export|build|claims|regress`: the store's results as a text table, files, a page,
or a verdict.

  show     one row per configuration (test top-1 mean ± std over seeds, n); --runs: every run
  export   the runs, metrics and evals tables as CSV or Parquet files
  build    the leaderboard page: one self-contained HTML file (plotly.js inlined unless --cdn)
  claims   each paper's claim (leaderboard/claims.csv) against the store: measured effect, verdict, budget
  regress  compare each configuration between a baseline (commit or pinned file) and a candidate
           commit; exit status 0 = no regression, 1 = regression, 2 = nothing could be compared
           or bad input (a CI step)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from leaderboard import claims, export, page, regress, show


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leaderboard", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    show_cmd = commands.add_parser("show", help="print each configuration's test top-1 (mean ± std, n), or every run",
                                   formatter_class=argparse.RawDescriptionHelpFormatter, description=show.__doc__)
    show_cmd.add_argument("--db", type=Path, default=Path("outputs/results.duckdb"))
    show_cmd.add_argument("--runs", action="store_true", help="one row per run and protocol, not per configuration")
    show_cmd.add_argument("--all", action="store_true",
                          help="with --runs: include running, lost, failed and diverged runs")
    show_cmd.add_argument("--dataset", help="only this dataset (e.g. cifar10)")
    show_cmd.add_argument("--method", help="only this method (e.g. simclr)")
    show_cmd.add_argument("--protocol", help="only protocols starting with this (e.g. knn, linear)")
    show_cmd.add_argument("--commit", help="only runs at commits starting with this")
    export_cmd = commands.add_parser("export", help="write the runs, metrics and evals tables as CSV or Parquet",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, description=export.__doc__)
    export_cmd.add_argument("--db", type=Path, default=Path("outputs/results.duckdb"))
    export_cmd.add_argument("--format", choices=sorted(export.FORMATS), default="csv")
    export_cmd.add_argument("--out", type=Path, default=Path("outputs/export"), help="folder (default outputs/export)")
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
    reg = commands.add_parser("regress", help="did any configuration get worse? (exit 0 no, 1 yes, 2 cannot compare)",
                              formatter_class=argparse.RawDescriptionHelpFormatter, description=regress.__doc__)
    reg.add_argument("--db", type=Path, default=Path("outputs/results.duckdb"))
    reg.add_argument("--baseline", required=True,
                     help="a git commit (prefix ok), any name git rev-parse knows here (HEAD~1, main, a tag), "
                     "or a baseline file")
    reg.add_argument("--candidate",
                     help="a git commit (prefix ok) or any name git rev-parse knows here (HEAD, a branch, a tag); "
                     "default: the newest other commit in the store")
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
        print(show.show(args.db, args.runs, args.all, args.dataset, args.method, args.protocol, args.commit))
    elif args.command == "export":
        for path, n in export.export(args.db, args.out, args.format):
            print(f"wrote {path} ({n} rows)")
    elif args.command == "build":
        started = time.perf_counter()
        size = page.build(args.db, args.out, args.cdn)
        print(f"wrote {args.out} ({size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s")
    elif args.command == "claims":
        print(claims.run(args.db, args.claims, args.json))
    elif args.command == "regress":
        try:
            return regress.run(args.db, args.baseline, args.candidate, args.json, args.alpha, args.min_effect,
                               args.tolerance, args.write_baseline)
        except regress.CannotCompare as e:
            print(f"error: {e}", file=sys.stderr)
            return regress.CANNOT_COMPARE
    return 0


if __name__ == "__main__":
    from harness.store import quiet_broken_pipe

    sys.exit(quiet_broken_pipe(main))
