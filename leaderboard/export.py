"""`python -m leaderboard export`: the store's runs, metrics and evals as CSV or Parquet files.

One file per table in the output folder (runs.csv, metrics.csv, evals.csv, or .parquet), each
written by DuckDB's COPY to a temporary name and then renamed, so a reader never sees half a file.
runs gets `config_key` (the configuration: the config without seed and launch settings, see
leaderboard.data) for completed runs, to group seeds. Epochs count from 1 in every table.
"""

from __future__ import annotations

import os
from pathlib import Path

from harness.atomic import fsync_dir, temp_name
from harness.store import Store
from leaderboard import data

FORMATS = {"csv": "(FORMAT csv, HEADER true)", "parquet": "(FORMAT parquet)"}
TABLES = {
    "runs": "SELECT r.*, i.config_key FROM runs r LEFT JOIN run_ident i USING (run_id) ORDER BY r.started_at, r.run_id",
    "metrics": "SELECT * FROM metrics ORDER BY run_id, epoch, name",
    "evals": "SELECT * FROM evals ORDER BY run_id, protocol, split",
}


def export(db: Path, out: Path, fmt: str) -> list[tuple[Path, int]]:
    """Write every table of TABLES to `out`/<table>.<fmt>; returns (file, rows) per table."""
    if fmt not in FORMATS:
        raise SystemExit(f"error: --format = {fmt!r} is not allowed: expected one of {', '.join(FORMATS)}")
    if not db.exists() and not Store(db).pending():
        raise SystemExit(f"error: --db = {db}: no such store (run a job first, or pass the store.path it used)")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with Store(db).connect() as con:
        data.prepare(con)
        for table, sql in TABLES.items():
            target = out / f"{table}.{fmt}"
            temp = temp_name(target)
            try:
                quoted = str(temp).replace("'", "''")
                con.execute(f"COPY ({sql}) TO '{quoted}' {FORMATS[fmt]}")
                os.replace(temp, target)
            finally:
                temp.unlink(missing_ok=True)
            written.append((target, con.execute(f"SELECT count(*) FROM ({sql})").fetchone()[0]))
    fsync_dir(out)
    return written
