"""The results store: a DuckDB file that indexes what jobs wrote into plain files.

DuckDB allows one writer per file, cluster file systems do not always honour the locks it relies
on, and a user may keep the file open in a duckdb shell. So a training job never opens the
database. Every write is a small JSON-lines file, published atomically (``harness.atomic``) twice:

- into the job's run folder, ``<runs>/<run_key>/rows/<table>/``: the run's permanent record,
  never deleted or moved;
- into the spool beside the database, ``<store>.spool/<table>/``: the queue an ingester consumes.

Two plain writes rather than one file plus a link: the run folder and the spool may lie on
different file systems (``store.runs_dir``), and the rows are small. A job decides "already
completed" from the atomic marker ``<runs>/<run_key>/done.json`` (run id, objective, time), which
it writes only after its last rows are spooled.

*Ingesters* (the sweep driver when a sweep ends, a local ``python -m harness`` run when it ends,
``python -m leaderboard``, ``python -m harness.store ingest``) open the database under a lock
file, migrate the schema only when its version changed, and:

1. copy pending spool files into the database in one transaction, record their names in the same
   transaction and only then delete them, so a crash at any point neither loses nor duplicates a
   row. A file that cannot be ingested (truncated JSON, a value of the wrong type) is moved to
   ``<store>.spool/rejected/`` with a ``.why`` line beside it, and the rest goes in;
2. re-read the run folder of every run whose done marker exists but which the database does not
   hold as completed (a deleted database, rows lost): a finished run is never skipped bare.
   ``python -m harness.store rebuild`` re-reads every run folder, finished or not.

Rows are upserts keyed by each table's primary key, newest file first, which is what makes a job
that resumes after a kill end with exactly one metrics row per epoch, and re-reading a run folder
harmless.

This module must not import torch: the leaderboard reads the store on machines without it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
from filelock import FileLock, Timeout

from harness.atomic import atomic_file, try_lock, write_text_atomic

# table -> (columns with DuckDB types, primary key). Columns may be added over time: opening a
# store adds missing ones, so older databases keep working.
TABLES: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "runs": (
        {
            "run_id": "VARCHAR",
            "run_key": "VARCHAR",
            "name": "VARCHAR",
            # running | completed | failed | diverged | pruned | requeued | lost (no heartbeat: see mark_lost)
            "status": "VARCHAR",
            "method": "VARCHAR",
            "dataset": "VARCHAR",
            "backbone": "VARCHAR",
            "weighting": "VARCHAR",
            "positives": "VARCHAR",
            "synthetic_ratio": "DOUBLE",
            # The config option chosen (weighting=scorecl_tiny), which the YAML's `name` does not tell apart.
            "weighting_variant": "VARCHAR",
            "positives_variant": "VARCHAR",
            "seed": "INTEGER",
            "epochs": "INTEGER",
            "batch_size": "INTEGER",
            "lr": "DOUBLE",  # the learning rate actually used, after the batch-size scaling rule
            "config": "VARCHAR",  # the full resolved config as JSON
            "git_commit": "VARCHAR",
            "git_dirty": "BOOLEAN",
            "host": "VARCHAR",
            "device_name": "VARCHAR",
            "world_size": "INTEGER",
            "nodes": "VARCHAR",
            "sweep": "VARCHAR",  # the preset's name
            "sweep_id": "VARCHAR",  # one sweep invocation (its Hydra sweep folder)
            "started_at": "TIMESTAMP",
            "finished_at": "TIMESTAMP",
            "error": "VARCHAR",
            "objective": "DOUBLE",
            "gpu_hours": "DOUBLE",
            "epochs_done": "INTEGER",
            "residency": "VARCHAR",  # where the training images lived: device | host (dataset.residency)
            "peak_host_rss_mb": "DOUBLE",  # the main rank's peak resident set (mapped cache pages included)
            "peak_device_mb": "DOUBLE",  # the main rank's peak allocated device memory (None on CPU)
            # Wall-clock of all the run's attempts together (started_at/finished_at are the last one's).
            "wall_seconds": "DOUBLE",
            "attempts": "INTEGER",
        },
        ("run_id",),
    ),
    # Epochs count from 1 in every table: metrics.epoch = N holds the values after the N-th epoch of
    # training, like evals.epoch and runs.epochs_done (stores and rows from before counted metrics from 0:
    # see ROW_FORMAT and MIGRATIONS).
    "metrics": (
        {"run_id": "VARCHAR", "run_key": "VARCHAR", "epoch": "INTEGER", "name": "VARCHAR", "value": "DOUBLE"},
        ("run_id", "epoch", "name"),
    ),
    "evals": (
        {
            "run_id": "VARCHAR",
            "run_key": "VARCHAR",
            "protocol": "VARCHAR",
            "split": "VARCHAR",
            "top1": "DOUBLE",
            "top5": "DOUBLE",
            "epoch": "INTEGER",
            # The dataset a transfer probe ran on (eval.transfer; split "transfer:<dataset>"); NULL for
            # the run's own dataset.
            "dataset": "VARCHAR",
            # What top1 holds when it is not top-1 accuracy: a transfer set's metric in the ssl-transfer
            # protocol (mean_per_class, map11; harness/core/logreg.py). NULL or top1: top-1 accuracy.
            "metric": "VARCHAR",
        },
        ("run_id", "protocol", "split"),
    ),
    # One row per point of a sweep invocation, whatever became of it (skipped points included),
    # for the summary a sweep prints when it ends.
    "sweep_points": (
        {
            "sweep_id": "VARCHAR",
            "run_key": "VARCHAR",
            "run_id": "VARCHAR",
            "overrides": "VARCHAR",
            "status": "VARCHAR",  # completed | skipped | failed | diverged
            "objective": "DOUBLE",
            "error": "VARCHAR",
            "log_dir": "VARCHAR",
            "finished_at": "TIMESTAMP",
        },
        ("sweep_id", "run_key"),
    ),
    "references": (
        {
            "source": "VARCHAR",
            "method": "VARCHAR",
            "dataset": "VARCHAR",
            "backbone": "VARCHAR",
            "epochs": "INTEGER",
            "protocol": "VARCHAR",
            "top1": "DOUBLE",
            "note": "VARCHAR",
        },
        ("source", "method", "dataset", "backbone", "epochs", "protocol"),
    ),
}


# Settings that say where and how a run executes, not what it computes: they stay out of the
# run key, so moving a run to another machine or store does not make it a new run.
NOT_IN_RUN_KEY = (
    "force",
    "dry_run",
    "name",
    "tags",
    "sweep",
    "sweep_floor",  # whether a sweep adds floor points; a floor run has trainer.epochs=0 in its key
    "sweep_points",  # a preset's listed points (harness/jobs/sweeps.py): each point's own overrides are keyed
    "claim",  # the published claim a preset's point tests: a label, not a setting
    "paper_data",  # where a paper preset looks for its data (dataset.root is not keyed either)
    "paper_transfer",  # a paper preset's transfer list, used as eval.transfer (not keyed either)
    "store",
    "artifacts",
    "launcher",
    "hydra",
    "trainer.device",
    "trainer.log_every",
    "trainer.num_threads",
    "trainer.compile",
    "dataset.root",
    "dataset.archive",
    "dataset.download",
    "dataset.cache_dir",
    # Where the images live and how many processes decode them: the same images, batches and views.
    "dataset.residency",
    "dataset.device_memory_fraction",
    "dataset.decode_workers",
    "eval.every",
    "optuna",  # which Optuna study/trial a tuned sweep's job reports to
    # Probes on other datasets read the trained backbone and never change it: a run is the same run
    # with or without them (a finished run gets more with `python -m harness.evaluate`).
    "eval.transfer",
    "logging",  # TensorBoard / W&B views of the metrics
    "weighting.stages",  # Slurm resources of an add-on's stage jobs (harness/jobs/stages.py)
    "positives.stages",
)

# Options added after runs were recorded, whose null default does what the code did before them: left
# out of the run key while null, so every earlier run keeps its key (and is not trained again).
NOT_IN_RUN_KEY_WHEN_NULL = (
    "weighting.score_net.image_size",  # ScoreCL's score network at the decoded images' own size
    "positives.diffusion.image_size",  # CLSP's DDPM and synthetic set at the decoded images' own size
)

# Set in the environment of every job of one sweep (the sweep_summary callback, the launchers).
SWEEP_ENV = "HARNESS_SWEEP_ID"


# Every row file written by `Store.write` carries `_format`. Files without it (format 1) come from code
# whose metrics.epoch counted from 0: loading them shifts those epochs by one, so re-reading an old run
# folder (rebuild, re-ingest) agrees with the migrated database.
ROW_FORMAT = 2
LEGACY_ROWS = {"metrics": {"epoch": "epoch + 1"}}  # table -> column -> its value from a format-1 row

# Data migrations, each applied once to a database that predates it (recorded in _migrations).
# name -> (table it rewrites, SQL)
MIGRATIONS = {
    "metrics_epoch_from_1": ("metrics", "UPDATE metrics SET epoch = epoch + 1"),
}

# Changes whenever TABLES or MIGRATIONS do, so a store is migrated (the ALTERs run) only on the first
# open by code with a different schema, not by every ingest.
SCHEMA_VERSION = hashlib.sha1(json.dumps([TABLES, sorted(MIGRATIONS), ROW_FORMAT], sort_keys=True)
                              .encode()).hexdigest()[:16]

DONE_MARKER = "done.json"
# Written by a running job's main process at least every store.heartbeat_s seconds (harness.store.Heartbeat).
HEARTBEAT = "heartbeat.json"
ROWS_DIR = "rows"
# Run folders re-read per transaction, so a rebuild of many runs never holds every file list at once.
FILES_PER_LOAD = 4000


class StoreBusy(RuntimeError):
    """The database stayed locked by another process for longer than the timeout."""


def utcnow() -> str:
    """An ISO timestamp in UTC, the form every time column of the store is written in."""
    return datetime.now(timezone.utc).replace(tzinfo=None).isoformat(timespec="milliseconds")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and value != value:  # NaN is not JSON; the store holds NULL
        return None
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return None
    return value


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


# ---------------------------------------------------------------------- run folders (any process)
def write_done(folder: Path, run_id: str, objective: float | None) -> None:
    """Mark the run in `folder` completed; call only after its last rows were written."""
    marker = {"run_id": run_id, "run_key": folder.name, "objective": _jsonable(objective), "finished_at": utcnow()}
    write_text_atomic(folder / DONE_MARKER, json.dumps(marker) + "\n")


def read_done(folder: Path) -> dict[str, Any] | None:
    """The done marker of the run in `folder`, or None when it has not completed."""
    try:
        marker = json.loads((folder / DONE_MARKER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # written atomically, so this is damage from outside
        print(f"[store] {folder / DONE_MARKER} is unreadable ({_first_line(e)}): the run counts as not done",
              file=sys.stderr)
        return None
    return marker if isinstance(marker, dict) and marker.get("run_id") else None


def last_row(folder: Path, table: str) -> dict[str, Any] | None:
    """The newest row the run in `folder` wrote to `table` (from its own copy), or None."""
    files = sorted((folder / ROWS_DIR / table).glob("*.jsonl"), key=lambda p: p.name)
    for path in reversed(files):
        try:
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            row = json.loads(lines[-1]) if lines else None
        except (OSError, ValueError):
            continue
        if isinstance(row, dict):
            row.pop("_order", None)  # bookkeeping of the row file, not columns: a caller may write the row back
            row.pop("_format", None)
            return row
    return None


class Heartbeat:
    """A timer thread that rewrites `<run folder>/heartbeat.json` every `every_s` seconds while a run lives.

    From a thread, not only at epoch ends: an epoch (or a final evaluation) may take longer than the
    time after which an ingester calls a silent run lost. The file carries the run's own
    `lost_after_s`, so every ingester (the leaderboard's too) judges the run by its config.
    """

    def __init__(self, folder: Path, run_id: str, every_s: float, lost_after_s: float):
        self.path = Path(folder) / HEARTBEAT
        self.run_id, self.every_s, self.lost_after_s = run_id, float(every_s), float(lost_after_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="harness-heartbeat", daemon=True)

    def beat(self) -> None:
        write_text_atomic(self.path, json.dumps({"run_id": self.run_id, "at": utcnow(), "pid": os.getpid(),
                                                 "host": socket.gethostname(),
                                                 "lost_after_s": self.lost_after_s}) + "\n")

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.beat()
            except OSError as e:  # a full disk: the run itself will say so; a missed beat only ages the file
                print(f"[store] heartbeat not written ({_first_line(e)})", file=sys.stderr, flush=True)

    def __enter__(self) -> Heartbeat:
        self.beat()  # at once: the first beat must not wait a whole period
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def read_heartbeat(folder: Path) -> dict[str, Any] | None:
    """The heartbeat of the run in `folder`, or None (never written, or unreadable)."""
    try:
        beat = json.loads((Path(folder) / HEARTBEAT).read_text())
    except (OSError, ValueError):
        return None
    return beat if isinstance(beat, dict) and beat.get("run_id") and beat.get("at") else None


def heartbeat_age(beat: dict[str, Any]) -> float:
    """Seconds since `beat` was written (its own UTC time, so hosts with other time zones agree)."""
    return (datetime.fromisoformat(utcnow()) - datetime.fromisoformat(beat["at"])).total_seconds()


def mark_lost(store: Store, folder: Path, run_id: str, why: str, silent_for_s: float | None = None) -> bool:
    """Record the running run `run_id` in `folder` as lost: its process is gone without a word.

    Written like any row (its run folder and the spool), from the folder's last runs row, so the
    attempts and wall-clock it had stay, and `finished_at` is the last heartbeat (the last moment it
    was known alive). The same command resumes it from its checkpoint. False when the folder's
    last row is not that run running (it ended, or a new attempt started meanwhile), or when
    `silent_for_s` is given and the heartbeat, read again now, is younger than that (a resumed attempt
    of the same run id began since the caller looked).
    """
    row = last_row(folder, "runs")
    if row is None or row.get("run_id") != run_id or row.get("status") not in ("running", "requeued"):
        return False
    beat = read_heartbeat(folder)
    if silent_for_s is not None and beat is not None and heartbeat_age(beat) <= silent_for_s:
        return False
    seen = beat["at"] if beat is not None and beat["run_id"] == run_id else row.get("started_at")
    store.write("runs", [{**row, "status": "lost", "finished_at": seen,
                          "error": f"lost: {why}; last heartbeat {seen} UTC; the same command resumes it"}],
                keep_in=folder)
    return True


class Store:
    """A DuckDB results file, the spool folder jobs write into, and the run folders it indexes."""

    def __init__(self, path: str | os.PathLike, runs_dir: str | os.PathLike | None = None):
        self.path = Path(path).expanduser().absolute()
        self.spool = self.path.with_name(self.path.name + ".spool")
        self.rejected_dir = self.spool / "rejected"
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        default_runs = self.path.with_name(self.path.name + ".runs")
        self.runs = Path(runs_dir).expanduser().absolute() if runs_dir else default_runs

    # ------------------------------------------------------------------ writing (any process)
    def write(self, table: str, rows: Iterable[dict[str, Any]], keep_in: Path | None = None) -> None:
        """Publish rows for `table`; they reach the database at the next ingest.

        `keep_in` is the writing run's folder: the same file is kept there, for good.
        """
        columns, _ = TABLES[table]
        rows = list(rows)
        if not rows:
            return
        unknown = set().union(*rows) - set(columns)
        if unknown:
            raise ValueError(f"store.write({table!r}): unknown columns {sorted(unknown)}")
        text = "".join(json.dumps({**{k: _jsonable(v) for k, v in row.items()}, "_order": order,
                                   "_format": ROW_FORMAT}) + "\n"
                       for order, row in enumerate(rows))
        # The name orders files by time, so that a later status of the same run wins.
        name = f"{time.time_ns():020d}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        # The run folder first: a row in the spool always has its permanent copy.
        for folder in ([Path(keep_in) / ROWS_DIR / table] if keep_in is not None else []) + [self.spool / table]:
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_file(folder / name, "w") as f:
                f.write(text)

    def pending(self) -> int:
        """How many spool files wait to be ingested."""
        return sum(1 for t in TABLES for _ in (self.spool / t).glob("*.jsonl")) if self.spool.exists() else 0

    def rejected(self) -> int:
        """How many spool files were quarantined because they could not be ingested."""
        return sum(1 for _ in self.rejected_dir.glob("*.jsonl")) if self.rejected_dir.exists() else 0

    def ingest_command(self) -> str:
        """The one command that ingests this store's pending rows."""
        extra = "" if self.runs == self.path.with_name(self.path.name + ".runs") else f" --runs {self.runs}"
        return f"python -m harness.store ingest --db {self.path}{extra}"

    # ------------------------------------------------------------------ the database (one writer)
    @contextmanager
    def connect(self, timeout: float = 120.0) -> Iterator[duckdb.DuckDBPyConnection]:
        """Ingest the spool (and any finished run the database lacks), then yield the up-to-date database.

        The connection holds the database exclusively: keep it short. `timeout=0` never waits:
        StoreBusy at once when another process holds the lock or the file.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(self.lock_path), timeout=timeout):
                con = self._open(deadline=time.monotonic() + timeout)
                try:
                    if self._ensure_schema(con):
                        self._write_missing_markers(con)
                    self._ingest(con)
                    self._reingest_finished_runs(con)
                    if self._mark_silent_runs_lost(con):
                        self._ingest(con)
                    yield con
                finally:
                    con.close()
        except Timeout as e:
            raise StoreBusy(f"store {self.path}: still locked by another process after {timeout:.0f} s") from e

    def _open(self, deadline: float) -> duckdb.DuckDBPyConnection:
        # Someone outside the harness (a duckdb shell) may hold the file: wait for it, briefly.
        delay = 0.05
        while True:
            try:
                return duckdb.connect(str(self.path))
            except duckdb.IOException as e:
                if "lock" not in str(e).lower() or time.monotonic() >= deadline:
                    if "lock" in str(e).lower():
                        raise StoreBusy(f"store {self.path}: {e}") from e
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    @staticmethod
    def _ensure_schema(con: duckdb.DuckDBPyConnection) -> bool:
        """Create or migrate the tables when the stored schema version differs; True when it did."""
        con.execute("CREATE TABLE IF NOT EXISTS _schema (version VARCHAR)")
        if con.execute("SELECT version FROM _schema").fetchall() == [(SCHEMA_VERSION,)]:
            return False
        con.execute("BEGIN TRANSACTION")
        try:
            existing = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            con.execute("CREATE TABLE IF NOT EXISTS _migrations (name VARCHAR PRIMARY KEY)")
            applied = {r[0] for r in con.execute("SELECT name FROM _migrations").fetchall()}
            for name, (table, sql) in MIGRATIONS.items():
                if name not in applied:
                    if table in existing:  # a new store's rows are written in the current form already
                        con.execute(sql)
                    con.execute("INSERT INTO _migrations VALUES (?)", [name])
            for table, (columns, key) in TABLES.items():
                cols = ", ".join(f'"{c}" {t}' for c, t in columns.items())
                con.execute(f'CREATE TABLE IF NOT EXISTS "{table}" ({cols}, PRIMARY KEY ({", ".join(key)}))')
                for c, t in columns.items():
                    con.execute(f'ALTER TABLE "{table}" ADD COLUMN IF NOT EXISTS "{c}" {t}')
            con.execute("CREATE TABLE IF NOT EXISTS _ingested (file VARCHAR PRIMARY KEY)")
            con.execute("DELETE FROM _schema")
            con.execute("INSERT INTO _schema VALUES (?)", [SCHEMA_VERSION])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        return True

    def _write_missing_markers(self, con: duckdb.DuckDBPyConnection) -> None:
        # Runs completed before jobs wrote done markers: give their folders one, or their jobs
        # (which no longer read the database) would train them again.
        if not self.runs.is_dir():
            return
        for run_id, key, objective in con.execute(
                "SELECT run_id, run_key, objective FROM runs WHERE status = 'completed' AND run_key IS NOT NULL"
                " QUALIFY row_number() OVER (PARTITION BY run_key ORDER BY finished_at DESC NULLS LAST) = 1"
        ).fetchall():
            folder = self.runs / key
            if folder.is_dir() and not (folder / DONE_MARKER).exists():
                write_done(folder, run_id, objective)

    def _load(self, con: duckdb.DuckDBPyConnection, batches: dict[str, list[str]], spooled: bool) -> list[str]:
        """Upsert `batches` (table -> files) in one transaction; returns the files loaded.

        A file that fails on its own is set aside (quarantined when `spooled`, else reported) and
        the others are loaded without it.
        """
        batches = {t: files for t, files in batches.items() if files}
        while batches:
            try:
                self._upsert(con, batches, record=spooled)
                return [f for files in batches.values() for f in files]
            except duckdb.Error as batch_error:
                bad = [(t, f, e) for t, files in batches.items() for f in files
                       if (e := self._try_one(con, t, f)) is not None]
                if not bad:
                    raise batch_error
                for table, file, error in bad:
                    if spooled:
                        self._quarantine(table, Path(file), error)
                    else:
                        print(f"[store] skipped {file}: {error}", file=sys.stderr)
                    batches[table].remove(file)
                batches = {t: files for t, files in batches.items() if files}
        return []

    def _upsert(self, con: duckdb.DuckDBPyConnection, batches: dict[str, list[str]], record: bool,
                keep: bool = True) -> None:
        con.execute("BEGIN TRANSACTION")
        try:
            for table, files in batches.items():
                columns, key = TABLES[table]
                spec = {**columns, "_order": "INTEGER", "_format": "INTEGER"}
                spec_sql = "{" + ", ".join(f"'{c}': '{t}'" for c, t in spec.items()) + "}"
                names = ", ".join(f'"{c}"' for c in columns)
                legacy = LEGACY_ROWS.get(table, {})
                values = ", ".join(f'CASE WHEN _format IS NULL THEN {legacy[c]} ELSE "{c}" END AS "{c}"'
                                   if c in legacy else f'"{c}"' for c in columns)
                # Within one load the newest row per key wins: file names (not their folders) sort by time.
                con.execute(
                    f"""INSERT OR REPLACE INTO "{table}" ({names})
                    SELECT {names} FROM (
                        SELECT *, row_number() OVER (
                            PARTITION BY {", ".join(f'"{k}"' for k in key)}
                            ORDER BY regexp_extract(filename, '[^/]*$') DESC, _order DESC) AS _rank
                        FROM (SELECT {values}, _order, filename
                              FROM read_json(?, format='newline_delimited', columns={spec_sql}, filename=true))
                    ) WHERE _rank = 1""",
                    [files],
                )
                if record:
                    con.executemany("INSERT INTO _ingested VALUES (?)", [[f] for f in files])
            con.execute("COMMIT" if keep else "ROLLBACK")
        except Exception:
            con.execute("ROLLBACK")
            raise

    def _try_one(self, con: duckdb.DuckDBPyConnection, table: str, file: str) -> str | None:
        """Why `file` alone cannot be loaded, or None when it can (nothing is kept either way)."""
        try:
            self._upsert(con, {table: [file]}, record=False, keep=False)
        except duckdb.Error as e:
            return _first_line(e)
        return None

    def _quarantine(self, table: str, file: Path, error: str) -> None:
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        target = self.rejected_dir / f"{table}-{file.name}"
        os.replace(file, target)
        write_text_atomic(target.with_name(target.name + ".why"), f"{file}: {error}\n")
        print(f"[store] rejected {file}: {error}; moved to {target}", file=sys.stderr)

    def _ingest(self, con: duckdb.DuckDBPyConnection) -> int:
        if not self.spool.exists():
            return 0
        # Files a crashed ingest already committed: delete them, never load them again.
        done = {r[0] for r in con.execute("SELECT file FROM _ingested").fetchall()}
        for name in done:
            Path(name).unlink(missing_ok=True)
        if done:
            con.execute("DELETE FROM _ingested")
        batches = {t: sorted(str(p) for p in (self.spool / t).glob("*.jsonl")) for t in TABLES}
        loaded = self._load(con, batches, spooled=True)
        for f in loaded:
            Path(f).unlink(missing_ok=True)
        if loaded:
            con.execute("DELETE FROM _ingested")
        return len(loaded)

    def _run_folder_files(self, folders: Iterable[Path]) -> Iterator[dict[str, list[str]]]:
        batch: dict[str, list[str]] = {t: [] for t in TABLES}
        count = 0
        for folder in folders:
            for table in TABLES:
                for path in (folder / ROWS_DIR / table).glob("*.jsonl"):
                    batch[table].append(str(path))
                    count += 1
            if count >= FILES_PER_LOAD:
                yield batch
                batch, count = {t: [] for t in TABLES}, 0
        if count:
            yield batch

    def _load_run_folders(self, con: duckdb.DuckDBPyConnection, folders: list[Path]) -> int:
        return sum(len(self._load(con, batch, spooled=False)) for batch in self._run_folder_files(folders))

    def _reingest_finished_runs(self, con: duckdb.DuckDBPyConnection) -> int:
        # One glob and one query: only folders whose run key the database lacks as completed are read.
        if not self.runs.is_dir():
            return 0
        have = {r[0] for r in con.execute("SELECT DISTINCT run_key FROM runs WHERE status = 'completed'").fetchall()}
        missing = [m.parent for m in self.runs.glob(f"*/{DONE_MARKER}") if m.parent.name not in have]
        if not missing:
            return 0
        count = self._load_run_folders(con, sorted(missing))
        print(f"[store] re-ingested {len(missing)} finished run(s) the database lacked, from their run folders "
              f"under {self.runs}", file=sys.stderr)
        return count

    def _mark_silent_runs_lost(self, con: duckdb.DuckDBPyConnection) -> int:
        """Mark lost every running run whose heartbeat is older than its lost_after_s; returns how many."""
        lost = 0
        for run_id, key in con.execute("SELECT run_id, run_key FROM runs WHERE status = 'running'").fetchall():
            folder = self.runs / str(key)
            beat = read_heartbeat(folder)
            # No heartbeat (a run from before heartbeats) or another attempt's: nothing to judge by.
            if beat is None or beat["run_id"] != run_id:
                continue
            age = heartbeat_age(beat)
            limit = float(beat.get("lost_after_s") or 900)
            if age > limit and mark_lost(self, folder, run_id,
                                          f"no heartbeat for {age:.0f} s (store.lost_after_s={limit:g})", limit):
                lost += 1
        return lost

    def ingest(self, timeout: float = 120.0) -> None:
        """Move everything spooled (and any finished run the database lacks) into the database now."""
        with self.connect(timeout=timeout):
            pass

    def rebuild(self, timeout: float = 120.0) -> int:
        """Re-read every run folder's rows (finished or not) into the database; returns files read."""
        with self.connect(timeout=timeout) as con:
            # Its own run folders and those of the stores merged into it (`merge`: rows only were taken).
            roots = [self.runs, *merged_sources(self)]
            folders = sorted(p for root in roots if root.is_dir() for p in root.iterdir() if p.is_dir())
            return self._load_run_folders(con, folders)

    # ------------------------------------------------------------------ reading
    def query(self, sql: str, params: list | None = None, timeout: float = 120.0) -> list[dict[str, Any]]:
        """Run one query on the up-to-date store and return its rows as dicts."""
        with self.connect(timeout=timeout) as con:
            cur = con.execute(sql, params or [])
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def completed(self, run_key: str) -> dict[str, Any] | None:
        """The newest completed run of `run_key` in the database, or None (jobs read done markers instead)."""
        rows = self.query(
            "SELECT * FROM runs WHERE run_key = ? AND status = 'completed' ORDER BY finished_at DESC LIMIT 1",
            [run_key],
        )
        return rows[0] if rows else None


# ---------------------------------------------------------------------- disk: du, prune, merge
WEIGHTS_FILE = "backbone.pt"  # a completed run's backbone weights (harness/jobs/run.py, store.keep_checkpoints)
CHECKPOINTS = ("checkpoint.pt", "checkpoint.prev.pt")


def tree_bytes(path: Path, seen: set[tuple[int, int]] | None = None) -> int:
    """Apparent bytes under `path`, counted as `du -sb` counts them: every entry's size (folders'
    own too), each inode once, symbolic links not followed."""
    seen = set() if seen is None else seen
    try:
        st = path.lstat()
    except FileNotFoundError:
        return 0
    if (st.st_dev, st.st_ino) in seen:
        return 0
    seen.add((st.st_dev, st.st_ino))
    total = st.st_size
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            total += tree_bytes(child, seen)
    return total


def default_artifacts(store: Store) -> Path:
    """Where a store's artifacts are unless a config says otherwise (artifacts.dir: null)."""
    return store.path.with_name(store.path.name + ".artifacts")


def harness_cache() -> Path:
    """This user's cache folder: $HARNESS_CACHE, else ~/.cache/harness (decoded datasets, config keys)."""
    return Path(os.environ.get("HARNESS_CACHE", "~/.cache/harness")).expanduser()


def default_data_cache() -> Path:
    """Where decoded datasets are cached unless a config says otherwise ($HARNESS_CACHE, as the loader reads it)."""
    return harness_cache() / "datasets"


def run_state(folder: Path) -> tuple[str, str | None]:
    """(status, finished_at) of the run in `folder` from its own record: its done marker, else its last runs row."""
    done = read_done(folder)
    if done is not None:
        return "completed", done.get("finished_at")
    row = last_row(folder, "runs") or {}
    return str(row.get("status") or "unknown"), row.get("finished_at")


def disk_usage(store: Store, artifacts: Path | None = None, data_cache: Path | None = None) -> list[dict[str, Any]]:
    """One entry per thing that holds bytes: the database, the spool, each run folder, each artifact
    (<artifacts>/<kind>/<hash>) and each data cache file; largest first."""
    artifacts = artifacts or default_artifacts(store)
    data_cache = data_cache or default_data_cache()
    entries: list[dict[str, Any]] = []
    for path in (store.path, store.path.with_name(store.path.name + ".wal"), store.spool):
        if path.exists():
            entries.append({"kind": "database" if path != store.spool else "spool", "path": path, "detail": ""})
    if store.runs.is_dir():
        for folder in sorted(p for p in store.runs.iterdir() if p.is_dir()):
            status, _ = run_state(folder)
            held = [name for name in (*CHECKPOINTS, WEIGHTS_FILE) if (folder / name).exists()]
            entries.append({"kind": "run", "path": folder, "detail": f"{status}; {', '.join(held) or 'rows only'}"})
    if artifacts.is_dir():
        for kind in sorted(p for p in artifacts.iterdir() if p.is_dir()):
            for built in sorted(kind.iterdir()):
                entries.append({"kind": "artifact", "path": built, "detail": f"stage output: {kind.name}"})
    if data_cache.is_dir():
        for cached in sorted(data_cache.iterdir()):
            entries.append({"kind": "data cache", "path": cached, "detail": ""})
    for entry in entries:
        entry["bytes"] = tree_bytes(entry["path"])
    return sorted(entries, key=lambda e: -e["bytes"])


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


@dataclass
class Removal:
    """One thing `prune` deletes: a run's checkpoint, or a build (an artifact, a data cache file) with
    the files that go with it (its lock, its partial builds). `locks`: held while it is deleted, so a
    build that starts meanwhile is never deleted under its builder."""

    paths: list[tuple[Path, int]]  # (path, bytes), the build first
    why: str
    locks: list[Path] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.paths)


