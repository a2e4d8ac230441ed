"""How fast the store takes metric rows, and how fast the leaderboard page builds from big stores.

    python benchmarks/store.py                         # 1M metric rows; pages for 1k, 10k, 100k runs
    python benchmarks/store.py --sizes 1000:100 10000:100 --write-rows 200000

A size is RUNS:EPOCHS (per-epoch metrics per run, 7 names each as the trainer logs them). The
default 100k case keeps 10 epochs per run (7M metric rows) so that it fits a 2-core laptop's
patience; the 10k case has the 100 epochs per run the leaderboard issue asks for (7M rows too).

Synthetic stores for the page are generated inside DuckDB (writing 7M rows through the spool
would time the writer again, which the first table measures already).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python benchmarks/store.py`

from benchmarks.common import report  # noqa: E402
from harness.store import Store  # noqa: E402
from leaderboard import page  # noqa: E402

METRICS = ("loss", "loss_pair", "loss_batch", "lr", "epoch_time_s", "images_per_s", "knn_top1")
PROTOCOLS = ("knn:cosine:k=200:T=0.1", "knn:cosine:k=20:T=0.07")


def time_writes(folder: Path, total: int, rows_per_write: int) -> dict:
    """Write `total` metric rows through Store.write in files of `rows_per_write`, then ingest them."""
    store = Store(folder / f"write-{rows_per_write}.duckdb")
    started = time.perf_counter()
    for w in range(total // rows_per_write):
        store.write("metrics", [{"run_id": f"r{w}", "run_key": f"k{w}", "epoch": e, "name": "loss",
                                 "value": 1.0 / (e + 1)} for e in range(rows_per_write)])
    written = time.perf_counter()
    store.ingest()
    ingested = time.perf_counter()
    count = store.query("SELECT count(*) AS n FROM metrics")[0]["n"]
    assert count == total, (count, total)
    return {"case": f"{total:,} rows, {rows_per_write} per write", "write_s": written - started,
            "ingest_s": ingested - written, "rows_per_s": total / (ingested - started)}


def synthetic_store(path: Path, runs: int, epochs: int) -> None:
    """`runs` completed runs: 3 seeds × 2 commits per configuration, 2 protocols, per-epoch metrics."""
    store = Store(path)
    with store.connect() as con:
        # Configuration c = i // 6; seed i % 3; commit (i // 3) % 2. The setting cycles through methods,
        # weighting, synthetic ratio, backbone and dataset; the rest of c becomes a learning-rate grid.
        con.execute("""
            CREATE TEMP TABLE g AS SELECT i, i // 6 AS c, i % 3 AS seed, (i // 3) % 2 AS commit,
                ['simclr','moco','byol','sce'][(i // 6) % 4 + 1] AS method,
                CASE WHEN (i // 24) % 2 = 1 THEN 'scorecl' ELSE 'none' END AS weighting,
                CASE WHEN (i // 48) % 2 = 1 THEN 0.5 ELSE 0.0 END AS ratio,
                ['resnet18','resnet50'][(i // 96) % 2 + 1] AS backbone,
                ['cifar10','cifar100'][(i // 192) % 2 + 1] AS dataset,
                0.01 * (1 + i // 384) AS lr
            FROM range(?) t(i)""", [runs])
        con.execute("""
            INSERT INTO runs (run_id, run_key, name, status, method, dataset, backbone, weighting, positives,
                              synthetic_ratio, seed, epochs, batch_size, lr, config, git_commit, git_dirty, host,
                              device_name, world_size, started_at, finished_at, objective, gpu_hours, epochs_done)
            SELECT 'run' || i, 'key' || c || '-' || seed, 'run ' || i, 'completed', method, dataset, backbone,
                   weighting, CASE WHEN ratio > 0 THEN 'clsp' ELSE 'none' END, ratio, seed, ?, 256, lr,
                   '{"method":{"name":"' || method || '"},"dataset":{"name":"' || dataset || '"},"backbone":{"name":"'
                   || backbone || '"},"weighting":{"name":"' || weighting || '"},"positives":{"name":"'
                   || CASE WHEN ratio > 0 THEN 'clsp' ELSE 'none' END || '","ratio":' || ratio
                   || '},"trainer":{"lr":' || lr || ',"epochs":' || ? || '},"seed":' || seed || '}',
                   CASE WHEN commit = 0 THEN 'aaaa000000' ELSE 'bbbb111111' END, false, 'node1', 'NVIDIA H100', 1,
                   TIMESTAMP '2025-01-01' + INTERVAL (i) MINUTE + INTERVAL (commit * 100000) MINUTE,
                   TIMESTAMP '2025-01-01' + INTERVAL (i + 30) MINUTE + INTERVAL (commit * 100000) MINUTE,
                   0, 0.5, ?
            FROM g""", [epochs, epochs, epochs])
        con.execute("""
            INSERT INTO evals SELECT 'run' || i, 'key' || c || '-' || seed, p.protocol, 'test',
                   60 + 3 * ((c % 4)) + 1.5 * (weighting = 'scorecl')::INT + 2 * ratio - p.k * 4 + random() * 2,
                   90 + random(), ?
            FROM g, (SELECT unnest(?::VARCHAR[]) AS protocol, unnest([0, 1]) AS k) p""", [epochs, list(PROTOCOLS)])
        con.execute("""
            INSERT INTO metrics SELECT 'run' || i, 'key' || c || '-' || seed, e + 1, n.name,
                   CASE n.name WHEN 'loss' THEN 6 * exp(-e / 40.0) + random() * 0.1
                               WHEN 'knn_top1' THEN 60 * (1 - exp(-e / 30.0)) + random()
                               WHEN 'images_per_s' THEN 20000 + random() * 500 ELSE random() END
            FROM g, range(?) r(e), (SELECT unnest(?::VARCHAR[]) AS name) n""", [epochs, list(METRICS)])


def time_build(folder: Path, runs: int, epochs: int) -> dict:
    db = folder / f"page-{runs}.duckdb"
    started = time.perf_counter()
    synthetic_store(db, runs, epochs)
    made = time.perf_counter()
    out = folder / f"page-{runs}.html"
    size = page.build(db, out)
    built = time.perf_counter()
    cdn_size = page.build(db, folder / f"page-{runs}-cdn.html", cdn=True)
    return {"runs": runs, "epochs": epochs, "metric_rows": runs * epochs * len(METRICS),
            "generate_s": made - started, "build_s": built - made, "page_MB": size / 1e6, "cdn_page_MB": cdn_size / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1000:100", "10000:100", "100000:10"], help="RUNS:EPOCHS ...")
    parser.add_argument("--write-rows", type=int, default=1_000_000, help="metric rows for the write benchmark")
    parser.add_argument("--dir", type=Path, default=None, help="where the stores go (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        writes = [time_writes(folder, args.write_rows, 1000), time_writes(folder, args.write_rows // 100, 10)]
        report("store: metric rows through Store.write (spool) and one ingest", writes,
               ["case", "write_s", "ingest_s", "rows_per_s"],
               "1000 rows per write is a job logging many rows at once; 10 per write is the trainer's shape "
               "(one small file per epoch, each fsynced), timed on 1/100 of the rows.")
        builds = [time_build(folder, *map(int, size.split(":"))) for size in args.sizes]
        report("leaderboard: `python -m leaderboard build` on synthetic stores", builds,
               ["runs", "epochs", "metric_rows", "generate_s", "build_s", "page_MB", "cdn_page_MB"],
               "3 seeds × 2 commits per configuration, 2 k-NN protocols, 7 metrics per epoch; build_s is the whole "
               "page (store open, config hashing, DuckDB aggregates, HTML with plotly.js inlined).")


if __name__ == "__main__":
    main()
