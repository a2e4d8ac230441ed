"""Hydra launchers for sweeps: `launcher=local` (this machine) and `launcher=slurm` (submitit).

Both do two things Hydra's own launchers do not:
- every point's config is composed and validated before anything runs or is submitted, so a
  bad sweep (an unknown method in the grid, a missing data root, 3 nodes on a 2-node partition)
  is refused with the reasons and nothing is queued;
- one failed point never hides the others: a point whose job raised, was cancelled or died
  without a word (OOM, node failure) comes back as a result of None, its failure is recorded in
  the store's `sweep_points` (with the first line of the error and the log path) when the job
  could not record it itself, and the sweep goes on; the summary at the end lists it.

With `dry_run=true` both stop after the checks and print the plan instead (`preview`): every point
with the overrides that tell it apart, its run key and whether it would run or be skipped as
already completed. Nothing runs, nothing is submitted, and the store is not opened.

Slurm resources are per point (the `launcher` node of each point's config): points with the
same resources form one job array, so a sweep may mix a 1-GPU and a 2-node point.

Both build what the points share first, each distinct stage once (harness/jobs/stages.py): the
local driver in order before the first point; the Slurm launcher as jobs the training jobs depend on.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurmLauncher
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

FINAL = ("completed", "skipped", "failed", "diverged", "pruned")

# The overrides of every point this driver saw fail (record_missing), in order: the sweep's summary
# (hydra_plugins/harness_callbacks) still exits 1 from these when the store is held too long to read.
failed_points: list[str] = []


def first_line(e: BaseException | str) -> str:
    if isinstance(e, BaseException):
        return traceback.format_exception_only(type(e), e)[-1].strip().splitlines()[0]
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def compose_points(launcher: Launcher, job_overrides: Sequence[Sequence[str]]) -> list[DictConfig]:
    from harness.errors import ConfigError
    from harness.jobs.sweeps import compose_sweep_points, split_argv

    # An unknown group option in the sweep's grid (hydra.sweeper.params): one line each, exit 2, as for
    # any bad value. Options of the command's --config-dir folders count.
    config_dirs = split_argv(sys.argv[1:])[1]
    loader = launcher.hydra_context.config_loader  # type: ignore[attr-defined]
    try:
        return compose_sweep_points(loader, launcher.config, job_overrides, config_dirs)
    except ConfigError as e:
        print(f"error: sweep refused, nothing was run or submitted: {e}", file=sys.stderr)
        sys.exit(2)


def refuse_bad_points(points: list[DictConfig], job_overrides: Sequence[Sequence[str]],
                      extra_check=None) -> None:
    """Exit with every point's problems listed when any point is invalid; nothing has run yet."""
    from harness.jobs.config import ConfigError, validate

    problems = []
    for i, (cfg, overrides) in enumerate(zip(points, job_overrides)):
        errors = []
        for check in (validate, extra_check):
            if check is None:
                continue
            try:
                check(cfg)
            except ConfigError as e:
                errors.extend(e.problems)
        if errors:
            text = "\n    ".join(f"{f} = {v!r} is not allowed: expected {a}" for f, v, a in errors)
            problems.append(f"  point #{i} ({' '.join(filter_overrides(overrides)) or 'no overrides'}):\n    {text}")
    if problems:
        print(f"error: sweep refused, nothing was run or submitted ({len(problems)} of {len(points)} points "
              "invalid):\n" + "\n".join(problems), file=sys.stderr)
        sys.exit(2)


def split_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _plan_table(points: list[DictConfig], job_overrides: Sequence[Sequence[str]], first: int = 0
                ) -> tuple[list[str], str, int]:
    """(overrides every point shares, a table of what differs and each point's run key, how many would run)."""
    from harness.jobs.config import run_key
    from harness.store import Store, read_done
    from leaderboard.text import format_table

    per_point = [dict(split_override(o) for o in filter_overrides(overrides)) for overrides in job_overrides]
    keys = list(dict.fromkeys(k for p in per_point for k in p))
    varying = [k for k in keys if len({p.get(k) for p in per_point}) > 1]
    shared = [f"{k}={per_point[0][k]}" for k in keys if k not in varying]
    rows, to_run = [], 0
    for i, (cfg, values) in enumerate(zip(points, per_point), first):
        key = run_key(cfg)
        done = read_done(Store(cfg.store.path, cfg.store.get("runs_dir")).runs / key) and not cfg.get("force")
        to_run += not done
        rows.append({"#": i, **{k: values.get(k, "") for k in varying}, "run_key": key,
                     "would": "skip (already completed)" if done else "run"})
    return shared, format_table(rows, ["#", *varying, "run_key", "would"]), to_run


