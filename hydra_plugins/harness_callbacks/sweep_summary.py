"""Hydra callback of the harness app (``hydra.callbacks`` in harness/conf/config.yaml): tag the runs of
one sweep, and print what happened when it ends. It lives outside harness/ because it prints through
the leaderboard's table formatter (harness/ never imports leaderboard/)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from harness.store import SWEEP_ENV, Store, StoreBusy
from leaderboard.text import format_table, sweep_groups


class SweepSummary(Callback):
    """Marks every run of a multirun with one sweep id, and lists those runs at the end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Jobs inherit the environment (in-process, or through submitit/sbatch).
        os.environ[SWEEP_ENV] = str(Path(config.hydra.sweep.dir).absolute())

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("dry_run"):
            return  # a preview: the launcher printed the plan, nothing ran
        # The driver is the sweep's ingester: its jobs only wrote files (spool and run folders).
        store = Store(config.store.path, config.store.get("runs_dir"))
        sweep_id = os.environ.get(SWEEP_ENV)
        try:
            rows = store.query(
                "SELECT p.overrides, p.run_key, p.status, p.objective, p.error, p.log_dir, r.config"
                " FROM sweep_points p LEFT JOIN runs r ON r.run_id = p.run_id"
                " WHERE p.sweep_id = ? ORDER BY p.finished_at",
                # A reader or an ingester holds the database for a second or so: wait for it. A shell left
                # open on it may hold it for hours: the rows are safe in files, so not for that.
                [sweep_id], timeout=float(config.store.get("summary_wait_s") or 0),
            ) if sweep_id else []
        except StoreBusy as e:
            print(f"\nSweep finished; no summary: {e}. Its rows wait in {store.spool}; ingest them with: "
                  f"{store.ingest_command()}", file=sys.stderr)
            # The exit status must not depend on who held the database: the launcher saw which points failed.
            from hydra_plugins.harness_launchers.launchers import failed_points

            exit_if_failed(len(failed_points))
            return
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        text = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        print(f"\nSweep finished: {len(rows)} point(s){': ' + text if text else ''}.", file=sys.stderr)
        if rows:
            print(format_table(rows, ["overrides", "run_key", "status", "objective", "error", "log_dir"]),
                  file=sys.stderr)
            groups = sweep_groups(rows)  # one line per configuration: mean ± std over its seeds
            if groups:
                print("\n" + groups, file=sys.stderr)
        print(results_hint(store.path), file=sys.stderr)
        exit_if_failed(counts.get("failed", 0))


def exit_if_failed(failed: int) -> None:
    """Exit 1 when a point failed, after everything else was printed: a script or CI running the sweep
    sees it."""
    if failed:
        print(f"\n{failed} point(s) failed; running the same command again retries only those.", file=sys.stderr)
        sys.exit(1)


def results_hint(store_path: Path) -> str:
    return (
        f"\nResults: {store_path}\n"
        f"  summary table:    python -m leaderboard show --db {store_path}\n"
        f"  the page:         python -m leaderboard build --db {store_path} --out outputs/leaderboard.html"
        f"   (then open outputs/leaderboard.html in a browser)\n"
        f"  query it:         python -c \"import duckdb; print(duckdb.connect('{store_path}', read_only=True)"
        f".sql('select * from evals'))\""
    )
