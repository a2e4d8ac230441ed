"""What the page and the regression report read from the store, aggregated in DuckDB.

A *configuration* is everything that can change a run's result except the seed: the resolved
config without `seed` and without the launch/path/logging settings that `harness.jobs.config` already
keeps out of the run key (NOT_IN_RUN_KEY). Its `config_key` is a hash of that, so the runs of one
configuration with different seeds, at different commits or on different machines share it. The
same hash with the `weighting` subtree (or the `positives` subtree) also removed pairs a ScoreCL
run with the same run without ScoreCL (a CLSP run with the same run at ratio 0).

A *setting* is what a ranking row stands for: method, backbone, weighting, positives, synthetic
ratio, epochs on one dataset and protocol; the row shows the setting's best configuration (highest
mean over seeds) and the hyper-parameters that made it best.

Python touches one row per run (to hash its config; DuckDB cannot drop nested JSON keys) and one
row per aggregate; every per-epoch or per-seed row stays in SQL.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import duckdb

from harness.store import NOT_IN_RUN_KEY

NOT_IDENTITY = (*NOT_IN_RUN_KEY, "seed", "sweep_name")

# Columns a setting is made of (one ranking row per setting and dataset x protocol).
SETTING = ("method", "backbone", "weighting", "positives", "synthetic_ratio", "epochs")
# An add-on is shown by the config option chosen (scorecl_tiny), not its YAML's name (scorecl):
# runs from before the harness recorded it fall back to the name.
SETTING_SQL = {"weighting": "coalesce(r.weighting_variant, r.weighting) AS weighting",
               "positives": "coalesce(r.positives_variant, r.positives) AS positives"}
# A run from a tree with uncommitted changes did not run its commit's code: it counts as a commit of
# its own, `<hash>+dirty`, so it never mixes with (or stands in for) the clean commit's runs.
DIRTY = "+dirty"


def short_commit(commit: str) -> str:
    """The first 10 characters of a hash, keeping the dirty mark."""
    return commit.removesuffix(DIRTY)[:10] + (DIRTY if commit.endswith(DIRTY) else "")


def _drop(tree: dict, dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head in tree:
        if not rest:
            del tree[head]
        elif isinstance(tree[head], dict):
            _drop(tree[head], rest)


def _hash(parts: dict[str, str], leave_out: str = "") -> str:
    blob = ",".join(f"{k}={v}" for k, v in sorted(parts.items()) if k != leave_out)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}"))
    return out


def primary_protocol(config_json: str | None) -> str | None:
    """The protocol a run's objective and per-epoch k-NN curve use: the first of its eval.knn settings."""
    try:
        knn = flatten(json.loads(config_json or "{}")).get("eval.knn")
    except json.JSONDecodeError:
        return None
    if not isinstance(knn, list) or not knn or not isinstance(knn[0], dict):
        return None
    try:  # the name harness.evaluate.knn_protocol gives it
        return f"knn:cosine:k={int(knn[0]['k'])}:T={float(knn[0]['T']):g}"
    except (KeyError, TypeError, ValueError):
        return None


def identities(config_json: str | None) -> tuple[str, str, str, str]:
    """(config_key, key without weighting, key without positives, identity config as JSON) of one run."""
    try:
        tree = json.loads(config_json) if config_json else {}
    except json.JSONDecodeError:
        tree = {"unparsable_config": config_json}
    if not isinstance(tree, dict):
        tree = {"config": tree}
    for dotted in NOT_IDENTITY:
        _drop(tree, dotted)
    # Each top-level group is serialised once; the three keys hash the same pieces with one left out.
    parts = {k: json.dumps(v, sort_keys=True, separators=(",", ":"), default=str) for k, v in tree.items()}
    identity = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in sorted(parts.items())) + "}"
    return _hash(parts), _hash(parts, "weighting"), _hash(parts, "positives"), identity


