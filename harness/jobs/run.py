"""One job: validate → run key → skip if done → stages → train → evaluate → record.

``run(cfg)`` is what Hydra calls for every point of a sweep, on every rank of a job. It returns
the objective (k-NN top-1 of the first configured protocol, on the validation split when one is
held out, else on the test split) so a sweeper can use it, also for runs skipped as done.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import resource
import subprocess
import sys
import traceback
import uuid
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from harness.atomic import write_text_atomic
from harness.core import distributed, preempt
from harness.core.checkpoint import has_checkpoint, previous_path, remove_checkpoints
from harness.core.data.datasets import DecodeFailed
from harness.core.data.encoded import load_dataset
from harness.core.data.normalization import resolve_normalization
from harness.core.evaluate import knn_protocol
from harness.core.optim import scaled_lr
from harness.core.trainer import Diverged, fit, knn_settings
from harness.export import torchvision_weights, write_weights
from harness.jobs import tuning
from harness.jobs.config import build_addons, experiment_config, instantiate, run_key, validate
from harness.jobs.loggers import RunLoggers
from harness.jobs.saved import WEIGHTS
from harness.jobs.stages import run_in_job
from harness.jobs.transfer import run_transfer
from harness.store import DONE_MARKER, SWEEP_ENV, Heartbeat, Store, StoreBusy, last_row, read_done, utcnow, write_done

REPO = Path(__file__).resolve().parents[2]


@lru_cache(maxsize=1)
def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the harness source tree, or (None, None) outside a git checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


class RunFailed(RuntimeError):
    """The run ended for a reason that one line says fully (e.g. a full disk); no traceback is due."""


# Errors of a write that the user fixes outside the harness (free space, quota, file size limit).
WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def describe_os_error(error: OSError) -> str:
    """'no space left on device writing /runs/KEY/checkpoint.pt' from an OSError."""
    cause = error.strerror or str(error)
    text = cause[:1].lower() + cause[1:]
    return f"{text} writing {error.filename}" if error.filename else text


def run_dir(cfg: DictConfig, key: str) -> Path:
    """Where a run keeps its checkpoint and config: <store>.runs/<run_key>/ unless store.runs_dir says."""
    root = cfg.store.get("runs_dir") or str(Path(cfg.store.path).expanduser().absolute()) + ".runs"
    return Path(root).expanduser() / key


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _broadcast(value, info: distributed.DistInfo):
    if info.world_size == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def run_row(cfg: DictConfig, key: str, run_id: str, info: distributed.DistInfo, hosts: list[str]) -> dict:
    """The runs-table row of this run as it starts."""
    commit, dirty = git_state()
    positives = OmegaConf.select(cfg, "positives.name", default="none")
    weighting = OmegaConf.select(cfg, "weighting.name", default="none")
    choices = _hydra_choices()
    return {
        "run_id": run_id,
        "run_key": key,
        "name": cfg.get("name"),
        "status": "running",
        "method": cfg.method.name,
        # an image folder preset (dataset=imagenet) records the data set's own name (dataset.recorded_as)
        "dataset": OmegaConf.select(cfg, "dataset.recorded_as", default=None) or cfg.dataset.name,
        "backbone": cfg.backbone.name,
        "weighting": weighting,
        "positives": positives,
        "weighting_variant": choices.get("weighting") or weighting,
        "positives_variant": choices.get("positives") or positives,
        "synthetic_ratio": float(OmegaConf.select(cfg, "positives.ratio", default=0.0) or 0.0)
        if positives != "none" else 0.0,
        "seed": int(cfg.seed),
        "epochs": int(cfg.trainer.epochs),
        "batch_size": int(cfg.trainer.batch_size),
        "lr": scaled_lr(float(cfg.trainer.lr), int(cfg.trainer.batch_size), int(cfg.trainer.base_batch),
                        cfg.trainer.lr_scaling),
        "config": json.dumps(experiment_config(cfg, info.world_size), sort_keys=True, default=str),
        "git_commit": commit,
        "git_dirty": dirty,
        "host": hosts[0],
        "device_name": _device_name(info.device),
        "world_size": info.world_size,
        "nodes": ",".join(sorted(set(hosts))),
        "sweep": cfg.get("sweep_name"),
        "sweep_id": os.environ.get(SWEEP_ENV),
        "started_at": utcnow(),
        "epochs_done": 0,
    }


def peak_memory(device: torch.device) -> dict[str, float | None]:
    """This process's peak host RSS and, on a GPU, its peak allocated device memory, in MB."""
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    on_device = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_host_rss_mb": peak_kb / 1024, "peak_device_mb": on_device}