def build_stem(name: str) -> str:
    """The build an entry of an artifact kind's folder or of the data cache belongs to: an artifact
    `H` with `H.lock`, `H.partial` (a DDPM's training state), `H.parts` (CLSP's shards) and a builder's
    `.H.<pid>.tmp`; a cache file `N.pt` with `N.pt.lock`, `N.pt.decoding`, its subsets `N.pt.train-D.pt`
    and their locks; an encoded store `N.jpegs`, `N.jpegs.building`, `N.index.pt`, `N.index.pt.lock`.
    Artifact hashes and cache names hold no dot, so the name up to its first dot is the build's."""
    return name.lstrip(".").split(".", 1)[0]


# The names harness gives its builds: an artifact is its config's 16-digit hash; a data cache file (or
# an encoded store) its dataset's name and a 16-digit key. prune considers nothing else it finds there.
ARTIFACT_NAME = re.compile(r"[0-9a-f]{16}")
CACHE_NAME = re.compile(r"[A-Za-z0-9_]+-(encoded-)?[0-9a-f]{16}")


def lock_held(path: Path) -> bool:
    """Whether another process (or another lock in this one) holds the file lock `path` now."""
    lock = try_lock(path)
    if lock is None:
        return True
    lock.release()
    return False


def _newest_mtime(path: Path) -> float:
    """The last time anything under `path` was written (a folder's files count; reading changes nothing)."""
    try:
        newest = path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0
    if path.is_dir() and not path.is_symlink():
        for child in path.rglob("*"):
            try:
                newest = max(newest, child.lstat().st_mtime)
            except FileNotFoundError:  # removed while we walked
                pass
    return newest


