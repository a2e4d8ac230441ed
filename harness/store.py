"""The results store: one DuckDB file that many jobs feed at once without losing a row.

DuckDB allows one writer per file, and the POSIX locks it relies on are not always honoured by
cluster file systems. So jobs never write the DuckDB file directly: every write is a small
JSON-lines file published atomically (write to a temporary name, then ``os.replace``) into a
spool folder beside the database. Anyone who reads the store first *ingests* the spool: under a
lock file it copies pending files into the database in one transaction, records their names in
the same transaction, and only then deletes them, so a crash at any point neither loses nor
duplicates a row. Rows are upserts keyed by each table's primary key, which is what makes a job
that resumes after a kill end with exactly one metrics row per epoch.

This module must not import torch: the leaderboard reads the store on machines without it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
from filelock import FileLock, Timeout

from harness.atomic import atomic_file

# table -> (columns with DuckDB types, primary key). Columns may be added over time: opening a
# store adds missing ones, so older databases keep working.
TABLES: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "runs": (
        {
            "run_id": "VARCHAR",
            "run_key": "VARCHAR",
            "name": "VARCHAR",
            "status": "VARCHAR",  # running | completed | failed | diverged | pruned | requeued
            "method": "VARCHAR",
            "dataset": "VARCHAR",
            "backbone": "VARCHAR",
            "weighting": "VARCHAR",
            "positives": "VARCHAR",
            "synthetic_ratio": "DOUBLE",
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
        },
        ("run_id",),
    ),
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


class Store:
    """A DuckDB results file plus the spool folder that jobs write into."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser().absolute()
        self.spool = self.path.with_name(self.path.name + ".spool")
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    # ------------------------------------------------------------------ writing (any process)
    def write(self, table: str, rows: Iterable[dict[str, Any]]) -> None:
        """Publish rows for `table` atomically; they reach the database at the next ingest."""
        columns, _ = TABLES[table]
        rows = list(rows)
        if not rows:
            return
        unknown = set().union(*rows) - set(columns)
        if unknown:
            raise ValueError(f"store.write({table!r}): unknown columns {sorted(unknown)}")
        folder = self.spool / table
        folder.mkdir(parents=True, exist_ok=True)
        # The name orders files by time, so that a later status of the same run wins.
        stem = f"{time.time_ns():020d}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with atomic_file(folder / f"{stem}.jsonl", "w") as f:
            for order, row in enumerate(rows):
                f.write(json.dumps({**{k: _jsonable(v) for k, v in row.items()}, "_order": order}) + "\n")

    def pending(self) -> int:
        """How many spool files wait to be ingested."""
        return sum(1 for _ in self.spool.glob("*/*.jsonl")) if self.spool.exists() else 0

    # ------------------------------------------------------------------ the database (one writer)
    @contextmanager
    def connect(self, timeout: float = 120.0) -> Iterator[duckdb.DuckDBPyConnection]:
        """Ingest the spool, then yield a connection to the up-to-date database.

        The connection holds the database exclusively: keep it short.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(self.lock_path), timeout=timeout):
                con = self._open(deadline=time.monotonic() + timeout)
                try:
                    self._ensure_schema(con)
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
                if "lock" not in str(e).lower() or time.monotonic() > deadline:
                    if "lock" in str(e).lower():
                        raise StoreBusy(f"store {self.path}: {e}") from e
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    @staticmethod
    def _ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
        for table, (columns, key) in TABLES.items():
            cols = ", ".join(f'"{c}" {t}' for c, t in columns.items())
            con.execute(f'CREATE TABLE IF NOT EXISTS "{table}" ({cols}, PRIMARY KEY ({", ".join(key)}))')
            for c, t in columns.items():
                con.execute(f'ALTER TABLE "{table}" ADD COLUMN IF NOT EXISTS "{c}" {t}')
        con.execute("CREATE TABLE IF NOT EXISTS _ingested (file VARCHAR PRIMARY KEY)")

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
        batches = {t: files for t, files in batches.items() if files}
        if not batches:
            return 0
        con.execute("BEGIN TRANSACTION")
        try:
            for table, files in batches.items():
                columns, key = TABLES[table]
                spec = {**columns, "_order": "INTEGER"}
                spec_sql = "{" + ", ".join(f"'{c}': '{t}'" for c, t in spec.items()) + "}"
                names = ", ".join(f'"{c}"' for c in columns)
                # Within one ingest the newest row per key wins (file names sort by time).
                con.execute(
                    f"""INSERT OR REPLACE INTO "{table}" ({names})
                    SELECT {names} FROM (
                        SELECT *, row_number() OVER (
                            PARTITION BY {", ".join(f'"{k}"' for k in key)}
                            ORDER BY filename DESC, _order DESC) AS _rank
                        FROM read_json(?, format='newline_delimited', columns={spec_sql}, filename=true)
                    ) WHERE _rank = 1""",
                    [files],
                )
                con.executemany("INSERT INTO _ingested VALUES (?)", [[f] for f in files])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        count = 0
        for files in batches.values():
            for f in files:
                Path(f).unlink(missing_ok=True)
                count += 1
        con.execute("DELETE FROM _ingested")
        return count

    def ingest(self, timeout: float = 120.0) -> None:
        """Move everything spooled into the database now."""
        with self.connect(timeout=timeout):
            pass

    # ------------------------------------------------------------------ reading
    def query(self, sql: str, params: list | None = None) -> list[dict[str, Any]]:
        """Run one query on the up-to-date store and return its rows as dicts."""
        with self.connect() as con:
            cur = con.execute(sql, params or [])
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def completed(self, run_key: str) -> dict[str, Any] | None:
        """The newest completed run of `run_key`, or None."""
        rows = self.query(
            "SELECT * FROM runs WHERE run_key = ? AND status = 'completed' ORDER BY finished_at DESC LIMIT 1",
            [run_key],
        )
        return rows[0] if rows else None
