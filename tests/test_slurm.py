"""Sweeps through a real Slurm cluster (the 2-node one .ci/system.d/slurm.sh starts on this machine).

Jobs are submitted from this environment: sbatch exports it, so the jobs' python imports this
checkout through PYTHONPATH (set by harness_env). Each test uses its own store and sweep folder.

Every test that submits Slurm jobs lives in this file: pytest-xdist (`--dist loadfile`, pyproject.toml)
runs one file's tests on one worker, one after another, so they never compete for the cluster's two
nodes, and a test that takes a node down never does so under another test's jobs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import optuna
import pytest

from harness.jobs import tuning
from harness.store import Store
from tests.conftest import REPO, Holder, harness_env, requires_cifar, run_harness
from tests.events import wait_for
from tests.test_store_cluster import read_only_rows


def _cluster_answers() -> str | None:
    """None when sinfo and sacct answer, else why not."""
    for tool in ("sinfo", "sacct", "sbatch", "scontrol"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH (start the local cluster: bash .ci/system.d/slurm.sh)"
    for cmd in (["sinfo", "-h"], ["sacct", "-n", "-X", "-S", "now"]):
        try:
            subprocess.run(cmd, capture_output=True, timeout=20, check=True)
        except (OSError, subprocess.SubprocessError) as e:
            return f"the Slurm cluster does not answer `{' '.join(cmd)}` ({e}); is SLURM_CONF set?"
    return None


WHY = _cluster_answers()
pytestmark = [requires_cifar, pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(WHY is not None, reason=WHY or "")]

# The smoke preset on the test cluster: its nodes have fake GPUs, the jobs train on the CPU.
SLURM = ("sweep=smoke", "launcher=slurm", "launcher.gpus_per_node=0", "launcher.timeout_min=20")


def args(tmp_path: Path, name: str, *overrides: str) -> list[str]:
    return [*SLURM, f"store.path={tmp_path}/r.duckdb", f"hydra.sweep.dir={tmp_path}/{name}", *overrides, "-m"]


def start(tmp_path: Path, name: str, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness", *args(tmp_path, name, *overrides)], cwd=REPO,
                            env=harness_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def job_ids(sweep_dir: Path) -> list[str]:
    """Slurm job ids of a sweep's points, in point order (submitit's folders: <id> or <array>_<index>)."""
    folder = sweep_dir / ".submitit"
    if not folder.exists():
        return []
    names = [p.name for p in folder.iterdir() if p.is_dir()]
    arrays = sorted((n for n in names if "_" in n), key=lambda n: int(n.split("_")[1]))
    return arrays or names


def cluster_report() -> str:
    """The cluster as a hang message shows it: nodes with their state and reason, the queue with each
    job's reason, and the daemons the CI keeper started again (.ci/system.d/slurm.sh)."""
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            return f"({' '.join(cmd)}: {e})"
    keeper = Path("/tmp/harness-slurm/log/keeper.log")
    return "\n".join(["nodes: " + out(["sinfo", "-h", "-N", "-o", "%N %T %E"]).replace("\n", "; "),
                      "queue: " + out(["squeue", "-h", "-o", "%i %T %r %N"]).replace("\n", "; "),
                      "daemons started again: " + (keeper.read_text().strip() if keeper.exists() else "none")])


def wait(what: str, check: Callable[[], object], driver: subprocess.Popen | None = None, **kwargs):
    """`wait_for` with the cluster's state in its hang message; with `driver`, a sweep driver that ends
    first fails the wait at once with its last lines (the event can no longer come)."""
    def checked():
        value = check()
        if not value and driver is not None and driver.poll() is not None:
            raise AssertionError(f"the sweep driver ended (exit {driver.returncode}) before {what}:\n"
                                 f"{driver.stderr.read()[-3000:]}\n{cluster_report()}")
        return value
    return wait_for(what, checked, explain=cluster_report, **kwargs)


UNFINISHED = ("PENDING", "RUNNING", "REQUEUED", "SUSPENDED", "COMPLETING", "RESIZING")