def _build_locks(entries: list[Path]) -> list[Path]:
    # The build's own lock, its subsets' locks, and the locks of the shards in a `.parts` folder.
    found = [e for e in entries if e.name.endswith(".lock")]
    for e in entries:
        if e.is_dir() and not e.is_symlink():
            found += sorted(c for c in e.iterdir() if c.name.endswith(".lock"))
    return found


def unneeded_builds(folders: Iterable[tuple[Path, str, re.Pattern]], needed: Iterable[Path], cutoff: float | None
                    ) -> tuple[list[Removal], list[Path]]:
    """The builds in `folders` ((folder, what its entries are, the pattern of a build's name)) that no
    path of `needed` names: an entry of `needed` keeps its build (with its companions, see build_stem),
    and a needed folder keeps everything under it. Entries whose build name does not match are never
    considered (a --cache pointed at a folder that holds other things lists none of them). With `cutoff`
    (a time), only builds last written before it. Returns (what may go, the builds kept because their
    lock is held: being built, or read under the lock, right now)."""
    needed = [Path(p).resolve() for p in needed]
    keep_builds = {(p.parent, build_stem(p.name)) for p in needed}
    removals: list[Removal] = []
    building: list[Path] = []
    for folder, what, named in folders:
        if not folder.is_dir():
            continue
        real = folder.resolve()
        if any(p == real or p in real.parents for p in needed):
            continue
        groups: dict[str, list[Path]] = {}
        for entry in sorted(folder.iterdir()):
            # Not `downloads/` either: a download's source files, which no stage names and a decode reads.
            if named.fullmatch(build_stem(entry.name)):
                groups.setdefault(build_stem(entry.name), []).append(entry)
        for stem, entries in groups.items():
            if (real, stem) in keep_builds:
                continue
            if cutoff is not None and max(_newest_mtime(e) for e in entries) > cutoff:
                continue
            locks = _build_locks(entries)
            if any(lock_held(lock) for lock in locks):
                building.append(folder / stem)
                continue
            # The build first, its lock files last: a lock goes only once what it guards is gone.
            ordered = sorted(entries, key=lambda e: (e.name.endswith(".lock"), e.name.startswith("."), e.name))
            removals.append(Removal([(e, tree_bytes(e)) for e in ordered], what, locks))
    return removals, building