def preview(points: list[DictConfig], job_overrides: Sequence[Sequence[str]], asked: int | None = None
            ) -> list[JobReturn]:
    """Print the sweep's points (already checked) as a table of what differs between them; run nothing.

    The first `asked` points are the sweep's own; the rest are its random-init floor points
    (`sweep_floor`), listed in a table of their own.
    """
    asked = len(points) if asked is None else asked
    shared, table, to_run = _plan_table(points[:asked], job_overrides[:asked])
    print(f"Sweep preview (dry_run=true): {asked} point(s), all valid; nothing was run or submitted.")
    if shared:
        print(f"Shared by every point: {' '.join(shared)}")
    print(table)
    if len(points) > asked:
        floor_shared, floor_table, floor_run = _plan_table(points[asked:], job_overrides[asked:], asked)
        print(f"\nRandom-init floor (sweep_floor: true): {len(points) - asked} more point(s), untrained "
              f"backbones the rankings compare against; shared: {' '.join(floor_shared)}")
        print(floor_table)
        to_run += floor_run
    print(f"{to_run} would run, {len(points) - to_run} already completed. Run them: the same command without "
          "dry_run=true.")
    from harness.jobs.bill import print_bill
    from harness.jobs.config import run_key
    from harness.store import Store, read_done

    print_bill(points, [not (read_done(Store(cfg.store.path, cfg.store.get("runs_dir")).runs / run_key(cfg))
                             and not cfg.get("force")) for cfg in points])
    return [_returned(overrides, None) for overrides in job_overrides[:asked]]


def record_missing(cfg: DictConfig, overrides: Sequence[str], error: str, log_path: str | None,
                   world_size: int | None = None) -> None:
    """Write a failed `sweep_points` row for a point whose job ended without writing a final one, and
    mark its run lost when its runs row still says running.

    `world_size`: the job's process count (it can be in the run key); None: this process's."""
    import os

    failed_points.append(" ".join(filter_overrides(overrides)))

    from harness.jobs.config import run_key
    from harness.store import SWEEP_ENV, Store, StoreBusy, last_row, mark_lost, read_done, utcnow

    sweep_id = os.environ.get(SWEEP_ENV)
    if not sweep_id:
        return
    store = Store(cfg.store.path, cfg.store.get("runs_dir"))
    key = run_key(cfg, world_size)
    try:
        rows = store.query("SELECT status FROM sweep_points WHERE sweep_id = ? AND run_key = ?", [sweep_id, key],
                           timeout=0)  # never wait: the run folder's marker below decides as well
        if rows and rows[0]["status"] in FINAL:
            return
    except StoreBusy:  # another process holds the database: the run folder's own rows decide
        point = last_row(store.runs / key, "sweep_points")
        if read_done(store.runs / key) or (point is not None and point.get("sweep_id") == sweep_id
                                           and point.get("status") in FINAL):
            return
    # The job's own runs row still says running: it died without a word. It is lost (not failed): the
    # same command resumes it from its checkpoint. From the run folder's rows, the record a rebuild reads.
    row = last_row(store.runs / key, "runs")
    if row is not None and row.get("sweep_id") == sweep_id:
        mark_lost(store, store.runs / key, row["run_id"], f"its Slurm job ended without a result ({error})")
    store.write("sweep_points", [{
        "sweep_id": sweep_id, "run_key": key,
        "overrides": " ".join(o for o in filter_overrides(overrides) if not o.startswith("+optuna.")),
        "status": "failed", "error": error, "log_dir": log_path, "finished_at": utcnow()}])