def prepare(con: duckdb.DuckDBPyConnection) -> None:
    """Create the temp tables every query below reads: run_ident and per_seed."""
    rows = con.execute("SELECT run_id, config FROM runs WHERE status = 'completed'").fetchall()
    ids, keys, wkeys, pkeys, flats = [], [], [], [], []
    cache: dict[str | None, tuple[str, str, str, str]] = {}
    for run_id, config in rows:
        if config not in cache:
            cache[config] = identities(config)
        k, w, p, f = cache[config]
        ids.append(run_id)
        keys.append(k)
        wkeys.append(w)
        pkeys.append(p)
        flats.append(f)
    # Lists go in as LIST parameters: one statement, no per-row INSERT.
    con.execute(
        """CREATE OR REPLACE TEMP TABLE run_ident AS
        SELECT unnest(?::VARCHAR[]) AS run_id, unnest(?::VARCHAR[]) AS config_key,
               unnest(?::VARCHAR[]) AS weight_key, unnest(?::VARCHAR[]) AS pos_key,
               unnest(?::VARCHAR[]) AS identity""",
        [ids, keys, wkeys, pkeys, flats],
    )
    # One value per configuration, seed and protocol: the newest completed run's test top-1.
    con.execute(f"""CREATE OR REPLACE TEMP TABLE all_seeds AS
        SELECT r.dataset, e.protocol, i.config_key, i.weight_key, i.pos_key, r.seed, e.top1, e.top5,
               r.run_id, r.name, {", ".join(SETTING_SQL.get(c, "r." + c) for c in SETTING)},
               r.batch_size, r.lr, r.gpu_hours,
               -- Cost of all the run's attempts, CPU runs included (a store from before wall_seconds was
               -- recorded: the last attempt's, from when it started).
               coalesce(r.wall_seconds, epoch(r.finished_at - r.started_at)) / 3600.0 AS wall_hours,
               coalesce(r.wall_seconds, epoch(r.finished_at - r.started_at)) / 3600.0
                   * coalesce(r.world_size, 1) AS device_hours,
               coalesce(r.device_name, 'unknown') AS device_name,
               coalesce(r.git_commit, 'unknown') || CASE WHEN r.git_dirty THEN '{DIRTY}' ELSE '' END AS git_commit,
               r.git_dirty, r.finished_at
        FROM evals e JOIN runs r ON r.run_id = e.run_id JOIN run_ident i ON i.run_id = e.run_id
        WHERE r.status = 'completed' AND e.split = 'test' AND e.top1 IS NOT NULL""")
    con.execute("""CREATE OR REPLACE TEMP TABLE per_seed AS
        SELECT * EXCLUDE (newest) FROM (
            SELECT *, row_number() OVER (PARTITION BY config_key, seed, protocol
                                         ORDER BY finished_at DESC NULLS LAST, run_id) AS newest
            FROM all_seeds) WHERE newest = 1""")


