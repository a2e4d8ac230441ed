import multiprocessing as mp

import duckdb

from harness.store import Store, utcnow


def test_upserts_keep_the_newest_row_per_key(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    store.write("runs", [{"run_id": "a", "run_key": "k", "status": "running", "started_at": utcnow()}])
    store.write("runs", [{"run_id": "a", "run_key": "k", "status": "completed", "objective": 51.5}])
    store.write("metrics", [{"run_id": "a", "epoch": e, "name": "loss", "value": 10.0 - e} for e in range(3)])
    store.ingest()
    # A resumed job writes epoch 2 again: it replaces the row instead of adding one.
    store.write("metrics", [{"run_id": "a", "epoch": 2, "name": "loss", "value": 1.5}])
    rows = store.query("SELECT epoch, value FROM metrics ORDER BY epoch")
    assert [(r["epoch"], r["value"]) for r in rows] == [(0, 10.0), (1, 9.0), (2, 1.5)]
    assert store.completed("k")["objective"] == 51.5
    assert store.pending() == 0


def test_an_interrupted_ingest_neither_loses_nor_repeats_rows(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    store.write("evals", [{"run_id": "a", "protocol": "p", "split": "test", "top1": 1.0}])
    store.ingest()
    # Simulate a crash after the commit but before the spool file was deleted.
    store.write("metrics", [{"run_id": "a", "epoch": 0, "name": "x", "value": 1.0}])
    pending = next(store.spool.glob("metrics/*.jsonl"))
    con = duckdb.connect(str(store.path))
    con.execute("INSERT INTO metrics (run_id, epoch, name, value) VALUES ('a', 0, 'x', 1.0)")
    con.execute("INSERT INTO _ingested VALUES (?)", [str(pending)])
    con.close()
    assert store.query("SELECT count(*) AS n FROM metrics")[0]["n"] == 1
    assert not pending.exists()


def _writer(path: str, worker: int, epochs: int) -> None:
    store = Store(path)
    run_id = f"run{worker}"
    store.write("runs", [{"run_id": run_id, "run_key": f"k{worker}", "status": "running", "started_at": utcnow()}])
    for epoch in range(epochs):
        store.write("metrics", [{"run_id": run_id, "epoch": epoch, "name": n, "value": float(epoch)}
                                for n in ("loss", "lr")])
        if epoch % 3 == 0:
            store.ingest()  # readers and writers interleave: each ingests while others write
    store.write("runs", [{"run_id": run_id, "run_key": f"k{worker}", "status": "completed", "objective": worker}])
    store.ingest()


def test_sixteen_processes_writing_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "r.duckdb")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 12)) for w in range(16)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    store = Store(path)
    assert store.query("SELECT count(*) AS n FROM runs WHERE status = 'completed'")[0]["n"] == 16
    assert store.query("SELECT count(*) AS n FROM metrics")[0]["n"] == 16 * 12 * 2
    distinct = "SELECT count(DISTINCT run_id || ':' || epoch || ':' || name) AS n FROM metrics"
    assert store.query(distinct)[0]["n"] == 16 * 12 * 2
    assert store.pending() == 0


def test_an_outside_reader_holding_the_file_delays_but_loses_nothing(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    store.ingest()
    blocker = duckdb.connect(str(store.path))  # e.g. a user's duckdb shell
    store.write("metrics", [{"run_id": "a", "epoch": 0, "name": "loss", "value": 2.0}])
    try:
        Store(store.path).ingest(timeout=0.5)
        raise AssertionError("ingest should not get the lock while another writer holds the file")
    except Exception as e:  # StoreBusy
        assert "locked" in str(e) or "lock" in str(e)
    finally:
        blocker.close()
    assert store.query("SELECT value FROM metrics")[0]["value"] == 2.0


def test_a_store_from_before_epochs_counted_from_1_is_migrated_once(tmp_path):
    # Old code wrote metrics.epoch from 0 (evals.epoch from 1), in the database and in the run folders'
    # row files (which carry no `_format`). Both read back counting from 1, and re-reading agrees.
    db = tmp_path / "old.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE _schema (version VARCHAR)")
    con.execute("INSERT INTO _schema VALUES ('from-before')")
    con.execute("CREATE TABLE metrics (run_id VARCHAR, run_key VARCHAR, epoch INTEGER, name VARCHAR, value DOUBLE,"
                " PRIMARY KEY (run_id, epoch, name))")
    con.execute("INSERT INTO metrics VALUES ('a', 'ka', 0, 'loss', 3.0), ('a', 'ka', 1, 'loss', 2.0)")
    con.close()
    old_rows = tmp_path / "old.duckdb.runs" / "kb" / "rows" / "metrics"
    old_rows.mkdir(parents=True)
    (old_rows / "00000000000000000001-h-1-x.jsonl").write_text(
        "".join(f'{{"run_id": "b", "run_key": "kb", "epoch": {e}, "name": "loss", "value": {5.0 - e}, "_order": {e}}}\n'
                for e in range(2)))
    store = Store(db)
    store.write("metrics", [{"run_id": "c", "run_key": "kc", "epoch": 1, "name": "loss", "value": 1.0}])  # new code
    assert store.rebuild() == 1
    for _ in range(2):  # opening again migrates nothing twice
        rows = store.query("SELECT run_id, list(epoch ORDER BY epoch) AS epochs FROM metrics GROUP BY ALL ORDER BY 1")
        assert [(r["run_id"], r["epochs"]) for r in rows] == [("a", [1, 2]), ("b", [1, 2]), ("c", [1])]