def stored_outcome(cfg: DictConfig, world_size: int | None = None) -> dict | None:
    """This sweep's final row for the point, when its job wrote one (`world_size` as in record_missing)."""
    import os

    from harness.jobs.config import run_key
    from harness.store import SWEEP_ENV, Store, StoreBusy, read_done

    sweep_id = os.environ.get(SWEEP_ENV)
    if not sweep_id:
        return None
    store, key = Store(cfg.store.path, cfg.store.get("runs_dir")), run_key(cfg, world_size)
    try:
        rows = store.query("SELECT status, objective FROM sweep_points WHERE sweep_id = ? AND run_key = ?",
                           [sweep_id, key], timeout=0)  # never wait: the done marker below decides as well
    except StoreBusy:  # another process holds the database: the job's done marker says whether it completed
        done = read_done(store.runs / key)
        return {"status": "completed", "objective": done.get("objective")} if done else None
    return rows[0] if rows and rows[0]["status"] in FINAL else None


def _returned(overrides: Sequence[str], value: Any) -> JobReturn:
    # COMPLETED with None (not FAILED): Hydra's sweepers stop a sweep at the first FAILED return,
    # which would hide every later point; the failure is in the store and the summary instead.
    ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
    ret.return_value = value
    return ret


class LocalLauncher(Launcher):
    """Runs the points one after another in this process (Hydra's basic launcher, checked first)."""

    def __init__(self) -> None:
        from hydra._internal.core_plugins.basic_launcher import BasicLauncher

        self._basic = BasicLauncher()
        self.config: DictConfig | None = None
        self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from harness.jobs.sweeps import PointConfigs

        self.config = config
        self.hydra_context = hydra_context
        PointConfigs.install(hydra_context.config_loader)  # before the sweeper checks its first batch
        self._basic.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from harness.jobs.stages import run_here, sweep_stages
        from harness.jobs.sweeps import with_floor_points

        asked = len(job_overrides)
        job_overrides, own = with_floor_points(self.config, job_overrides)
        points = compose_points(self, job_overrides)
        refuse_bad_points(points, job_overrides)
        if any(p.get("dry_run") for p in points):
            from harness.store import quiet_broken_pipe

            return quiet_broken_pipe(lambda: preview(points, job_overrides, own)[:asked])  # `| head` ends quietly
        # Each shared artifact once, before the points (one that fails fails only the points that need it).
        run_here(sweep_stages(points)[0], "sweep driver", keep_going=True)
        results = list(self._basic.launch(job_overrides, initial_job_idx))
        for i, (ret, cfg) in enumerate(zip(results, points)):
            if ret.status != JobStatus.COMPLETED:
                error = first_line(ret._return_value)
                log.error(f"point #{initial_job_idx + i} failed: {error}")
                record_missing(cfg, ret.overrides or [], error, ret.working_dir)
                results[i] = _returned(ret.overrides or [], None)
        return results[:asked]


# ---------------------------------------------------------------------------------------- Slurm

def resources(cfg: DictConfig) -> dict[str, Any]:
    """The submitit parameters of one point, from its `launcher` node."""
    lc = cfg.launcher
    gpus = lc.gpus_per_node
    tasks = lc.tasks_per_node if lc.tasks_per_node is not None else max(int(gpus or 0), 1)
    params = {
        "nodes": lc.nodes, "tasks_per_node": tasks, "gpus_per_node": gpus, "cpus_per_task": lc.cpus_per_task,
        "mem_gb": lc.mem_gb, "timeout_min": lc.timeout_min,
        "slurm_partition": lc.partition, "slurm_account": lc.account, "slurm_qos": lc.qos,
        "slurm_constraint": lc.constraint, "slurm_array_parallelism": lc.array_parallelism,
        "slurm_signal_delay_s": lc.signal_delay_s,
        "slurm_additional_parameters": OmegaConf.to_container(lc.sbatch, resolve=True) if lc.sbatch else None,
        "slurm_setup": list(lc.setup) if lc.setup else None,
    }
    return {k: v for k, v in params.items() if v is not None}