def ended_states(job: str) -> list[str]:
    """Every state accounting recorded for `job` (-D: its requeues too), once the last one is an end:
    slurmdbd records a job's end a moment after the job's result came back, so wait for that event."""
    def states() -> list[str] | None:
        found = subprocess.run(["sacct", "-j", job, "-X", "-D", "-n", "-o", "State"], capture_output=True,
                               text=True).stdout.split()
        return found if found and found[-1] not in UNFINISHED else None
    return wait(f"accounting to record job {job}'s end", states)


def restarts(job: str) -> int:
    """How many times Slurm has requeued `job` (a node failure requeues a job too)."""
    info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return int(info.split("Restarts=", 1)[1].split()[0]) if "Restarts=" in info else 0


def release_requeued(job: str, restarts_before: int) -> None:
    """Once `job` is requeued (again, after `restarts_before` requeues), let it start now instead of
    after Slurm's hold (about two minutes).

    A node refuses to launch a job in the wall-clock second in which the job's credential was revoked
    (the requeue's kill; slurmd logs "Job credential revoked", the job fails at once), so the release
    waits until that second, which accounting records as the requeued attempt's end, has passed: a rule
    of Slurm's, whatever the machine's speed (a loaded machine released the job within it)."""
    def requeued() -> bool:
        info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        return restarts(job) > restarts_before and "JobState=PENDING" in info

    def requeue_end() -> float | None:
        rows = subprocess.run(["sacct", "-j", job, "-X", "-D", "-n", "-P", "-o", "State,End"], capture_output=True,
                              text=True).stdout.split()
        ends = [row.split("|")[1] for row in rows if row.startswith(("REQUEUED|", "NODE_FAIL|"))]
        return datetime.fromisoformat(ends[-1]).timestamp() if ends and ends[-1][:1].isdigit() else None

    wait(f"job {job}'s requeue", requeued)
    ended = wait(f"accounting to record job {job}'s requeue", requeue_end)
    wait("the second of the requeue to pass", lambda: time.time() >= ended + 1, every=0.05)
    subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now"], check=True)


def kill_job_processes(job: str) -> None:
    """SIGKILL every process of `job` on this machine, its slurmstepd first (so that it reports nothing):
    what a node that fails takes with it."""
    def of_job(pid: Path) -> int:  # 2: the job's slurmstepd, 1: a process of the job, 0: neither
        try:
            if (pid / "cmdline").read_bytes().startswith(f"slurmstepd: [{job}.".encode()):
                return 2
            return int(f"SLURM_JOB_ID={job}".encode() in (pid / "environ").read_bytes().split(b"\0"))
        except OSError:
            return 0
    found = {int(p.name): of_job(p) for p in Path("/proc").iterdir() if p.name.isdigit()}
    for rank in (2, 1):
        for pid in (pid for pid, kind in found.items() if kind == rank):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def squeue_state(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def held_reason(job: str) -> str:
    """Why Slurm holds `job` pending for good ("launch failed requeued held": only `scontrol release` starts
    it again), or "" when it does not."""
    reason = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T|%r"], capture_output=True,
                            text=True).stdout.strip()
    return reason.split("|", 1)[1] if reason.startswith("PENDING|") and "held" in reason.lower() else ""


def not_held(job: str) -> bool:
    """True unless `job` is held for good, which fails a wait for it at once (the event can no longer come)."""
    reason = held_reason(job)
    if reason:
        raise AssertionError(f"job {job} is held ({reason}), it will not run again\n{cluster_report()}")
    return True


def log_of(sweep_dir: Path, job: str) -> str:
    files = list((sweep_dir / ".submitit" / job).glob("*_log.err"))
    return files[0].read_text(errors="replace") if files else ""