def prune_plan(store: Store, older_than_days: float | None = None, artifacts: Path | None = None,
               data_cache: Path | None = None, needed: Iterable[Path] | None = None
               ) -> tuple[list[Removal], list[Path]]:
    """What `prune` would delete, nothing that a pending point can still need; and the builds it keeps
    because their lock is held (a build in progress).

    - A completed run (its done marker) is skipped by every later job, so its checkpoints are not
      needed once its weights (backbone.pt) are there; without backbone.pt (a run from before it was
      written) only the checkpoint before the last goes.
    - A failed, diverged or pruned run is retried from its checkpoint by the next sweep: its checkpoints
      go only with --older-than (the user says: not anymore).
    - A running, requeued or lost run's checkpoint never goes (it resumes from it).
    - `checkpoint.pt.unreadable` (set aside, never read again) goes in any run that is not running.
    - Artifacts (`<artifacts>/<kind>/<hash>`, default `<db>.artifacts`) and data cache files (`data_cache`,
      default `$HARNESS_CACHE/datasets`) only when `needed` is given: the paths the points of every sweep
      the lab still runs need (harness/jobs/needed.py: each point's stage keys; `prune --keep`). Then each
      one that none of them names goes, with its lock and partial builds; never one whose lock is held,
      nor a download's source files (`downloads/`), nor anything not named as harness names its builds.
      Without `needed` none goes: whether a configured sweep still uses one is not something the store
      can tell.
    With --older-than, only runs that finished more than that many days ago, and only artifacts and
    cache files last written more than that many days ago, are considered.
    """
    plan: list[Removal] = []
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    for folder in sorted(p for p in store.runs.iterdir() if p.is_dir()) if store.runs.is_dir() else []:
        status, finished = run_state(folder)
        if status in ("running", "requeued", "lost", "unknown"):
            continue
        if cutoff is not None:
            when = datetime.fromisoformat(finished).replace(tzinfo=timezone.utc).timestamp() if finished else None
            if when is None or when > cutoff:
                continue
        found = [folder / "checkpoint.pt.unreadable"]
        if status == "completed":
            found += [folder / CHECKPOINTS[1]] + ([folder / CHECKPOINTS[0]] if (folder / WEIGHTS_FILE).exists() else [])
            why = "completed run: its weights are in backbone.pt"
        elif cutoff is not None:
            found += [folder / name for name in CHECKPOINTS]
            why = f"{status} run, finished more than {older_than_days:g} days ago"
        else:
            why = ""
        for path in found:
            if path.exists():
                plan.append(Removal([(path, tree_bytes(path))], why if path.name != "checkpoint.pt.unreadable"
                                    else "unreadable checkpoint set aside, never read again"))
    if needed is None:
        return plan, []
    artifacts = artifacts or default_artifacts(store)
    folders = [(kind, f"artifact ({kind.name}) no kept point needs", ARTIFACT_NAME) for kind in
               (sorted(p for p in artifacts.iterdir() if p.is_dir()) if artifacts.is_dir() else [])]
    folders.append((data_cache or default_data_cache(), "data cache file no kept point needs", CACHE_NAME))
    builds, building = unneeded_builds(folders, needed, cutoff)
    return plan + builds, building