def rows(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> list[dict[str, Any]]:
    cur = con.execute(sql, params or [])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def configurations(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """One row per dataset x protocol x configuration: mean, std, n over seeds, and its setting's rank."""
    setting = ", ".join(SETTING)
    return rows(con, f"""
        WITH agg AS (
            SELECT dataset, protocol, config_key, {setting},
                   any_value(batch_size) AS batch_size, any_value(lr) AS lr,
                   avg(top1) AS mean, stddev_samp(top1) AS std, count(*) AS n,
                   list(top1 ORDER BY seed) AS values, list(seed ORDER BY seed) AS seeds,
                   sum(gpu_hours) AS gpu_hours, sum(wall_hours) AS wall_hours, sum(device_hours) AS device_hours,
                   string_agg(DISTINCT device_name, ' | ' ORDER BY device_name) AS devices,
                   string_agg(DISTINCT name, ' | ' ORDER BY name) AS names,
                   string_agg(DISTINCT git_commit, ' ' ORDER BY git_commit) AS commits
            FROM per_seed GROUP BY ALL)
        SELECT agg.*, i.identity,
               row_number() OVER (PARTITION BY dataset, protocol, {setting} ORDER BY mean DESC, n DESC, config_key)
                   AS rank_in_setting
        FROM agg JOIN (SELECT config_key, any_value(identity) AS identity FROM run_ident GROUP BY 1) i
             USING (config_key)
        ORDER BY dataset, protocol, mean DESC""")


def transfer(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Transfer probes (evals split `transfer:<dataset>`, harness/jobs/transfer.py): one row per dataset
    trained on x configuration x transfer dataset x protocol, mean/std/n over seeds (newest run per seed).
    `metric` says what the score is (top1, or the ssl-transfer metric of a logreg row: mean_per_class, map11)."""
    return rows(con, """
        WITH newest AS (
            SELECT r.dataset AS trained_on, r.method, r.backbone, r.epochs, i.config_key, r.seed,
                   coalesce(e.dataset, regexp_replace(e.split, '^transfer:', '')) AS transfer, e.protocol, e.top1,
                   coalesce(e.metric, 'top1') AS metric
            FROM evals e JOIN runs r ON r.run_id = e.run_id JOIN run_ident i ON i.run_id = e.run_id
            WHERE r.status = 'completed' AND e.split LIKE 'transfer:%' AND e.top1 IS NOT NULL
            QUALIFY row_number() OVER (PARTITION BY i.config_key, r.seed, e.split, e.protocol
                                       ORDER BY r.finished_at DESC NULLS LAST, r.run_id) = 1)
        SELECT trained_on, method, backbone, epochs, config_key, transfer, protocol, metric,
               avg(top1) AS mean, stddev_samp(top1) AS std, count(*) AS n
        FROM newest GROUP BY ALL
        ORDER BY transfer, protocol, trained_on, mean DESC""")


def effects(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Paired differences over seeds: each weighting vs none, each synthetic ratio r > 0 vs 0."""
    pairs = []
    for addon, key, is_base, is_treated, what in (
        ("weighting", "weight_key", "b.weighting = 'none'", "t.weighting <> 'none'", "t.weighting"),
        ("positives", "pos_key", "coalesce(b.synthetic_ratio, 0) = 0",
         "coalesce(t.synthetic_ratio, 0) > 0", "t.positives || ' r=' || t.synthetic_ratio"),
    ):
        pairs.append(f"""
            SELECT '{addon}' AS addon, {what} AS treatment, t.dataset, t.protocol, t.config_key,
                   t.method, t.backbone, t.weighting, t.positives, t.synthetic_ratio, t.epochs,
                   b.config_key AS base_key, t.seed, t.top1 - b.top1 AS diff
            FROM per_seed t JOIN per_seed b
              ON b.{key} = t.{key} AND b.protocol = t.protocol AND b.seed = t.seed AND b.dataset = t.dataset
            WHERE {is_base} AND {is_treated}""")
    # Per treated configuration, then one row per treated setting: the pair whose baseline configuration
    # scores best (the effect at the plain method's best hyper-parameters), with the mean effect over
    # all the setting's paired configurations beside it.
    return rows(con, f"""
        WITH per_config AS (
            SELECT addon, treatment, dataset, protocol, config_key, base_key, method, backbone, epochs,
                   weighting, positives, synthetic_ratio,
                   avg(diff) AS mean, stddev_samp(diff) AS std, count(*) AS n, list(seed ORDER BY seed) AS seeds
            FROM ({" UNION ALL ".join(pairs)}) GROUP BY ALL),
        base AS (SELECT config_key, protocol, avg(top1) AS base_mean FROM per_seed GROUP BY ALL),
        ranked AS (
            SELECT p.*, b.base_mean,
                   row_number() OVER w AS k, count(*) OVER w AS configs, avg(p.mean) OVER w AS mean_over_configs
            FROM per_config p JOIN base b ON b.config_key = p.base_key AND b.protocol = p.protocol
            WINDOW w AS (PARTITION BY p.addon, p.treatment, p.dataset, p.protocol, p.method, p.backbone, p.epochs,
                                      p.weighting, p.positives, p.synthetic_ratio
                         ORDER BY b.base_mean DESC, p.n DESC, p.config_key
                         ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING))
        SELECT * EXCLUDE (k) FROM ranked WHERE k = 1
        ORDER BY dataset, protocol, addon, mean DESC""")


def commit_series(con: duckdb.DuckDBPyConnection, top: int = 10) -> list[dict[str, Any]]:
    """Per configuration and commit: mean/std/n over seeds, ordered by when the commit's runs finished.

    Only configurations run at two commits or more, and per dataset x protocol the `top` ones with the
    most commits (then the best mean): a chart with thousands of lines shows nothing.
    """
    return rows(con, """
        WITH newest AS (
            SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY config_key, seed, protocol, git_commit
                                                        ORDER BY finished_at DESC NULLS LAST) AS k FROM all_seeds)
            WHERE k = 1),
        points AS (
            SELECT dataset, protocol, config_key, git_commit, any_value(method) AS method,
                   any_value(backbone) AS backbone, any_value(weighting) AS weighting,
                   any_value(positives) AS positives, any_value(synthetic_ratio) AS synthetic_ratio,
                   any_value(epochs) AS epochs, avg(top1) AS mean, stddev_samp(top1) AS std, count(*) AS n,
                   min(finished_at) AS first_at
            FROM newest GROUP BY ALL),
        configs AS (
            SELECT dataset, protocol, config_key,
                   row_number() OVER (PARTITION BY dataset, protocol
                                      ORDER BY count(*) DESC, arg_max(mean, first_at) DESC, config_key) AS k
            FROM points GROUP BY dataset, protocol, config_key HAVING count(*) >= 2)
        SELECT p.* FROM points p JOIN configs c USING (dataset, protocol, config_key)
        WHERE c.k <= ?
        ORDER BY p.dataset, p.protocol, c.k, p.first_at""", [top])


def commits_in_order(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Commits of completed runs, oldest first (by their first finished run)."""
    return [r[0] for r in con.execute(
        "SELECT git_commit FROM all_seeds GROUP BY 1 ORDER BY min(finished_at) NULLS FIRST, 1").fetchall()]


def seeds_at(con: duckdb.DuckDBPyConnection, commit: str) -> list[dict[str, Any]]:
    """Per dataset x protocol x configuration: the per-seed top-1 of runs at `commit` (newest per seed)."""
    return rows(con, """
        WITH newest AS (
            SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY config_key, seed, protocol
                                                        ORDER BY finished_at DESC NULLS LAST) AS k
                           FROM all_seeds WHERE git_commit = ?) WHERE k = 1)
        SELECT dataset, protocol, config_key, any_value(method) AS method, any_value(backbone) AS backbone,
               any_value(weighting) AS weighting, any_value(positives) AS positives,
               any_value(synthetic_ratio) AS synthetic_ratio, any_value(epochs) AS epochs,
               list(top1 ORDER BY seed) AS values, list(seed ORDER BY seed) AS seeds,
               any_value(i.identity) AS identity
        FROM newest JOIN (SELECT config_key, any_value(identity) AS identity FROM run_ident GROUP BY 1) i
             USING (config_key)
        GROUP BY ALL ORDER BY dataset, protocol, config_key""", [commit])


def curves(con: duckdb.DuckDBPyConnection, config_keys: list[str], names: tuple[str, ...] = ("loss", "knn_top1"),
           max_points: int = 100) -> list[dict[str, Any]]:
    """Mean over seeds of per-epoch metrics for some configurations, at most `max_points` per curve.

    Epochs are averaged in buckets so a 1000-epoch run still draws 100 points.
    """
    if not config_keys:
        return []
    return rows(con, """
        WITH m AS (
            SELECT i.config_key, m.name, m.epoch, m.value,
                   greatest(1, ceil(max(m.epoch) OVER (PARTITION BY i.config_key) / ?))::INTEGER AS step
            FROM metrics m JOIN run_ident i ON i.run_id = m.run_id
            WHERE i.config_key IN (SELECT unnest(?::VARCHAR[])) AND m.name IN (SELECT unnest(?::VARCHAR[]))
              AND m.value IS NOT NULL)
        SELECT config_key, name, list(epoch ORDER BY epoch) AS epochs, list(value ORDER BY epoch) AS values
        FROM (SELECT config_key, name, ((epoch - 1) // step) * step + 1 AS epoch, avg(value) AS value
              FROM m GROUP BY ALL)
        GROUP BY ALL""", [max_points, config_keys, list(names)])


def throughput(con: duckdb.DuckDBPyConnection, points_up_to: int = 2000) -> tuple[list[dict[str, Any]], bool]:
    """Median images/s over each completed run's epochs, grouped by method and what it ran on.

    Returns (groups, with_points): up to `points_up_to` runs each group lists its runs; beyond, only
    the quartiles per group come back (thousands of points make a page slow to open).
    """
    runs = """
        SELECT r.run_id, r.name, r.method, r.seed, t.images_per_s,
               r.method || ' · ' || r.backbone || ' · ' || coalesce(r.device_name, 'unknown')
                   || ' × ' || coalesce(r.world_size, 1)
                   || ' · bs ' || coalesce(r.batch_size::VARCHAR, '?') AS grp
        FROM runs r JOIN (SELECT run_id, median(value) AS images_per_s FROM metrics
                          WHERE name = 'images_per_s' GROUP BY run_id) t ON t.run_id = r.run_id
        WHERE r.status = 'completed'"""
    count = con.execute(f"SELECT count(*) FROM ({runs})").fetchone()[0]
    with_points = count <= points_up_to
    extra = ("list(images_per_s ORDER BY images_per_s DESC) AS values, list(coalesce(name, run_id) || ' (' || method "
             "|| ', seed ' || seed || ')' ORDER BY images_per_s DESC) AS labels, ") if with_points else ""
    return rows(con, f"""
        SELECT grp, count(*) AS n, {extra}
               quantile_cont(images_per_s, [0, 0.25, 0.5, 0.75, 1]) AS q
        FROM ({runs}) GROUP BY grp ORDER BY grp"""), with_points
