"""`python -m leaderboard show`: the store as a text table, one row per configuration or per run.

By default one row per configuration (the config without the seed; see leaderboard.data), commit,
dataset and protocol: the test top-1 as mean ± std over its seeds and n, the newest run per seed.
A configuration run at two commits gets two rows, so a change never hides in a mean. `--runs` lists
every run with its evaluations instead (with `--all` also running, lost, failed and diverged ones).
Filters: --dataset and --method match exactly, --protocol and --commit match a prefix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.store import Store
from leaderboard import data
from leaderboard.text import format_table

RUNS_SQL = f"""
SELECT r.method, r.dataset, r.backbone, coalesce(r.weighting_variant, r.weighting) AS weighting,
       coalesce(r.positives_variant, r.positives) AS positives, r.seed, r.epochs, r.status,
       e.protocol, e.top1, e.top5, r.run_key,
       coalesce(r.git_commit, 'unknown') || CASE WHEN r.git_dirty THEN '{data.DIRTY}' ELSE '' END AS git_commit
FROM runs r LEFT JOIN evals e ON e.run_id = r.run_id AND e.split = 'test'
WHERE (? OR r.status = 'completed') {{where}}
ORDER BY r.dataset, e.protocol, e.top1 DESC NULLS LAST, r.method
"""
RUNS_COLUMNS = ["method", "dataset", "backbone", "weighting", "positives", "seed", "epochs", "status", "protocol",
                "top1", "top5", "run_key", "commit"]

CONFIGS_SQL = """
SELECT dataset, protocol, method, backbone, weighting, positives, synthetic_ratio, epochs, config_key, git_commit,
       avg(top1) AS mean, stddev_samp(top1) AS std, count(*) AS n, avg(top5) AS top5
FROM (SELECT *, row_number() OVER (PARTITION BY config_key, git_commit, protocol, seed
                                   ORDER BY finished_at DESC NULLS LAST, run_id) AS newest
      FROM all_seeds WHERE true {where})
WHERE newest = 1
GROUP BY ALL ORDER BY dataset, protocol, mean DESC, method
"""
CONFIG_COLUMNS = ["dataset", "protocol", "method", "backbone", "weighting", "positives", "ratio", "epochs",
                  "top1 mean ± std", "n", "top5", "commit", "config"]


def _filters(prefix: str, dataset: str | None, method: str | None, protocol: str | None,
             commit: str | None) -> tuple[str, list[Any]]:
    """SQL conditions (each starting with AND) and their parameters; `prefix` qualifies the columns."""
    where, params = [], []
    for column, value, op in (("dataset", dataset, "="), ("method", method, "="),
                              ("protocol", protocol, "prefix"), ("git_commit", commit, "prefix")):
        if value is None:
            continue
        table = "e." if prefix and column == "protocol" else prefix
        where.append(f"AND starts_with({table}{column}, ?)" if op == "prefix" else f"AND {table}{column} = ?")
        params.append(value)
    return " ".join(where), params


def show(db: Path, runs: bool = False, include_all: bool = False, dataset: str | None = None,
         method: str | None = None, protocol: str | None = None, commit: str | None = None) -> str:
    """The text `show` prints."""
    if not db.exists() and not Store(db).pending():
        raise SystemExit(f"error: --db = {db}: no such store (run a job first, or pass the store.path it used)")
    store = Store(db)
    with store.connect() as con:
        if runs:
            where, params = _filters("r.", dataset, method, protocol, None)
            sql = RUNS_SQL.format(where=where)
            if commit is not None:  # the commit column is built (dirty mark): filter on it outside
                sql, params = f"SELECT * FROM ({sql}) WHERE starts_with(git_commit, ?)", [*params, commit]
            found = data.rows(con, sql, [include_all, *params])
            table = [{**r, "commit": data.short_commit(r["git_commit"])} for r in found]
            columns = RUNS_COLUMNS
        else:
            data.prepare(con)
            where, params = _filters("", dataset, method, protocol, commit)
            found = data.rows(con, CONFIGS_SQL.format(where=where), params)
            table = [{**r, "ratio": r["synthetic_ratio"], "commit": data.short_commit(r["git_commit"]),
                      "config": r["config_key"][:8],
                      "top1 mean ± std": f"{r['mean']:.2f} ± {'–' if r['std'] is None else format(r['std'], '.2f')}"}
                     for r in found]
            columns = CONFIG_COLUMNS
    filtered = any(v is not None for v in (dataset, method, protocol, commit))
    if not table:
        text = "no completed runs" + (" match the filters" if filtered else " yet")
        if runs and not include_all:
            text += " (--all lists running, lost and failed ones)"
    else:
        text = format_table(table, columns)
        if not runs:
            text += (f"\n{len(table)} configuration(s); top-1 on the test split, mean ± sample std over seeds "
                     "(– with one seed); `--runs` lists every run")
    return text + rejected_note(store)


def rejected_note(store: Store) -> str:
    """A line on the spool files the store refused, or nothing when there are none."""
    n = store.rejected()
    return f"\n{n} spool file(s) rejected (not ingested): see {store.rejected_dir}, each with a .why line" if n else ""