def test_smoke_sweep_runs_two_node_ddp_jobs_and_a_rerun_trains_nothing(tmp_path, cifar10_cached):
    out = run_harness(*args(tmp_path, "a", "launcher.nodes=2"), check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Sweep finished: 2 point(s): 2 completed." in out.stderr
    store = Store(tmp_path / "r.duckdb")
    runs = store.query("SELECT * FROM runs ORDER BY seed")
    assert [(r["seed"], r["status"], r["world_size"], r["nodes"]) for r in runs] == [
        (0, "completed", 2, "n1,n2"), (1, "completed", 2, "n1,n2")]
    assert all(r["lr"] > 0 and r["sweep_id"] == str(tmp_path / "a") for r in runs)
    # Only rank 0 wrote: one row per (run, epoch, metric), one eval row per (run, protocol, split).
    per = store.query("SELECT run_id, name, count(*) AS n FROM metrics GROUP BY ALL")
    assert per and all(r["n"] == 2 for r in per)
    assert store.query("SELECT count(*) AS n FROM evals")[0]["n"] == 2 * 2  # (val, test) × 2 runs
    # The summary's log column points at each job's own log file.
    logs = store.query("SELECT log_dir FROM sweep_points")
    assert all(Path(r["log_dir"]).is_file() and ".submitit" in r["log_dir"] for r in logs)

    counts = {t: store.query(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in ("runs", "metrics", "evals")}
    again = run_harness(*args(tmp_path, "b", "launcher.nodes=2"), check=False)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "Sweep finished: 2 point(s): 2 skipped." in again.stderr
    assert {t: store.query(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in counts} == counts


def test_a_requeued_job_resumes_from_its_checkpoint_without_gaps(tmp_path, cifar10_cached):
    epochs = 4
    driver = start(tmp_path, "a", "hydra.sweeper.params={}", "seed=0", f"trainer.epochs={epochs}",
                   "dataset.train_size=1024")
    try:
        sweep_dir = tmp_path / "a"
        job = wait("the job", lambda: (job_ids(sweep_dir) or [None])[0], driver)
        # Three epochs are left when the signal is sent: the job is still training when it arrives.
        wait("the first epoch", lambda: "epoch 1/4 done" in log_of(sweep_dir, job), driver, every=0.05)
        # What Slurm does before the time limit or on preemption (--signal=USR2@...): signal the job's tasks.
        requeues = restarts(job)
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        release_requeued(job, requeues)
        out, err = driver.communicate(timeout=600)
    finally:
        driver.kill()
    assert driver.returncode == 0, err[-4000:]
    log = log_of(sweep_dir, job)
    assert "this job is preempted" in log  # submitit's handler ran after ours: it requeued the job
    assert f"[train] resumed from {tmp_path}/r.duckdb.runs/" in log
    store = Store(tmp_path / "r.duckdb")
    assert [r["status"] for r in store.query("SELECT status FROM runs")] == ["completed"]  # the same run went on
    rows = store.query("SELECT name, list(epoch ORDER BY epoch) AS epochs FROM metrics GROUP BY name")
    assert rows and all(r["epochs"] == list(range(1, epochs + 1)) for r in rows)  # epochs count from 1
    states = ended_states(job)
    assert "REQUEUED" in states and states[-1] == "COMPLETED"
    assert "1 completed" in err


def test_a_job_requeued_by_a_node_failure_is_waited_for_not_collected_as_failed(tmp_path):
    # A node fails under a running job: Slurm ends the attempt (NODE_FAIL) and requeues the job, and for
    # a few seconds accounting says NODE_FAIL, so submitit calls the job done; the sweep driver must wait
    # for the next attempt instead of recording the point failed (as it did before).
    import submitit

    from hydra_plugins.harness_launchers.launchers import as_they_end

    started, flag = tmp_path / "started", tmp_path / "finish"
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    executor.update_parameters(timeout_min=10, nodes=1, tasks_per_node=1)
    job = executor.submit(submitit.helpers.CommandFunction(
        ["bash", "-c", f"touch {started}; until [ -e {flag} ]; do sleep 0.05; done; echo finished"]))
    node = None
    try:
        # Its command running, not only squeue's RUNNING: a slurmstepd killed while it still sets the job up
        # leaves the job's script in the node's spool, and the next attempt then fails to launch ("File
        # exists") and is held for good (seen once, when the kill came 40 ms after the launch).
        wait(f"job {job.job_id}'s command to start", started.exists)
        node = subprocess.run(["squeue", "-h", "-j", job.job_id, "-o", "%N"], capture_output=True,
                              text=True).stdout.strip()
        requeues = restarts(job.job_id)
        # A failed node takes the job's processes with it, before anything could report or write: killed
        # first, since Slurm, told the node is down, would signal them (SIGTERM) through the node's slurmd
        # (alive here) and the job would write a failed result. Left alive, the old attempt would also meet
        # the next one on the same node, which drains it ("Duplicate jobid").
        kill_job_processes(job.job_id)
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=harness test: node failure"],
                       check=True)

        def accounting_says() -> str:
            rows = subprocess.run(["sacct", "-j", job.job_id, "-X", "-n", "-o", "State"], capture_output=True,
                                  text=True).stdout.split()
            return rows[-1] if rows else ""
        wait("accounting to record the node failure", lambda: accounting_says() == "NODE_FAIL", every=0.05)
        # The trap, sprung at the event: accounting shows the failed attempt (for a few seconds).
        assert job.done(force_check=True), f"submitit did not see the node failure ({job.state})"
        collected: list[object] = []

        def collect(_: int) -> object:
            collected.append("collect called")  # at once: submitit itself waits 15 s for a late result file
            try:
                collected.append(job.result())
            except Exception as e:  # noqa: BLE001 - what collecting too early raises is the failure
                collected.append(e)
            return collected[-1]

        class Watched:
            """The job, counting the driver's looks at it."""
            looks = 0

            def __getattr__(self, name: str) -> object:
                return getattr(job, name)

            def done(self) -> bool:
                Watched.looks += 1
                return job.done()
        driver = threading.Thread(target=as_they_end, args=({0: Watched()}, collect), daemon=True)
        driver.start()
        release_requeued(job.job_id, requeues)  # its node is back: its slurmd answers (ReturnToService=2)
        wait(f"the driver's first look, and job {job.job_id} running again",
             lambda: not_held(job.job_id) and Watched.looks and squeue_state(job.job_id) == "RUNNING")
        assert not collected, f"the driver collected the requeued job: {collected}"
        flag.touch()
        driver.join(timeout=300)  # a hang guard only: the result file ends the wait at the next poll
        assert not driver.is_alive(), "the driver did not notice the job's end"
    finally:
        flag.touch()
        if held_reason(job.job_id):  # it would never end by itself: the test has failed already
            subprocess.run(["scancel", job.job_id], capture_output=True)
        states = ended_states(job.job_id)
        if node:  # back by itself (ReturnToService=2) unless something drained it: the next tests need both
            subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)
    assert collected == ["collect called", "finished"]
    assert "NODE_FAIL" in states
    assert "drain" not in subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True).stdout


