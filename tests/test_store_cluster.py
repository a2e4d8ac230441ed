"""The store as a cluster uses it: jobs only append files, ingesters index them (issue 14).

Real DuckDB and real harness runs. The 64-task job array on the local Slurm cluster is in test_slurm.py,
with every other test that submits Slurm jobs.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from harness.store import Store, utcnow
from leaderboard.show import show
from tests.conftest import REPO, TINY, Holder, harness_env, requires_cifar, run_harness
from tests.events import signal_at_line

ONE_EPOCH = (*TINY, "dataset.train_size=512", "dataset.test_size=128", "trainer.batch_size=64", "trainer.epochs=1")


def counts(db: Path, tables=("runs", "metrics", "evals", "sweep_points")) -> dict[str, int]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}
    finally:
        con.close()


def read_only_rows(db: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)  # what a user's `duckdb -readonly` sees
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


@requires_cifar
def test_a_run_completes_while_the_database_is_held_and_a_local_run_is_visible_when_it_ends(tmp_path,
                                                                                          cifar10_cached):
    db = tmp_path / "r.duckdb"
    Store(db).ingest()  # the database exists, as after earlier runs
    holder = Holder(db)
    try:
        held = run_harness(*ONE_EPOCH, f"store.path={db}", "seed=0")
    finally:
        holder.release()
    # It completed, did not wait, and said where its rows wait and the one command that ingests them.
    assert "completed" in held.stderr
    line = next(x for x in held.stderr.splitlines() if "is open in another process" in x)
    assert f"{db}.spool" in line
    command = re.search(r"ingest them with: (python -m harness\.store ingest .*)$", line).group(1)
    assert read_only_rows(db, "SELECT count(*) FROM runs") == [(0,)]
    out = subprocess.run(command.split(), cwd=REPO, env=harness_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert read_only_rows(db, "SELECT status FROM runs") == [("completed",)]
    assert read_only_rows(db, "SELECT count(*) FROM metrics")[0][0] > 0

    # With nobody holding it, a local run is in the database the moment it ends.
    free = run_harness(*ONE_EPOCH, f"store.path={db}", "seed=1")
    assert "is open in another process" not in free.stderr
    assert read_only_rows(db, "SELECT seed, status FROM runs ORDER BY seed") == [(0, "completed"), (1, "completed")]
    assert read_only_rows(db, "SELECT count(DISTINCT run_id) FROM evals") == [(2,)]
    assert Store(db).pending() == 0


@requires_cifar
@pytest.mark.slow
def test_a_deleted_database_is_rebuilt_from_the_run_folders_and_nothing_trains_again(tmp_path, cifar10_cached):
    db = tmp_path / "r.duckdb"
    sweep = ("sweep=smoke", "dataset.train_size=256", "trainer.epochs=1", "hydra.sweeper.params={}", "seed=0,1",
             f"store.path={db}")
    first = run_harness(*sweep, f"hydra.sweep.dir={tmp_path}/a", "-m")
    assert "Sweep finished: 2 point(s): 2 completed." in first.stderr
    before = counts(db)
    assert before["runs"] == 2 and before["metrics"] > 0 and before["evals"] > 0
    markers = sorted(p.parent.name for p in (tmp_path / "r.duckdb.runs").glob("*/done.json"))
    assert len(markers) == 2

    db.unlink()
    again = run_harness(*sweep, f"hydra.sweep.dir={tmp_path}/b", "-m")
    assert "Sweep finished: 2 point(s): 2 skipped." in again.stderr, again.stderr[-3000:]
    assert "[train]" not in again.stderr
    after = counts(db)
    assert {t: after[t] for t in ("runs", "metrics", "evals")} == {t: before[t] for t in ("runs", "metrics", "evals")}
    assert after["sweep_points"] == 4  # both sweeps' points: the first one's came back from the run folders
    assert read_only_rows(db, "SELECT DISTINCT status FROM runs") == [("completed",)]

    # The explicit rebuild gives the same database from nothing.
    db.unlink()
    out = subprocess.run([sys.executable, "-m", "harness.store", "rebuild", "--db", str(db)], cwd=REPO,
                         env=harness_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert counts(db) == after


def test_a_malformed_spool_file_is_quarantined_and_no_good_row_is_lost(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    store.write("runs", [{"run_id": "a", "run_key": "k", "status": "completed", "seed": 0, "started_at": utcnow()}])
    store.write("metrics", [{"run_id": "a", "epoch": e, "name": "loss", "value": 1.0 / (e + 1)} for e in range(3)])
    # A truncated file (a node died mid-copy) and a value of the wrong type (a 64-bit seed).
    store.write("metrics", [{"run_id": "b", "epoch": 0, "name": "loss", "value": 2.0}])
    truncated = max(store.spool.glob("metrics/*.jsonl"))
    truncated.write_bytes(truncated.read_bytes()[:25])
    store.write("runs", [{"run_id": "c", "run_key": "k2", "status": "completed", "seed": 3_000_000_000}])
    wrong_type = max(store.spool.glob("runs/*.jsonl"))
    store.write("evals", [{"run_id": "a", "protocol": "knn", "split": "test", "top1": 50.0}])

    store.ingest()
    rejected = sorted(store.rejected_dir.glob("*.jsonl"))
    assert [p.name for p in rejected] == sorted([f"metrics-{truncated.name}", f"runs-{wrong_type.name}"])
    for path, original in ((store.rejected_dir / f"metrics-{truncated.name}", truncated),
                           (store.rejected_dir / f"runs-{wrong_type.name}", wrong_type)):
        why = path.with_name(path.name + ".why").read_text()
        assert str(original) in why and "Error" in why
    assert "3000000000" in (store.rejected_dir / f"runs-{wrong_type.name}.why").read_text()
    assert store.pending() == 0
    # Every row of the good files is in; nothing was deleted.
    assert store.query("SELECT run_id, status FROM runs") == [{"run_id": "a", "status": "completed"}]
    assert store.query("SELECT count(*) AS n FROM metrics WHERE run_id = 'a'")[0]["n"] == 3
    assert store.query("SELECT top1 FROM evals")[0]["top1"] == 50.0

    # Later writes and ingests go on; the leaderboard works and says how many files it refused.
    store.write("metrics", [{"run_id": "a", "epoch": 3, "name": "loss", "value": 0.2}])
    store.ingest()
    assert store.query("SELECT count(*) AS n FROM metrics")[0]["n"] == 4
    text = show(store.path, include_all=True)
    assert "2 spool file(s) rejected" in text and str(store.rejected_dir) in text
    from leaderboard.page import rejected_note

    assert "2 spool file(s) rejected" in rejected_note(store.path)


def test_the_schema_is_migrated_only_when_its_version_changes(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    store.ingest()
    con = duckdb.connect(str(store.path))
    con.execute("ALTER TABLE runs DROP COLUMN epochs_done")  # a column only a migration would add back
    con.close()
    store.ingest()
    names = [r[0] for r in read_only_rows(store.path, "SELECT column_name FROM information_schema.columns "
                                                      "WHERE table_name = 'runs'")]
    assert "epochs_done" not in names  # same version: no ALTER ran
    con = duckdb.connect(str(store.path))
    con.execute("UPDATE _schema SET version = 'older'")
    con.close()
    store.ingest()
    names = [r[0] for r in read_only_rows(store.path, "SELECT column_name FROM information_schema.columns "
                                                      "WHERE table_name = 'runs'")]
    assert "epochs_done" in names


@requires_cifar
def test_sigkill_before_the_first_checkpoint_leaves_no_running_row(tmp_path, cifar10_cached):
    db = tmp_path / "r.duckdb"
    args = [*ONE_EPOCH, f"store.path={db}"]
    # Killed at its first line about data or training: its runs row is written (before the data is
    # loaded) and the first epoch, whose end writes the first checkpoint, has not begun.
    killed = signal_at_line(["-m", "harness", *args], lambda line: line.startswith(("[data]", "[train]")))
    assert killed.signalled and killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    runs = tmp_path / "r.duckdb.runs"
    assert list(runs.glob("*/rows/runs/*.jsonl"))
    assert not list(runs.glob("*/checkpoint.pt")), "killed too late: a checkpoint was written"
    store = Store(db)
    assert [r["status"] for r in store.query("SELECT status FROM runs")] == ["running"]  # what the kill left

    run_harness(*args)
    rows = store.query("SELECT status, error FROM runs ORDER BY started_at")
    assert [r["status"] for r in rows] == ["failed", "completed"]
    assert "killed before its first checkpoint" in rows[0]["error"]
    assert store.query("SELECT count(*) AS n FROM runs WHERE status = 'running'")[0]["n"] == 0
    marker = json.loads(next(runs.glob("*/done.json")).read_text())
    assert store.query("SELECT run_id FROM runs WHERE status = 'completed'")[0]["run_id"] == marker["run_id"]