SOURCES_SUFFIX = ".sources"  # <db>.sources: the run folders' roots merged into a store, one a line


def merged_sources(store: Store) -> list[Path]:
    """The other run folders' roots whose rows were merged into `store` (their weights stay there)."""
    path = store.path.with_name(store.path.name + SOURCES_SUFFIX)
    return [Path(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def source_runs(source: Path) -> Path:
    """The run folders' root of a merge source: a store's database file (its <db>.runs) or that root itself."""
    source = Path(source).expanduser().absolute()
    if source.is_dir() and not source.name.endswith(".spool"):
        return source
    runs = source.with_name(source.name + ".runs")
    if not runs.is_dir():
        raise FileNotFoundError(f"{source}: neither a run folders' root nor a store with one beside it ({runs})")
    return runs


def merge(out: Store, sources: list[Path], timeout: float = 120.0) -> tuple[int, int]:
    """Read every run folder's rows of `sources` into `out`'s database; returns (run folders, files read).

    Only rows: the folders (weights, checkpoints) stay where they are and are referenced from
    `<out>.sources`. Rows keep their run ids and are upserts keyed by each table's primary key, so a
    row present in two sources, or a source merged twice, is held once.
    """
    roots = [source_runs(s) for s in sources]  # every source checked before anything is written
    with out.connect(timeout=timeout) as con:
        folders = sorted(p for root in roots for p in root.iterdir() if p.is_dir())
        files = out._load_run_folders(con, folders)
    known = merged_sources(out)
    new = [r for r in dict.fromkeys(roots) if r not in known and r != out.runs]
    if new:
        write_text_atomic(out.path.with_name(out.path.name + SOURCES_SUFFIX),
                          "".join(f"{r}\n" for r in known + new))
    return len(folders), files


def _du(store: Store, artifacts: Path | None, cache: Path | None) -> None:
    entries = disk_usage(store, artifacts, cache)
    for e in entries:
        print(f"{e['bytes']:>14,d}  {_size(e['bytes']):>9}  {e['kind']:<10}  {e['path']}"
              + (f"  ({e['detail']})" if e["detail"] else ""))
    totals: dict[str, int] = {}
    for e in entries:
        totals[e["kind"]] = totals.get(e["kind"], 0) + e["bytes"]
    for kind, n in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"total {kind}: {n:,d} bytes ({_size(n)})")
    print(f"total: {sum(totals.values()):,d} bytes ({_size(sum(totals.values()))})")


class KeepRefused(Exception):
    """A --keep that does not compose: its one line, ready to print; nothing was deleted."""


def needed_by(keeps: list[str], db: Path, artifacts: Path | None = None, cache: Path | None = None
              ) -> tuple[list[Path], list[dict[str, Any]]]:
    """What the points of the sweeps `keeps` (each `python -m harness OVERRIDES -m`'s overrides) need on
    disk, composed by harness/jobs/needed.py in a process of its own: composing a sweep imports Hydra's
    config code and the add-ons (torch), which this module, read by the leaderboard, never imports.
    Returns (the paths, per --keep its points and paths); raises KeepRefused."""
    import subprocess

    args = [f"--db={db}"] + [f"--{k}={v}" for k, v in (("artifacts", artifacts), ("cache", cache)) if v is not None]
    env = dict(os.environ)
    # The same code as this process: its package's root first (the child may start elsewhere on sys.path).
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "harness.jobs.needed", *args, *(f"--keep={k}" for k in keeps)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        raise KeepRefused(errors[-1] if errors else f"error: the --keep sweeps could not be composed: "
                          f"{lines[-1] if lines else f'exit {proc.returncode}'}; nothing was deleted")
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    return [Path(p) for p in found["needed"]], found["keeps"]


def _delete(removal: Removal) -> bool:
    """Delete what `removal` names, holding its locks; False (nothing deleted) when one is held now."""
    import shutil

    held = []
    try:
        for path in removal.locks:
            lock = try_lock(path)
            if lock is None:
                return False
            held.append(lock)
        for path, _ in removal.paths:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return True
    finally:
        for lock in held:
            lock.release()


def _prune(store: Store, older_than: float | None, apply: bool, artifacts: Path | None = None,
           cache: Path | None = None, keeps: list[str] | None = None) -> int:
    needed = None
    if keeps:
        try:  # the roots as given: a sweep's own artifacts.dir or dataset.cache_dir counts unless one is
            needed, per_keep = needed_by(keeps, store.path, artifacts, cache)
        except KeepRefused as e:
            print(e, file=sys.stderr)
            return 2
        for k in per_keep:
            print(f"kept for --keep {k['keep']!r}: what its {k['points']} point(s) need, "
                  f"{len(k['needed'])} artifact(s) and data cache file(s)")
    artifacts, cache = artifacts or default_artifacts(store), cache or default_data_cache()
    plan, building = prune_plan(store, older_than, artifacts, cache, needed)
    if needed is None:
        print(f"kept every artifact (under {artifacts}) and data cache file (under {cache}): whether a sweep still "
              "uses one is not something the store knows; name each sweep the lab still runs as --keep "
              "'OVERRIDES' (repeatable) and prune frees the ones none of their points needs")
    for path in building:
        print(f"kept {path}: its lock is held (being built or read right now)")
    freed, count = 0, 0
    for removal in plan:
        if apply and not _delete(removal):
            print(f"kept {removal.paths[0][0]}: its lock was taken since the plan was made (being built now)")
            continue
        for path, n in removal.paths:
            print(f"{'deleted' if apply else 'would delete'} {path} ({n:,d} bytes): {removal.why}")
        freed, count = freed + removal.bytes, count + len(removal.paths)
    print(f"{'freed' if apply else 'would free'} {freed:,d} bytes ({_size(freed)}) in {count} path(s)"
          + ("" if apply else "; nothing was deleted: add --apply to delete them"))
    return 0


def quiet_broken_pipe(main: Callable[[], int | None]) -> int | None:
    """Run a command's `main`; when its reader went away (`... | head`), end quietly instead of with a
    BrokenPipeError traceback (the reader has what it wanted)."""
    try:
        result = main()
        sys.stdout.flush()  # inside: a write still buffered would fail at exit, outside this guard
        return result
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that flush cannot fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.store",
                                     description="Ingest the spool, rebuild the database from the run folders, "
                                     "see and free disk space, merge stores.")
    commands = parser.add_subparsers(dest="command", required=True)
    texts = {
        "ingest": "move spooled rows (and finished runs the database lacks) into the database",
        "rebuild": "re-read every run folder's rows into the database (e.g. after deleting it)",
        "du": "bytes per run folder, artifact and data cache file, largest first, with totals",
        "prune": "delete what no pending point needs (completed runs' checkpoints; with --older-than also "
                 "failed runs'; with --keep the artifacts and data cache files no point of the kept sweeps "
                 "needs); a dry run unless --apply. Never a running or lost run's checkpoint, never an artifact "
                 "or data cache file being built, and without --keep never an artifact or data cache file",
        "merge": "read the rows of other stores' run folders into --db (run ids kept, identical rows once; "
                 "nothing but rows is copied)",
    }
    for name, text in texts.items():
        cmd = commands.add_parser(name, help=text, description=text)
        cmd.add_argument("--db", type=Path, default=Path("outputs/results.duckdb"))
        cmd.add_argument("--runs", type=Path, default=None, help="the run folders' root (store.runs_dir); "
                         "default <db>.runs")
        cmd.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for another holder")
        if name in ("du", "prune"):
            cmd.add_argument("--artifacts", type=Path, default=None, help="artifacts.dir; default <db>.artifacts")
            cmd.add_argument("--cache", type=Path, default=None,
                             help="the decoded-dataset cache; default $HARNESS_CACHE/datasets, "
                             "else ~/.cache/harness/datasets")
        if name == "prune":
            cmd.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                             help="only runs that finished more than DAYS ago; also frees failed, diverged and "
                             "pruned runs' checkpoints (which a rerun would resume from)")
            cmd.add_argument("--apply", action="store_true", help="delete; without it only list")
            cmd.add_argument("--keep", action="append", default=None, metavar="'OVERRIDES'",
                             help="a sweep the lab still runs, quoted, as `python -m harness OVERRIDES -m` takes "
                             "it (e.g. --keep 'sweep=scorecl_all dataset=cifar10'); repeatable. With at least one, "
                             "the artifacts and data cache files that no point of these sweeps needs are deleted "
                             "too (with --older-than: those last written more than DAYS ago); without, none is")
        if name == "merge":
            cmd.add_argument("sources", nargs="+", type=Path, metavar="SRC_DB_OR_RUNS_DIR")
    args = parser.parse_args(argv)
    if getattr(args, "older_than", None) is not None and args.older_than < 0:
        print(f"error: --older-than = {args.older_than:g}: expected a number of days >= 0", file=sys.stderr)
        return 2
    store = Store(args.db, args.runs)
    try:
        if args.command == "ingest":
            before, rejected = store.pending(), store.rejected()
            store.ingest(args.timeout)
            print(f"ingested {before - store.pending() - (store.rejected() - rejected)} spool file(s) "
                  f"into {store.path}")
        elif args.command == "rebuild":
            print(f"read {store.rebuild(args.timeout)} file(s) from the run folders under {store.runs} "
                  f"into {store.path}")
        elif args.command == "du":
            _du(store, args.artifacts, args.cache)
        elif args.command == "prune":
            if _prune(store, args.older_than, args.apply, args.artifacts, args.cache, args.keep):
                return 2
        else:
            folders, files = merge(store, args.sources, args.timeout)
            print(f"merged {folders} run folder(s) ({files} row file(s)) into {store.path}; their folders stay "
                  f"where they are (listed in {store.path.name}{SOURCES_SUFFIX})")
    except StoreBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:  # a merge source that is not there
        print(f"error: {e}", file=sys.stderr)
        return 2
    if store.rejected():
        print(f"{store.rejected()} spool file(s) rejected: see {store.rejected_dir} (each with a .why line)")
    return 0


if __name__ == "__main__":
    sys.exit(quiet_broken_pipe(main))