def test_a_cancelled_point_fails_with_a_reason_and_a_rerun_trains_only_it(tmp_path, cifar10_cached):
    overrides = ("trainer.epochs=4", "dataset.train_size=768")
    driver = start(tmp_path, "a", *overrides)
    try:
        sweep_dir = tmp_path / "a"
        jobs = wait("both jobs", lambda: len(job_ids(sweep_dir)) == 2 and job_ids(sweep_dir), driver)
        # Seed 1's first epoch (its checkpoint and metrics rows) is done: freeze the job where it is, so
        # the cancel lands mid-run however fast the machine trains the three epochs left.
        wait("seed 1's first epoch", lambda: "epoch 1/4 done" in log_of(sweep_dir, jobs[1]), driver,
             every=0.05)
        subprocess.run(["scontrol", "suspend", jobs[1]], check=True)
        wait("the suspension", lambda: squeue_state(jobs[1]) == "SUSPENDED")
        assert "epoch 4/4 done" not in log_of(sweep_dir, jobs[1])
        subprocess.run(["scancel", jobs[1]], check=True)
        # The driver finds the cancelled job at its next poll (not after seed 0's job) and marks its run
        # lost at once, long before store.lost_after_s (900 s) could.
        store = Store(tmp_path / "r.duckdb")
        wait("the cancelled run to be marked lost", lambda: store.query(
            "SELECT error FROM runs WHERE seed = 1 AND status = 'lost'"), guard_s=600)
        out, err = driver.communicate(timeout=600)
    finally:
        driver.kill()
    assert driver.returncode == 1, err[-4000:]
    assert "Sweep finished: 2 point(s): 1 completed, 1 failed." in err
    line = next(x for x in err.splitlines() if x.startswith("seed=1") and " failed " in x)
    assert "CANCELLED" in line and f".submitit/{jobs[1]}/" in line

    again = run_harness(*args(tmp_path, "b", *overrides), check=False)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "Sweep finished: 2 point(s): 1 completed, 1 skipped." in again.stderr
    store = Store(tmp_path / "r.duckdb")
    points = {r["overrides"].split()[0]: r["status"] for r in store.query(
        "SELECT overrides, status FROM sweep_points WHERE sweep_id = ?", [str(tmp_path / "b")])}
    assert points == {"seed=0": "skipped", "seed=1": "completed"}
    # The lost run was continued from its checkpoint (or closed as failed when it had none).
    statuses = [r["status"] for r in store.query("SELECT status FROM runs")]
    assert statuses.count("completed") == 2 and "running" not in statuses and "lost" not in statuses