def _sinfo() -> dict[str, dict[str, int]] | None:
    """partition -> {nodes, cpus (largest node), gpus (largest node)}, or None without sinfo."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %D %c %G"], capture_output=True, text=True, timeout=30,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    parts: dict[str, dict[str, int]] = {}
    for line in out.splitlines():
        name, nodes, cpus, gres = (line.split() + ["", "", "", ""])[:4]
        gpus = sum(int(m) for m in re.findall(r"gpu(?::[^:(,]+)?:(\d+)", gres))
        p = parts.setdefault(name.rstrip("*"), {"nodes": 0, "cpus": 0, "gpus": 0, "default": name.endswith("*")})
        p["nodes"] += int(nodes.rstrip("+") or 0)
        p["cpus"] = max(p["cpus"], int(cpus.rstrip("+") or 0))
        p["gpus"] = max(p["gpus"], gpus)
    return parts


def check_slurm(cfg: DictConfig, cluster: dict[str, dict[str, int]] | None) -> None:
    """Raise ConfigError naming every launcher value that cannot work."""
    from harness.jobs.config import ConfigError, _number

    lc = cfg.launcher
    errors = [
        _number(cfg, "launcher.nodes", low=1, integer=True),
        _number(cfg, "launcher.gpus_per_node", low=0, integer=True, optional=True),
        _number(cfg, "launcher.tasks_per_node", low=1, integer=True, optional=True),
        _number(cfg, "launcher.cpus_per_task", low=1, integer=True, optional=True),
        _number(cfg, "launcher.mem_gb", low=0, strict_low=True, optional=True),
        _number(cfg, "launcher.timeout_min", low=1, integer=True),
        _number(cfg, "launcher.array_parallelism", low=1, integer=True),
        _number(cfg, "launcher.signal_delay_s", low=0, integer=True),
        _number(cfg, "launcher.max_requeues", low=0, integer=True),
    ]
    for field in ("partition", "account", "qos", "constraint"):
        value = lc.get(field)
        if value is not None and not (isinstance(value, str) and value.strip()):
            errors.append(ConfigError(f"launcher.{field}", value, "a non-empty string or null"))
    if lc.get("sbatch") is not None and not OmegaConf.is_dict(lc.sbatch):
        errors.append(ConfigError("launcher.sbatch", lc.sbatch, "a mapping of sbatch options, e.g. {exclusive: true}"))
    found = [e for e in errors if e is not None]
    bad = {f for e in found for f, _, _ in e.problems}
    ok = lambda *fields: not any(f"launcher.{f}" in bad for f in fields)
    if ok("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "timeout_min", "signal_delay_s"):
        params = resources(cfg)
        world = params["nodes"] * params["tasks_per_node"]
        if int(cfg.trainer.batch_size) % world:
            found.append(ConfigError("trainer.batch_size", cfg.trainer.batch_size,
                                     f"a multiple of nodes × tasks_per_node = {world} (the global batch is split)"))
        if params.get("slurm_signal_delay_s", 0) >= params["timeout_min"] * 60:
            found.append(ConfigError("launcher.signal_delay_s", lc.signal_delay_s,
                                     f"less than the time limit ({params['timeout_min'] * 60} s)"))
    if cluster and ok("partition"):
        # What the cluster has (from sinfo): a job it can never run would wait in the queue forever.
        default = next((n for n, p in cluster.items() if p["default"]), None)
        name = lc.partition or default
        part = cluster.get(name) if name else None
        if part is None:
            found.append(ConfigError("launcher.partition", lc.partition, "one of " + ", ".join(cluster)))
        else:
            if ok("nodes") and lc.nodes > part["nodes"]:
                found.append(ConfigError("launcher.nodes", lc.nodes,
                                         f"at most {part['nodes']} (nodes in partition {name})"))
            if ok("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task"):
                params = resources(cfg)
                cpus = params["tasks_per_node"] * params.get("cpus_per_task", 1)
                if part["cpus"] and cpus > part["cpus"]:
                    found.append(ConfigError("launcher.cpus_per_task", lc.cpus_per_task,
                                             f"tasks_per_node × cpus_per_task <= {part['cpus']} (CPUs per node in "
                                             f"partition {name})"))
                if (params.get("gpus_per_node") or 0) > part["gpus"]:
                    found.append(ConfigError("launcher.gpus_per_node", lc.gpus_per_node,
                                             f"at most {part['gpus']} (GPUs per node in partition {name})"))
    if found:
        raise ConfigError(*found[0].problems[0], more=found[1:])


def with_dependency(params: dict[str, Any], after: list[str]) -> dict[str, Any]:
    """`params` for a job that starts only when jobs `after` have succeeded, and is cancelled when one
    fails (instead of pending forever on a dependency that can never be met)."""
    if not after:
        return params
    extra = dict(params.get("slurm_additional_parameters") or {})
    extra.update({"dependency": "afterok:" + ":".join(after), "kill_on_invalid_dep": "yes"})
    return {**params, "slurm_additional_parameters": extra}


# Seconds between the driver's looks at its jobs: a look is a stat of each job's result file; submitit
# spaces its own sacct calls (2 s after a submission, then doubling up to 10 minutes), so looking often
# costs the cluster nothing and a finished sweep ends within a second of its last job.
POLL_S = 1.0


# Slurm's states of a job it still holds (squeue --states), and how long to wait before asking again
# about a job that accounting called ended while the queue still held it.
HELD_STATES = ("PENDING,RUNNING,REQUEUED,REQUEUE_HOLD,REQUEUE_FED,CONFIGURING,COMPLETING,RESIZING,SUSPENDED,"
               "STAGE_OUT,SIGNALING")
RECHECK_S = 30.0


def still_queued(job_id: str) -> bool | None:
    """Whether Slurm still holds job `job_id` (pending again after a requeue, running, completing); None
    when squeue does not answer. Why: after a node failure Slurm requeues a job, and accounting shows the
    ended attempt (NODE_FAIL) as the job's state until the next one starts, about two minutes later;
    submitit then calls the job done, and it would be recorded failed while it is about to run again."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-t", HELD_STATES, "-o", "%T"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return False if "invalid job id" in out.stderr.lower() else None  # gone from the queue, or no answer
    return bool(out.stdout.strip())


