"""Runs whose process dies without a word, and a requeue signal during the final evaluation, on the real
CIFAR-10 with the small ConvNet, run as a user runs them (python -m harness ...)."""

from __future__ import annotations

import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch

from harness.store import Store, read_heartbeat, utcnow
from leaderboard.__main__ import main as leaderboard
from tests.conftest import REPO, TINY, harness_env, requires_cifar, run_harness
from tests.events import signal_at_line, wait_for

pytestmark = [requires_cifar, pytest.mark.slow]

SMALL = (*TINY, "dataset.train_size=512", "trainer.epochs=2")


def start(*overrides: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness", *overrides], cwd=REPO, env=harness_env(**env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def show_all(db: Path, capsys) -> str:
    capsys.readouterr()
    assert leaderboard(["show", "--db", str(db), "--runs", "--all"]) == 0
    return capsys.readouterr().out


def test_a_sigkilled_run_is_lost_after_lost_after_s_and_the_same_command_completes_it(tmp_path, cifar10_cached,
                                                                                      capsys):
    db = tmp_path / "r.duckdb"
    args = (*SMALL, f"store.path={db}", "store.heartbeat_s=1", "store.lost_after_s=5")
    runs = tmp_path / "r.duckdb.runs"
    # Right after the first epoch's checkpoint (the line follows it), what the OOM killer or a node
    # failure does: no word, no row.
    killed = signal_at_line(["-m", "harness", *args], lambda line: line.startswith("[train] epoch 1/2 done"))
    assert killed.signalled and killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    [folder] = [p for p in runs.iterdir() if p.is_dir()]
    beat = read_heartbeat(folder)
    assert beat is not None and beat["lost_after_s"] == 5

    # Every ingester judges the heartbeat; `show --all` is one. Running until 5 s have passed, then lost.
    out = wait_for("the run to be shown lost", lambda: (text := show_all(db, capsys)) and " lost " in text and text,
                   every=0.5)
    silent = (datetime.fromisoformat(utcnow()) - datetime.fromisoformat(beat["at"])).total_seconds()
    assert silent > 5, out
    assert folder.name in out
    store = Store(db)
    [row] = store.query("SELECT status, finished_at, error, attempts FROM runs")
    assert row["status"] == "lost" and row["attempts"] == 1
    assert row["finished_at"] == datetime.fromisoformat(beat["at"])  # the last moment it was known alive
    assert "store.lost_after_s=5" in row["error"]
    # Never a result: the per-configuration view has nothing; the page lists it apart.
    capsys.readouterr()
    leaderboard(["show", "--db", str(db)])
    assert "no completed runs" in capsys.readouterr().out
    page = tmp_path / "lb.html"
    assert leaderboard(["build", "--db", str(db), "--out", str(page), "--cdn"]) == 0
    html = page.read_text()
    assert "0 completed of 1 runs (1 lost)" in html and "<h2>Lost runs</h2>" in html and folder.name in html

    # The same command resumes it: the same run id, one more attempt.
    resumed = run_harness(*args)
    assert "resumed from" in resumed.stderr and "epoch 1/2 done" not in resumed.stderr
    [end] = store.query("SELECT status, attempts FROM runs")
    assert end == {"status": "completed", "attempts": 2}

    # store.keep_checkpoints=weights (the default): the completed run keeps the backbone's weights, as the
    # exporter writes them, and no optimizer state; the exporter still works from them.
    assert sorted(p.name for p in folder.glob("*.pt")) == ["backbone.pt"]
    weights = torch.load(folder / "backbone.pt", weights_only=True)
    assert weights and all(isinstance(v, torch.Tensor) for v in weights.values())
    from harness.export import main as export

    assert export([folder.name, "--db", str(db), "--out", str(tmp_path / "export")]) == 0
    exported = torch.load(tmp_path / "export" / "backbone.pt", weights_only=True)
    assert exported.keys() == weights.keys() and all(torch.equal(exported[k], weights[k]) for k in weights)


def _metrics(db: Path) -> dict[tuple[int, str], float]:
    return {(r["epoch"], r["name"]): r["value"] for r in Store(db).query("SELECT epoch, name, value FROM metrics")}


def test_a_requeue_signal_during_the_final_evaluation_only_evaluates_again(tmp_path, cifar10_cached):
    # The linear probe makes the final evaluation last seconds, so the signal lands inside it.
    args = (*SMALL, "eval.linear.enabled=true", "eval.linear.epochs=30")
    plain = tmp_path / "plain.duckdb"
    run_harness(*args, f"store.path={plain}")

    db = tmp_path / "r.duckdb"
    # SUBMITIT_EXECUTOR: the harness installs its requeue handler as in a submitit job.
    proc = start(*args, f"store.path={db}", SUBMITIT_EXECUTOR="local")
    try:
        for line in proc.stderr:
            if line.startswith("[train] final evaluation"):
                proc.send_signal(signal.SIGUSR2)
                break
        err = proc.communicate(timeout=300)[1]
    finally:
        proc.kill()
    assert "stops for a requeue" in err, err[-3000:]
    state = torch.load(next((tmp_path / "r.duckdb.runs").glob("*/checkpoint.pt")), weights_only=True)
    assert state["epoch"] == 1 and "pending_metrics" in state  # the last epoch's checkpoint, before evaluating

    again = run_harness(*args, f"store.path={db}")
    assert "resumed from" in again.stderr and "epoch 2/2 done" not in again.stderr  # no second training
    assert [r["status"] for r in Store(db).query("SELECT status FROM runs")] == ["completed"]
    ours, theirs = _metrics(db), _metrics(plain)
    assert ours.keys() == theirs.keys()  # one row per epoch and name, as an uninterrupted run has
    timing = {"epoch_time_s", "images_per_s"}
    for k in theirs:
        if k[1] not in timing:
            assert ours[k] == pytest.approx(theirs[k], rel=1e-5), k
    protocols = {r["protocol"] for r in Store(db).query("SELECT protocol FROM evals")}
    assert protocols == {r["protocol"] for r in Store(plain).query("SELECT protocol FROM evals")}
    assert any(p.startswith("linear:") for p in protocols)