def test_a_bad_launcher_config_is_refused_before_submission(tmp_path):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    bad = run_harness(*args(tmp_path, "a", "launcher.partition=nope", "launcher.timeout_min=0"), check=False)
    assert bad.returncode == 2
    for text in ("sweep refused, nothing was run or submitted", "launcher.timeout_min = 0 is not allowed: expected an "
                 "integer >= 1", "launcher.partition = 'nope' is not allowed: expected one of debug"):
        assert text in bad.stderr, bad.stderr[-3000:]
    nodes = run_harness(*args(tmp_path, "c", "launcher.nodes=3"), check=False)
    assert "launcher.nodes = 3 is not allowed: expected at most 2 (nodes in partition debug)" in nodes.stderr
    assert not any((tmp_path / d / ".submitit").exists() for d in "ac")
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before


def test_a_tuned_sweep_prunes_and_continues_after_its_driver_is_killed(tmp_path, cifar10_cached):
    tune = ("hydra/sweeper=harness_optuna", "hydra.sweeper.params={}", "seed=0", "trainer.epochs=2",
            "dataset.train_size=256", "hydra.sweeper.study_name=tune", "hydra.sweeper.n_trials=6",
            "hydra.sweeper.n_jobs=2", "trainer.lr=tag(log,interval(0.01,1.0))", "method.temperature=choice(0.1,0.5)",
            "hydra.sweeper.pruner=percentile", "hydra.sweeper.percentile=0", "hydra.sweeper.n_startup_trials=1",
            "hydra.sweeper.n_warmup_steps=0")
    journal = tuning.journal_path(tmp_path / "r.duckdb", "tune")

    def trials() -> list:
        if not journal.exists():
            return []
        try:
            return optuna.load_study(study_name="tune", storage=tuning.storage(journal)).trials
        except KeyError:  # the journal file exists a moment before the study's first record does
            return []

    driver = start(tmp_path, "a", *tune)
    try:
        # Kill the driver while its second batch is in flight (2 trials told, 2 more asked).
        wait("the second batch", lambda: len(trials()) >= 4, driver, guard_s=600)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        driver.kill()
    assert any(t.state == optuna.trial.TrialState.RUNNING for t in trials())

    again = run_harness(*args(tmp_path, "b", *tune), check=False, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "continuing" in again.stderr
    done = trials()
    assert [t.number for t in done] == list(range(6))  # the study went on: 6 trials, not 4 + 6
    assert all(t.state.is_finished() for t in done)
    pruned = [t for t in done if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, [t.state for t in done]
    runs = Store(tmp_path / "r.duckdb").query("SELECT status FROM runs WHERE status = 'pruned'")
    assert len(runs) >= 1


def sacct_jobs(name: str) -> list[dict[str, str]]:
    """The allocation record of this user's jobs called `name` (array tasks one each)."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-S", "now-1hour", "--name", name, "-o", "JobID,State,Start,End"],
                         capture_output=True, text=True, check=True).stdout
    return [dict(zip(("id", "state", "start", "end"), line.split("|"))) for line in out.splitlines() if line]


def sacct_job(job: str) -> dict[str, str]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "JobID,State,Start,End"], capture_output=True,
                         text=True, check=True).stdout
    return dict(zip(("id", "state", "start", "end"), out.splitlines()[-1].split("|")))


def real_image_tree(root: Path, data, per_class_train: int, per_class_test: int) -> None:
    """A train/<class>/*.png, test/<class>/*.png tree of real CIFAR-10 images (a dataset with a cold cache)."""
    from PIL import Image

    from harness.core.data.datasets import balanced_subset

    for split, xs, ys, n in (("train", data.train_x, data.train_y, per_class_train),
                             ("test", data.test_x, data.test_y, per_class_test)):
        for i in balanced_subset(ys, 10 * n, seed=0).tolist():
            path = root / split / data.classes[int(ys[i])] / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(xs[i].permute(1, 2, 0).numpy()).save(path)


STAGES = ("dataset-cache", "scorecl-score-net", "clsp-diffusion", "clsp-shards", "clsp-assemble")


def test_shared_stages_run_once_as_jobs_before_the_points_and_a_signalled_stage_resumes(tmp_path, cifar10_cached):
    """ScoreCL and CLSP on 2 seeds over a dataset nobody has decoded: every shared artifact is one stage
    job (the CLSP shards one array), each after the ones it needs and before the training jobs; the
    DDPM's job, sent the pre-timeout signal mid-training, is requeued and resumes from its saved state."""
    before = {j["id"] for name in STAGES for j in sacct_jobs(name)}
    real_image_tree(tmp_path / "tree", cifar10_cached, per_class_train=40, per_class_test=10)
    driver = start(tmp_path, "a", "dataset=imagefolder", f"dataset.root={tmp_path}/tree", "dataset.image_size=32",
                   f"dataset.cache_dir={tmp_path}/cache", "dataset.train_size=256", "dataset.val_size=64",
                   "dataset.test_size=null", "weighting=scorecl_tiny", "positives=clsp_tiny", "positives.ratio=0.5",
                   "trainer.epochs=1", "positives.diffusion.epochs=4", "positives.diffusion.checkpoint_every=1")
    try:
        # The DDPM's job saved its first training state: send what Slurm sends before the time limit.
        wait("the DDPM's first saved state",
             lambda: list((tmp_path / "r.duckdb.artifacts" / "diffusion").glob("*.partial/train_state.pt")),
             driver, every=0.05, guard_s=900)  # three of its four epochs are left when the signal arrives
        ddpm = [j for j in sacct_jobs("clsp-diffusion") if j["id"] not in before][0]["id"]
        requeues = restarts(ddpm)
        subprocess.run(["scancel", "--signal=USR2", ddpm], check=True)
        release_requeued(ddpm, requeues)
        out, err = driver.communicate(timeout=1500)
    finally:
        driver.kill()
    assert driver.returncode == 0, err[-4000:]
    assert "Sweep finished: 2 point(s): 2 completed." in err
    assert err.count("queued on Slurm") == 1  # both seeds share every stage: one submission of each
    stages = {name: [j for j in sacct_jobs(name) if j["id"] not in before] for name in STAGES}
    assert [len(stages[n]) for n in STAGES] == [1, 1, 1, 2, 1]  # the shards: one array task each
    assert all(j["state"] == "COMPLETED" for jobs in stages.values() for j in jobs)
    # Each stage started after the ones it needs ended; the training jobs after all of them.
    ended = {name: max(j["end"] for j in jobs) for name, jobs in stages.items()}
    started = {name: min(j["start"] for j in jobs) for name, jobs in stages.items()}
    assert started["scorecl-score-net"] >= ended["dataset-cache"]
    assert started["clsp-diffusion"] >= ended["dataset-cache"]
    assert started["clsp-shards"] >= ended["clsp-diffusion"]
    assert started["clsp-assemble"] >= ended["clsp-shards"]
    sweep_dir = tmp_path / "a"
    training = job_ids(sweep_dir)
    assert len(training) == 2
    for job in training:
        assert sacct_job(job)["start"] >= max(ended.values())
        log = log_of(sweep_dir, job)
        assert "[train]" in log
        for built in ("[stage]", "[artifact] building", "[clsp] shard", "[data] decoding"):
            assert built not in log  # nothing built in training
    # The signalled DDPM job stopped, was requeued, and its second start went on from the saved state.
    ddpm_log = next((sweep_dir / ".stages" / ddpm).glob("*_log.err")).read_text(errors="replace")
    assert "[stage] clsp-diffusion stops for a requeue" in ddpm_log and "this job is preempted" in ddpm_log
    assert "[diffusion] resuming training at epoch" in ddpm_log
    states = ended_states(ddpm)
    assert "REQUEUED" in states and states[-1] == "COMPLETED"
    store = Store(tmp_path / "r.duckdb")
    runs = store.query("SELECT status FROM runs")
    assert [r["status"] for r in runs] == ["completed"] * 2
    share = store.query("SELECT value FROM metrics WHERE name = 'synthetic_share'")
    assert len(share) == 2 and all(abs(r["value"] - 0.5) < 0.02 for r in share)
    assert len(store.query("SELECT value FROM metrics WHERE name = 'weight_mean'")) == 2  # ScoreCL weighted both


def test_a_64_task_job_array_completes_while_the_database_is_held_and_every_row_arrives(tmp_path, cifar10_cached):
    db = tmp_path / "r.duckdb"
    Store(db).ingest()
    points = 64
    # Each task as small as the config allows: 128 training images of which 64 are held out for validation
    # (one step of the smoke preset's batch of 64), 64 test images, one epoch, one CPU thread. What is checked
    # is the rows, not what was learnt: a task's cost is then mostly its start (Python, torch, the config).
    sweep = ("sweep=smoke", "launcher=slurm", "launcher.gpus_per_node=0", "launcher.timeout_min=30",
             "dataset.train_size=128", "dataset.val_size=64", "dataset.test_size=64", "trainer.epochs=1",
             "hydra.sweeper.params={}", f"seed=range(0,{points})",
             f"store.path={db}", f"hydra.sweep.dir={tmp_path}/a", "store.summary_wait_s=0", "-m")
    holder = Holder(db)  # held for the whole sweep: a job that opened the database would wait, then fail
    try:
        out = subprocess.run([sys.executable, "-m", "harness", *sweep], cwd=REPO, env=harness_env(OMP_NUM_THREADS="1"),
                             capture_output=True, text=True, timeout=3600)
    finally:
        holder.release()
    assert out.returncode == 0, out.stderr[-4000:]
    tasks = [p.name for p in (tmp_path / "a" / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name)]
    assert len(tasks) == points and len({t.split("_")[0] for t in tasks}) == 1  # one job array of 64 tasks
    assert len(list((tmp_path / "r.duckdb.runs").glob("*/done.json"))) == points
    assert "ingest them with: python -m harness.store ingest" in out.stderr  # the driver could not ingest

    Store(db).ingest()
    assert read_only_rows(db, "SELECT status, count(*) FROM runs GROUP BY status") == [("completed", points)]
    assert read_only_rows(db, "SELECT count(DISTINCT seed) FROM runs") == [(points,)]
    per_run = read_only_rows(db, "SELECT DISTINCT n FROM (SELECT run_id, count(*) AS n FROM metrics GROUP BY run_id)")
    assert len(per_run) == 1 and per_run[0][0] > 0  # every run has all its metric rows
    assert read_only_rows(db, "SELECT count(*) FROM evals") == [(points * 2,)]  # val and test per run
    assert read_only_rows(db, "SELECT status, count(*) FROM sweep_points GROUP BY status") == [("completed", points)]
    assert Store(db).pending() == 0 and Store(db).rejected() == 0