def as_they_end(jobs: dict[int, Any], collect) -> list:
    """`collect(i)` for each job as soon as it has ended, in any order; the results in job order.

    Not in submission order: a job cancelled or killed while an earlier one still trains is found
    (and its run marked lost) at the next poll, not when the earlier one ends. A job that ended without
    a result while the queue still holds it (requeued) is waited for, asking the queue every RECHECK_S.
    """
    import time

    out: dict[int, Any] = {}
    recheck: dict[int, float] = {}
    while len(out) < len(jobs):
        for i, job in jobs.items():
            if i in out:
                continue
            has_result = Path(job.paths.result_pickle).exists()
            if not has_result and time.monotonic() < recheck.get(i, 0.0):
                continue
            if not job.done():
                continue
            if not has_result and (held := still_queued(str(job.job_id))) is not False:
                if i not in recheck:
                    log.info(f"job {job.job_id} ended without a result but Slurm still holds it "
                             f"({'requeued' if held else 'squeue did not answer'}): waiting for it")
                recheck[i] = time.monotonic() + RECHECK_S
                continue
            out[i] = collect(i)
        if len(out) < len(jobs):
            time.sleep(POLL_S)
    return [out[i] for i in sorted(out)]


def stage_params(cfg: DictConfig, stage, after: list[str]) -> dict[str, Any]:
    """submitit parameters of a stage's job (harness/jobs/stages.py): the point's partition, account and
    signal delay, one node and one task, the stage's own GPU count (none when the point asks for no GPU),
    time limit, CPUs and memory (the point's where the stage leaves them unset), after jobs `after`."""
    params = resources(cfg)
    res = stage.resources
    params.update(nodes=1, tasks_per_node=1, gpus_per_node=res.gpus if params.get("gpus_per_node") else 0)
    for key, value in (("timeout_min", res.timeout_min), ("cpus_per_task", res.cpus), ("mem_gb", res.mem_gb)):
        if value is not None:
            params[key] = value
    if params.get("slurm_signal_delay_s", 0) >= params["timeout_min"] * 60:  # a short stage: signal it earlier
        params["slurm_signal_delay_s"] = params["timeout_min"] * 60 // 4
    return with_dependency(params, after)


