"""End-to-end jobs on the real CIFAR-10, run as a user runs them (python -m harness ...)."""

import signal
import socket
import subprocess
import sys

import pytest

from harness.store import Store
from tests.conftest import REPO, TINY, harness_env, requires_cifar, run_harness
from tests.events import signal_at_line

pytestmark = [requires_cifar, pytest.mark.slow]


def test_the_readme_check_runs_once_and_a_rerun_adds_nothing(tmp_path, cifar10_cached):
    db = tmp_path / "r.duckdb"
    args = ("dataset.train_size=2000", "dataset.test_size=500", "backbone=convnet", "trainer.epochs=2",
            f"store.path={db}")
    run_harness(*args)
    store = Store(db)
    runs = store.query("SELECT * FROM runs")
    assert [r["status"] for r in runs] == ["completed"]
    assert runs[0]["epochs_done"] == 2 and runs[0]["world_size"] == 1 and runs[0]["git_commit"]
    per_epoch = store.query("SELECT name, count(*) AS n, count(DISTINCT epoch) AS e FROM metrics GROUP BY name")
    assert {r["name"] for r in per_epoch} >= {"loss", "lr", "images_per_s", "knn_top1"}
    assert all(r["n"] == r["e"] for r in per_epoch)
    assert {r["name"]: r["n"] for r in per_epoch}["loss"] == 2
    evals = store.query("SELECT protocol, split, top1 FROM evals ORDER BY protocol")
    assert {e["protocol"] for e in evals} == {"knn:cosine:k=200:T=0.1", "knn:cosine:k=20:T=0.07"}
    assert all(e["split"] == "test" and 10 < e["top1"] <= 100 for e in evals)
    counts = [store.query(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in ("runs", "metrics", "evals")]

    again = run_harness(*args)
    assert "skipped" in again.stderr and "[train]" not in again.stderr
    assert [store.query(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in ("runs", "metrics", "evals")] == counts

    forced = run_harness(*args, "force=true")
    assert "[train]" in forced.stderr
    assert store.query("SELECT count(*) AS n FROM runs WHERE status = 'completed'")[0]["n"] == 2


def test_a_job_killed_with_sigkill_resumes_from_its_checkpoint(tmp_path, cifar10_cached):
    db = tmp_path / "r.duckdb"
    # Killed right after epoch 1's checkpoint (the line follows it), with three epochs left.
    killed = signal_at_line(["-m", "harness", *TINY, "dataset.train_size=2000", "trainer.epochs=4", f"store.path={db}"],
                            lambda line: line.startswith("[train] epoch 1/4 done"), signal.SIGKILL)
    assert killed.signalled and killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    store = Store(db)
    [first] = store.query("SELECT status, wall_seconds, attempts FROM runs")
    assert first["status"] == "running"  # what a killed job leaves
    assert first["wall_seconds"] > 0 and first["attempts"] == 1  # the first attempt's time up to its last row
    resumed = run_harness(*TINY, "dataset.train_size=2000", "trainer.epochs=4", f"store.path={db}")
    assert "resumed from" in resumed.stderr
    assert "epoch 1/4" not in resumed.stderr
    runs = store.query("SELECT run_id, status FROM runs")
    assert [r["status"] for r in runs] == ["completed"]  # the same run continued, not a new one
    losses = store.query("SELECT epoch FROM metrics WHERE name = 'loss' ORDER BY epoch")
    assert [r["epoch"] for r in losses] == [1, 2, 3, 4]  # epochs count from 1 in every table
    # Its cost is both attempts' time: the first one's recorded seconds plus the second's (from its start
    # to its end), not only the last attempt's.
    [end] = store.query("SELECT wall_seconds, attempts, started_at, finished_at FROM runs")
    second = (end["finished_at"] - end["started_at"]).total_seconds()
    assert end["attempts"] == 2 and second > 0
    assert end["wall_seconds"] >= first["wall_seconds"] + second - 1e-6


def test_config_errors_name_the_field_the_value_and_what_is_allowed(tmp_path):
    bad = run_harness("trainer.lr=-0.1", "trainer.batch_size=-4", "trainer.epochs=-1", f"dataset.root={tmp_path}/nope",
                      "trainer.sync_bn=maybe", f"store.path={tmp_path}/r.duckdb", check=False)
    assert bad.returncode == 2
    for text in ("trainer.lr = -0.1", "trainer.batch_size = -4", "trainer.epochs = -1", "dataset.root = ",
                 "expected a number > 0", "expected an integer >= 0", "an existing directory",
                 "trainer.sync_bn = 'maybe'", "expected true or false"):
        assert text in bad.stderr
    assert "Traceback" not in bad.stderr
    unknown = run_harness("method=nosuchmethod", check=False)
    assert unknown.returncode == 2  # an unknown group option is a bad value like the others (issue 20)
    assert "method = 'nosuchmethod'" in unknown.stderr and "simclr" in unknown.stderr
    assert not (tmp_path / "r.duckdb").exists()  # nothing was recorded


def test_epochs_0_records_the_untrained_backbone_as_a_completed_run(tmp_path, cifar10_cached):
    """The random-init floor: no training step, the same evaluations, a completed run with epochs 0."""
    db = tmp_path / "r.duckdb"
    run_harness(*TINY, "trainer.epochs=0", f"store.path={db}")
    store = Store(db)
    [run] = store.query("SELECT status, epochs, epochs_done FROM runs")
    assert run == {"status": "completed", "epochs": 0, "epochs_done": 0}
    protocols = [r["protocol"] for r in store.query("SELECT protocol FROM evals WHERE split = 'test' ORDER BY 1")]
    assert protocols == ["knn:cosine:k=200:T=0.1", "knn:cosine:k=20:T=0.07"]
    assert store.query("SELECT count(*) AS n FROM metrics WHERE name = 'loss'") == [{"n": 0}]  # nothing trained


def test_torchrun_runs_the_same_job_as_two_processes(tmp_path, cifar10_cached):
    db = tmp_path / "r.duckdb"
    with socket.socket() as s:  # torchrun's --master_port=0 hangs in rendezvous on torch 2.13
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m", "harness",
         *TINY, "trainer.epochs=1", f"store.path={db}"],
        cwd=REPO, env=harness_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = Store(db).query("SELECT status, world_size FROM runs")
    assert runs == [{"status": "completed", "world_size": 2}]
    assert proc.stderr.count("epoch 1/1 done") == 1  # only rank 0 reports
    assert proc.stderr.count("[train] trainer.sync_bn:") == 1  # the ConvNet's BatchNorms see the global batch
