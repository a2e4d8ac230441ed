"""One rank's failure ends every rank; Slurm set-up that cannot silently go wrong; a signal outside the loop.

The torchrun test injects a NaN on rank 1 only (tests/nan_method.py) at a step where rank 0's loss
is still finite. The Slurm tests set a task's environment as Slurm does and call the real set-up
code; the NodeAddr one asks the local test cluster, whose node names do not resolve.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from filelock import FileLock

from harness.core import distributed
from harness.jobs.config import compose, run_key
from harness.store import Store
from tests.conftest import REPO, TINY, harness_env, run_harness


def _free_port() -> int:
    with socket.socket() as s:  # torchrun's --master_port=0 hangs in rendezvous on torch 2.13
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_nan_on_one_rank_ends_both_ranks_and_the_run_is_diverged(tmp_path, cifar10_cached):
    db = tmp_path / "r.duckdb"
    # Step 0 is a sync point: rank 1's loss is NaN there while rank 0's is finite.
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
         "-m", "harness", *TINY, "trainer.epochs=1", "method._target_=tests.nan_method.NanOnRank1",
         "+method.nan_at_step=0", f"store.path={db}"],
        cwd=REPO, env=harness_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []  # (when it was read, line)
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line) for line in proc.stdout))
    reader.start()
    try:
        proc.wait(timeout=600)  # a hung rank would sit in a collective until gloo's 30-minute timeout
        ended = time.monotonic()
    finally:
        proc.kill()
        reader.join()
    out = "".join(line for _, line in lines)
    first_diverged = next((t for t, line in lines if "diverged: loss became" in line), None)
    assert proc.returncode == 0, out[-4000:]
    assert first_diverged is not None, out[-4000:]
    # The bound: both ranks end within 60 s (a rank left waiting in a collective would sit
    # there until the 30-minute gloo timeout), counted from the first rank's Diverged.
    assert ended - first_diverged < 60, f"the ranks ended {ended - first_diverged:.0f} s after the first Diverged"
    # Every rank raised Diverged at the same sync point (none failed in a collective its peer left).
    assert out.count("diverged: loss became") == 2, out[-4000:]
    assert "loss became not finite on another rank at epoch 1, step 1" in out
    runs = Store(db).query("SELECT status, world_size FROM runs")
    assert runs == [{"status": "diverged", "world_size": 2}]


def _slurm_task(monkeypatch, **env: str) -> None:
    """The environment Slurm gives one task of an srun step (rank 1 of 2, on two nodes)."""
    for name in list(os.environ):
        if name == "SLURM_CONF":  # which cluster scontrol asks
            continue
        if name.startswith(("SLURM_", "SUBMITIT_")) or name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT"):
            monkeypatch.delenv(name)
    task = {"SLURM_JOB_ID": "4259", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_STEP_NUM_NODES": "2", "SLURM_JOB_NUM_NODES": "2", "SLURM_STEP_NODELIST": "n[1-2]",
            "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "1"}
    task.update(env)
    for name, value in task.items():
        monkeypatch.setenv(name, value)


def _port(monkeypatch, job: str, task: str | None) -> int:
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", job)
    if task is None:
        monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    else:
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
    return distributed.slurm_port()


def test_two_array_tasks_never_share_a_port_and_ports_avoid_the_ephemeral_range(monkeypatch):
    _slurm_task(monkeypatch)
    # Joined as strings both would be "424217".
    assert _port(monkeypatch, "4242", "17") != _port(monkeypatch, "42421", "7")
    for job in ("4242", "42421", "999999"):
        ports = [_port(monkeypatch, job, str(task)) for task in range(1001)]  # Slurm's default MaxArraySize
        assert len(set(ports)) == len(ports)
        assert all(20000 <= p < 32768 for p in ports)  # Linux hands out 32768-60999 to outgoing connections


def test_an_unresolvable_master_takes_the_node_addr_from_scontrol_output():
    text = ("NodeName=n1 Arch=x86_64 CoresPerSocket=1\n   CPUAlloc=0 CPUEfctv=2 CPUTot=2\n"
            "   NodeAddr=10.1.2.3 NodeHostName=vm Port=17101 Version=22.05.8\n")
    assert distributed.node_addr_from_scontrol(text) == "10.1.2.3"
    assert distributed.node_addr_from_scontrol("Node nope not found\n") is None


def _cluster_answers() -> bool:
    if shutil.which("scontrol") is None:
        return False
    return subprocess.run(["scontrol", "show", "node", "n1"], capture_output=True, timeout=20).returncode == 0


@pytest.mark.slurm
@pytest.mark.skipif(not _cluster_answers(), reason="the local Slurm cluster (node n1) does not answer; SLURM_CONF?")
def test_an_unresolvable_master_takes_slurms_node_addr(monkeypatch):
    with pytest.raises(OSError):
        socket.getaddrinfo("n1", None)  # the test cluster's node names do not resolve
    _slurm_task(monkeypatch)
    env = distributed.slurm_env()
    assert env["MASTER_ADDR"] == "127.0.0.1"  # n1's NodeAddr in the cluster's slurm.conf
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("1", "2", "0")
    # A node Slurm does not know: an error naming it.
    _slurm_task(monkeypatch, SLURM_STEP_NODELIST="nosuchnode[7-8]")
    with pytest.raises(distributed.SetupError, match="'nosuchnode7'"):
        distributed.slurm_env()


def test_a_master_with_no_address_is_an_error_naming_the_host(monkeypatch, tmp_path):
    _slurm_task(monkeypatch, SLURM_STEP_NODELIST="nosuchnode[7-8]")
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol either
    with pytest.raises(distributed.SetupError) as error:
        distributed.slurm_env()
    assert "master node 'nosuchnode7'" in str(error.value) and "scontrol is not on PATH" in str(error.value)


def test_slurm_ntasks_outside_an_srun_step_runs_one_process_and_says_why(monkeypatch, capsys):
    _slurm_task(monkeypatch, SLURM_NTASKS="4", SLURM_PROCID="0")
    monkeypatch.delenv("SLURM_STEP_ID")  # `python -m harness` in an `sbatch --ntasks=4` script
    info = distributed.setup("cpu")
    assert info.world_size == 1 and info.backend is None
    lines = [line for line in capsys.readouterr().err.splitlines() if "SLURM_NTASKS" in line]
    assert len(lines) == 1 and "not a task of an srun step" in lines[0] and "srun python -m harness" in lines[0]


def _signal_when(overrides: tuple[str, ...], now) -> tuple[int, str]:
    """Run `python -m harness` as a submitit job would, send the requeue signal (USR2) at the first
    stderr line for which `now(line)` holds; return its exit status and stderr.

    SUBMITIT_EXECUTOR: the harness installs its handler as in a submitit job; with no submitit
    handler behind it, the hand-over is an exit.
    """
    job = subprocess.Popen([sys.executable, "-m", "harness", *overrides], cwd=REPO,
                           env=harness_env(SUBMITIT_EXECUTOR="local"), stderr=subprocess.PIPE, text=True)
    try:
        err = ""
        for line in job.stderr:
            err += line
            if now(line):
                job.send_signal(signal.SIGUSR2)
                break
        err += job.stderr.read()
        job.wait(timeout=120)
    finally:
        job.kill()
    return job.returncode, err


@pytest.mark.slow
def test_a_signal_while_waiting_for_the_run_key_lock_stops_the_job_for_a_requeue(tmp_path):
    """Outside the training loop the requeue signal is not swallowed: the job stops at once."""
    overrides = (*TINY, "trainer.epochs=1", f"store.path={tmp_path}/r.duckdb")
    folder = tmp_path / "r.duckdb.runs" / run_key(compose(list(overrides)))
    folder.mkdir(parents=True)
    with FileLock(str(folder / ".lock")):  # another job trains this run
        returncode, err = _signal_when(overrides, lambda line: "by another job; waiting for it" in line)
    assert returncode == 255, err[-3000:]  # SystemExit(-1), as submitit's handler exits
    assert "stops for a requeue: the requeue signal arrived outside the training loop" in err


@pytest.mark.slow
def test_a_signal_after_the_last_training_step_stops_the_job_and_the_requeue_completes_it(tmp_path, cifar10_cached):
    """The final evaluation is outside the loop: the signal stops the job there (not swallowed until the kill)."""
    db = tmp_path / "r.duckdb"
    overrides = (*TINY, "dataset.train_size=256", "trainer.batch_size=64", "trainer.epochs=2", "trainer.log_every=0",
                 "eval.linear.enabled=true", "eval.linear.epochs=5", "eval.linear.copies=1", f"store.path={db}")
    # The last sync point; the final evaluation follows.
    returncode, err = _signal_when(overrides, lambda line: line.startswith("[train] epoch 2/2 step 4/4"))
    assert returncode == 255, err[-3000:]  # SystemExit(-1), as submitit's handler exits
    # Read at the epoch's end ("before the final evaluation") or landing in it ("the requeue signal arrived").
    assert "stops for a requeue:" in err
    store = Store(db)
    assert [r["status"] for r in store.query("SELECT status FROM runs")] == ["requeued"]
    assert store.query("SELECT count(*) AS n FROM evals")[0]["n"] == 0

    again = run_harness(*overrides)  # what the requeued job runs
    # The last epoch's checkpoint was written before the final evaluation: the requeued job only evaluates.
    assert "resumed from" in again.stderr and "[train] final evaluation" in again.stderr
    assert "epoch 2/2 step" not in again.stderr and "epoch 2/2 done" not in again.stderr
    assert [r["status"] for r in store.query("SELECT status FROM runs")] == ["completed"]
    epochs = store.query("SELECT list(epoch ORDER BY epoch) AS e FROM metrics WHERE name = 'loss'")[0]["e"]
    assert epochs == [1, 2]  # epochs count from 1 in every table