class SlurmLauncher(_SubmititSlurmLauncher):
    """hydra-submitit-launcher's Slurm launcher with per-point resources, checks and failure reports.

    Its job side (`__call__`, and `checkpoint`, which submitit calls on the pre-timeout or
    preemption signal to requeue the job with the same arguments) is the parent's.
    """

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from harness.jobs.sweeps import PointConfigs

        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        PointConfigs.install(hydra_context.config_loader)  # before the sweeper checks its first batch

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        from harness.jobs.sweeps import with_floor_points

        assert self.config is not None
        asked = len(job_overrides)
        job_overrides, own = with_floor_points(self.config, job_overrides)
        points = compose_points(self, job_overrides)
        if shutil.which("sbatch") is None:
            print("error: launcher=slurm needs Slurm's sbatch on PATH (run on a login node); nothing was submitted",
                  file=sys.stderr)
            sys.exit(2)
        cluster = _sinfo()
        refuse_bad_points(points, job_overrides, extra_check=lambda cfg: check_slurm(cfg, cluster))
        if any(p.get("dry_run") for p in points):
            from harness.store import quiet_broken_pipe

            return quiet_broken_pipe(lambda: preview(points, job_overrides, own)[:asked])  # `| head` ends quietly

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        after = self._submit_shared_stages(points)
        groups: dict[str, list[int]] = {}
        for i, cfg in enumerate(points):
            groups.setdefault(json.dumps(with_dependency(resources(cfg), after[i]), sort_keys=True), []).append(i)
        jobs: dict[int, Any] = {}
        for spec, members in groups.items():
            params = json.loads(spec)
            max_requeues = int(points[members[0]].launcher.max_requeues)
            executor = submitit.AutoExecutor(folder=self.params["submitit_folder"], cluster="slurm",
                                             slurm_max_num_timeout=max_requeues)
            executor.update_parameters(name=str(self.config.hydra.job.name), **params)
            args = [(list(job_overrides[i]), "hydra.sweep.dir", initial_job_idx + i,
                     f"job_id_for_{initial_job_idx + i}", Singleton.get_state()) for i in members]
            for i in members:
                log.info(f"\t#{initial_job_idx + i} : {' '.join(filter_overrides(job_overrides[i]))}")
            for i, job in zip(members, executor.map_array(self, *zip(*args))):
                jobs[i] = job
        log.info(f"Submitted {len(jobs)} job(s) in {len(groups)} array(s); submitit folder "
                 f"{self.params['submitit_folder']}")
        results = as_they_end(jobs, lambda i: self._collect(i, jobs[i], points[i], job_overrides[i], initial_job_idx))
        return results[:asked]

    def _submit_shared_stages(self, points: list[DictConfig]) -> list[list[str]]:
        """Queue each distinct stage of the sweep once (harness/jobs/stages.py: the dataset cache and
        the add-ons' artifacts) before the training jobs, so no training job holds GPUs while it builds
        or waits; returns, per point, the stage job ids its training job must wait for."""
        from harness.jobs.stages import array_id, submit_slurm, sweep_stages

        stages, needs = sweep_stages(points)
        first_point = {}
        for cfg, keys in zip(points, needs):
            for key in keys:
                first_point.setdefault(key, cfg)
        folder = Path(str(self.config.hydra.sweep.dir)) / ".stages" / "%j"
        queued = submit_slurm(stages, lambda stage, after: stage_params(first_point[stage.key], stage, after),
                              folder, int(points[0].launcher.max_requeues) if points else 0)
        return [[array_id(queued[k]) for k in keys if k in queued] for keys in needs]

    @staticmethod
    def _collect(i: int, job, cfg: DictConfig, overrides: Sequence[str], first_idx: int) -> JobReturn:
        try:
            ret = job.results()[0]  # rank 0's return; waits for the job (sacct says when it died)
        except Exception as e:  # cancelled, timed out, OOM, node failure: nothing came back
            # submitit's message starts with the result file's path; Slurm's state says what happened.
            try:
                state = job.state
            except Exception:  # noqa: BLE001 - sacct unreachable: the exception alone must do
                state = "unknown"
            error = f"{type(e).__name__}: job {job.job_id} ended without a result (Slurm state {state})"
        else:
            if ret.status == JobStatus.COMPLETED:
                return ret
            error = first_line(ret._return_value)
        # A rank may die after rank 0 recorded the point (see the README): trust the store.
        params = resources(cfg)
        world_size = int(params["nodes"]) * int(params["tasks_per_node"])
        stored = stored_outcome(cfg, world_size)
        if stored is not None and stored["status"] != "failed":
            return _returned(overrides, stored["objective"])
        log.error(f"point #{first_idx + i} (job {job.job_id}) failed: {error}; log: {job.paths.stderr}")
        record_missing(cfg, overrides, error, str(job.paths.stderr), world_size)
        return _returned(overrides, None)