def _hydra_choices() -> dict[str, str]:
    """The config options Hydra chose per group ({"weighting": "scorecl_tiny"}); empty outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return {k: v for k, v in HydraConfig.get().runtime.choices.items() if isinstance(v, str)}
    except (ImportError, ValueError):
        return {}


def _hydra_context() -> tuple[str | None, str | None]:
    """(this job's overrides, its log: submitit's stderr file on Slurm, else the Hydra job folder)."""
    overrides, log = None, None
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        # The trial bookkeeping of a tuned sweep (+optuna.*) is noise in the summary table.
        overrides = " ".join(o for o in hc.overrides.task if not o.startswith("+optuna."))
        log = hc.runtime.output_dir
    except (ImportError, ValueError):
        pass
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        try:
            import submitit

            log = str(submitit.JobEnvironment().paths.stderr)
        except Exception:  # noqa: BLE001 - the log path is a convenience, never a reason to fail
            pass
    return overrides, log


def _store(cfg: DictConfig) -> Store:
    return Store(cfg.store.path, cfg.store.get("runs_dir"))


def run(cfg: DictConfig) -> float | None:
    """Run (or skip) the job described by `cfg` on this rank; returns the objective."""
    validate(cfg)
    # The world size is part of the key with trainer.sync_bn=false; it is read from the environment
    # by the same rule distributed.setup follows, so the key is known before the process group starts.
    key = run_key(cfg, distributed.expected_world_size())
    preempt.install()  # before the process group: from now on a signal requeues the job (harness/core/preempt.py)
    outcome = {"status": "failed", "objective": None, "error": None, "run_id": None}
    requeue = False
    info = None
    try:
        with preempt.stop_at_once():  # outside the training loop a signal stops the job where it lands
            info = distributed.setup(cfg.trainer.device)
            return _run(cfg, key, info, outcome)
    except preempt.Preempted as e:
        outcome.update(status="requeued", error=str(e))
        requeue = True
        print(f"[harness] run {key} stops for a requeue: {e}", file=sys.stderr, flush=True)
    except BaseException as e:
        outcome["error"] = traceback.format_exception_only(type(e), e)[-1].strip()
        raise
    finally:
        sweep_id = os.environ.get(SWEEP_ENV)
        if sweep_id and info is not None and info.is_main:
            overrides, log_dir = _hydra_context()
            _store(cfg).write("sweep_points", [{
                "sweep_id": sweep_id, "run_key": key, "overrides": overrides, "log_dir": log_dir,
                "finished_at": utcnow(), **outcome}], keep_in=run_dir(cfg, key))
        distributed.teardown()
        if info is not None and info.is_main and not sweep_id and "SLURM_JOB_ID" not in os.environ:
            _ingest_local(_store(cfg))
    if requeue:
        preempt.hand_over()  # submitit requeues the job (rank 0) and every rank exits
    return None


LOCK_POLL_S = 10.0


def _run_key_lock(folder: Path, key: str, info: distributed.DistInfo) -> FileLock | None:
    """Rank 0 takes the run key's lock (None on the other ranks); every rank returns once it is held.

    While another job holds it, rank 0 tries again for LOCK_POLL_S seconds at a time and tells the
    other ranks after each try, so none of them waits in a collective longer than that (one that
    waits past the process group's timeout would fail the job while rank 0 still waits).
    """
    lock = FileLock(str(folder / ".lock")) if info.is_main else None
    timeout = 0.0
    while True:
        held = lock is None
        if lock is not None:
            try:
                lock.acquire(timeout=timeout)
                held = True
            except Timeout:
                if timeout == 0:
                    print(f"[harness] run {key} is being trained by another job; waiting for it", file=sys.stderr,
                          flush=True)
                timeout = LOCK_POLL_S
        if _broadcast(held, info):
            return lock


def _ingest_local(store: Store) -> None:
    """A local run is its own ingester: its rows are in the database when it ends, unless someone holds it."""
    try:
        store.ingest(timeout=0)  # never wait: the rows are safe in the spool and the run folder
    except StoreBusy:
        print(f"[harness] {store.path} is open in another process: this run's rows wait in {store.spool}; "
              f"ingest them with: {store.ingest_command()}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - the run is recorded in files; the index can be rebuilt
        print(f"[harness] could not ingest into {store.path} ({type(e).__name__}: {e}); the rows wait in "
              f"{store.spool}; ingest them with: {store.ingest_command()}", file=sys.stderr)


def _close_abandoned_attempt(store: Store, folder: Path) -> None:
    """Mark failed the runs row of an earlier attempt that was killed before its first checkpoint.

    Such an attempt left its row `running` and nothing to resume from; this attempt gets a new run id,
    so without this the dead row would count as running forever. Read from the run folder's own copy
    of its rows: a job never reads the database.
    """
    row = last_row(folder, "runs")
    if row is not None and row.get("status") in ("running", "requeued", "lost"):
        store.write("runs", [{**row, "status": "failed", "finished_at": utcnow(),
                              "error": "killed before its first checkpoint (no end was recorded)"}], keep_in=folder)


def _run(cfg: DictConfig, key: str, info: distributed.DistInfo, outcome: dict) -> float | None:
    store = _store(cfg)
    folder = run_dir(cfg, key)
    checkpoint = folder / "checkpoint.pt"
    lock = None
    decision = None
    if info.is_main:
        folder.mkdir(parents=True, exist_ok=True)
    # One job per run key at a time: a second one waits here, then finds the run done.
    lock = _run_key_lock(folder, key, info)
    if info.is_main:
        # The done marker, not the database: jobs never open it (see harness.store).
        done = None if cfg.force else read_done(folder)
        if done is not None:
            decision = ("skip", done.get("objective"), done["run_id"])
        else:
            if cfg.force:
                (folder / DONE_MARKER).unlink(missing_ok=True)
                remove_checkpoints(checkpoint)
            resume = folder / "run_id"
            run_id = resume.read_text().strip() if has_checkpoint(checkpoint) and resume.exists() else ""
            if not run_id:
                _close_abandoned_attempt(store, folder)
                run_id = uuid.uuid4().hex[:12]
            write_text_atomic(resume, run_id)  # a kill mid-write must not leave an empty run id
            write_text_atomic(folder / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
            decision = ("train", None, run_id)
    try:
        action, objective, run_id = _broadcast(decision, info)
        outcome["run_id"] = run_id
        if action == "skip":
            outcome.update(status="skipped", objective=objective)
            if info.is_main:
                print(f"[harness] run {key} already completed (run {run_id}): skipped; objective {objective}",
                      file=sys.stderr)
                if cfg.eval.get("transfer"):  # not in the run key: a finished run is probed by the evaluate command
                    print(f"[harness] eval.transfer does not re-run a finished run; probe it with: python -m "
                          f"harness.evaluate {key} --db {store.path} dataset=NAME [dataset.root=PATH]", file=sys.stderr)
            return objective
        return _train_and_record(cfg, key, run_id, info, store, checkpoint, outcome)
    finally:
        if lock is not None:
            lock.release()


def earlier_attempts(folder: Path, run_id: str) -> tuple[float, int]:
    """(seconds, count) of this run's earlier attempts (a requeue, or a kill after a checkpoint), from the
    run folder's copy of its last runs row. Time after that row (a SIGKILL mid-epoch) is not known."""
    row = last_row(folder, "runs")
    if row is None or row.get("run_id") != run_id:
        return 0.0, 0
    return float(row.get("wall_seconds") or 0.0), int(row.get("attempts") or 1)


def trim_checkpoints(checkpoint: Path, keep: str) -> None:
    """What a completed run keeps (store.keep_checkpoints): `all`, `last` (not the one before it) or
    `weights` (neither: the backbone's weights, written before the done marker, are what stays)."""
    if keep in ("last", "weights"):
        previous_path(checkpoint).unlink(missing_ok=True)
    if keep == "weights":
        checkpoint.unlink(missing_ok=True)


def _train_and_record(cfg, key, run_id, info, store: Store, checkpoint: Path, outcome: dict) -> float | None:
    """Train, evaluate and record this attempt of run `run_id`, under its heartbeat."""
    # While this attempt lives its folder says so; a process killed without a word stops beating and
    # an ingester marks the run lost (harness.store.mark_lost).
    heartbeat = (Heartbeat(checkpoint.parent, run_id, float(cfg.store.get("heartbeat_s", 60)),
                           float(cfg.store.get("lost_after_s", 900))) if info.is_main else contextlib.nullcontext())
    with heartbeat:
        return _attempt(cfg, key, run_id, info, store, checkpoint, outcome)


def _attempt(cfg, key, run_id, info, store: Store, checkpoint: Path, outcome: dict) -> float | None:
    """Train and evaluate; the runs row says how it ended (completed, diverged, pruned, requeued, failed)."""
    attempt = Attempt(cfg, key, run_id, info, store, checkpoint, outcome)
    try:
        model, result = attempt.train()
    except BaseException as e:  # noqa: BLE001 - every end is recorded; ended_early re-raises what is not an end
        return attempt.ended_early(e)
    finally:
        attempt.close_views()
    return attempt.completed(model, result)


class Attempt:
    """One attempt of a run (the first, or a resumption): its runs row, kept up to date as it goes, its
    metrics rows, and its end."""

    def __init__(self, cfg, key: str, run_id: str, info: distributed.DistInfo, store: Store, checkpoint: Path,
                 outcome: dict):
        self.cfg, self.key, self.run_id, self.info, self.store = cfg, key, run_id, info, store
        self.checkpoint, self.folder, self.outcome = checkpoint, checkpoint.parent, outcome
        torch.manual_seed(int(cfg.seed) * 7919 + info.rank)
        if cfg.trainer.get("num_threads"):
            torch.set_num_threads(int(cfg.trainer.num_threads))
        self.row = run_row(cfg, key, run_id, info, distributed.all_hosts(info.host))
        self.earlier = earlier_attempts(self.folder, run_id) if info.is_main else (0.0, 0)
        self.row["attempts"] = self.earlier[1] + 1
        self.trial = tuning.open_trial(cfg) if info.is_main else None  # an Optuna trial, in tuned sweeps
        self.views: RunLoggers | None = None  # TensorBoard / W&B, fed the rows the store gets (main process)

    def record(self, **changes) -> None:
        """Update the runs row and publish it (main process)."""
        row = self.row
        row.update(changes)
        # Every attempt's time, not only this one's: cost is what all of them took. This attempt's
        # share is measured on the same clock as started_at/finished_at, so the columns agree.
        now = datetime.fromisoformat(row.get("finished_at") or utcnow())
        row["wall_seconds"] = self.earlier[0] + max((now - datetime.fromisoformat(row["started_at"])).total_seconds(),
                                                    0.0)
        row["gpu_hours"] = row["wall_seconds"] / 3600 * self.info.world_size if self.info.device.type == "cuda" \
            else None
        row.update(peak_memory(self.info.device))
        if self.info.is_main:
            self.store.write("runs", [row], keep_in=self.folder)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """An epoch's metrics rows (the trainer's callback), then Optuna's verdict on it."""
        info = self.info
        if info.is_main:
            # The store counts epochs from 1 (the trainer's `epoch` from 0): row N = after N epochs.
            self.store.write("metrics", [{"run_id": self.run_id, "run_key": self.key, "epoch": epoch + 1, "name": k,
                                          "value": v} for k, v in metrics.items()], keep_in=self.folder)
            if self.views is not None:
                self.views.log(epoch + 1, metrics)
            self.record(epochs_done=epoch + 1)
        if "knn_top1" in metrics and _broadcast(tuning.should_prune(self.trial, epoch, metrics["knn_top1"]), info):
            raise tuning.Pruned(f"pruned by Optuna after epoch {epoch + 1}: knn_top1 {metrics['knn_top1']:.2f}",
                                metrics["knn_top1"])

    def train(self):
        """The row as it starts, the shared artifacts, the data, the model, then `fit`: (model, result)."""
        cfg, info = self.cfg, self.info
        self.record()  # inside the caller's try: a full disk already here ends the run in one line too
        if info.is_main:
            self.views = RunLoggers(cfg, self.folder, self.key, self.run_id)
        run_in_job(cfg)  # the shared artifacts: found when the sweep staged them, else built here
        data = load_dataset(cfg.dataset)
        # dataset.mean/std: auto -> numbers, key unchanged
        cfg = self.cfg = resolve_normalization(cfg, verbose=info.is_main)
        model = instantiate(cfg.method, instantiate(cfg.backbone))
        result = fit(cfg, model, data, info, self.checkpoint, self.log_epoch,
                     build_addons(cfg, model.backbone.feat_dim))
        return model, result

    def close_views(self) -> None:
        if self.views is not None:
            self.views.close()

    def ended_early(self, e: BaseException) -> float | None:
        """Record an attempt that ended before completing; returns the objective a sweeper gets for a
        diverged or pruned run, and re-raises everything else (call it inside `except`)."""
        key, info = self.key, self.info
        if isinstance(e, Diverged):
            self.record(status="diverged", error=str(e), finished_at=utcnow())
            self.outcome.update(status="diverged", error=str(e))
            print(f"[harness] run {key} diverged: {e}", file=sys.stderr)
            return float("nan")
        if isinstance(e, tuning.Pruned):
            self.record(status="pruned", error=str(e), finished_at=utcnow(), objective=e.value)
            self.outcome.update(status="pruned", error=str(e), objective=e.value)
            if info.is_main:
                tuning.mark_pruned(self.trial)
                print(f"[harness] run {key} {e}", file=sys.stderr)
            return e.value
        if isinstance(e, preempt.Preempted):
            self.record(status="requeued", error=str(e))
            raise e
        if isinstance(e, DecodeFailed) or (isinstance(e, OSError) and e.errno in WRITE_FAILURES):
            # A full disk (or quota) while checkpointing or spooling, a decode worker killed: one line, not a
            # chained traceback; the temporary files are already gone (harness.atomic).
            message = f"run {key} failed: {describe_os_error(e) if isinstance(e, OSError) else e}"
            try:
                self.record(status="failed", error=message, finished_at=utcnow())
            except OSError as again:
                message += f" (the run could not be marked failed: {describe_os_error(again)})"
            raise RunFailed(f"[harness] {message}") from e
        self.record(status="failed", error=traceback.format_exception_only(type(e), e)[-1].strip(),
                    finished_at=utcnow())
        raise e

    def completed(self, model, result) -> float:
        """Transfer probes, the evals rows, the weights, the completed row, the done marker, then what
        store.keep_checkpoints lets go."""
        cfg, info, key, run_id = self.cfg, self.info, self.key, self.run_id
        primary = knn_protocol(*knn_settings(cfg.eval)[0])
        objective = result.evals[result.objective_split][primary][0]
        # Probes on other datasets (eval.transfer), on every rank: feature extraction is sharded.
        transfer, _ = run_transfer(cfg, model.backbone, verbose=info.is_main) if cfg.eval.get("transfer") else ([], [])
        epochs = int(cfg.trainer.epochs)
        if info.is_main:
            self.store.write("evals", [
                {"run_id": run_id, "run_key": key, "protocol": protocol, "split": split, "top1": t1, "top5": t5,
                 "epoch": epochs}
                for split, by_protocol in result.evals.items() for protocol, (t1, t5) in by_protocol.items()
            ] + [{"run_id": run_id, "run_key": key, "epoch": epochs, **row} for row in transfer], keep_in=self.folder)
            # Before "done": a completed run always has its weights, whatever else it keeps.
            write_weights(torchvision_weights(cfg, model.backbone.state_dict())[0], self.folder / WEIGHTS)
        self.record(status="completed", finished_at=utcnow(), objective=objective, epochs_done=epochs,
                    residency=result.residency)
        if info.is_main:
            write_done(self.folder, run_id, objective)  # after its rows: "done" implies they are on disk
            trim_checkpoints(self.checkpoint, str(cfg.store.get("keep_checkpoints", "weights")))
            print(f"[harness] run {key} completed: {primary} on {result.objective_split} = {objective:.2f}%",
                  file=sys.stderr)
        self.outcome.update(status="completed", objective=objective)
        return objective
