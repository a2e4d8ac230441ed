"""Stages: every artifact a sweep shares, built once before the training jobs that need it.

A stage is one build with a key (the artifact's path: a sweep builds each distinct key once), a
``done()`` check, the keys of the stages it needs first, its own resources, and whether a build
stopped half-way resumes (a DDPM from its saved training state) or starts over. A sharded stage is
an array: ``build(i)`` for each missing shard i.

Who declares them (``stages_of``): the dataset (its decoded cache, always first), then every
configured add-on class through its class hook ``stages(cfg) -> list[Stage]`` (harness/core/addons.py);
the core finds the classes through the config's ``_target_`` and never names one. Every add-on
stage needs the dataset stage.

Who runs them:
- a sweep with ``launcher=local``: the driver, each distinct stage once, in order, before the first
  point (``run_here``);
- a single run (no ``-m``): the job itself, before it loads data (the same ``run_here``; a stage
  already done costs one file check);
- ``launcher=slurm``: the driver queues one job per distinct stage that is not done (an array for a
  sharded stage), each after the jobs of the stages it needs (``afterok``), with the stage's own GPU
  count and time limit; the training jobs wait for the stages of their point (``submit_slurm``).
  A stage job stops on Slurm's pre-timeout signal the way a training job does (harness/core/preempt.py)
  and is requeued; its build then resumes from its saved state or is redone.

A training job whose stages were staged only finds them; one that finds a build in progress waits at
most ``artifacts.lock_timeout_min`` (harness/artifacts.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.artifacts import config_hash, lock_timeout_s, with_absolute_artifacts


@dataclass(frozen=True)
class Resources:
    """What a stage's Slurm job asks for; None: the point's own value (time limit, CPUs, memory)."""

    gpus: int = 0
    timeout_min: int | None = None
    cpus: int | None = None
    mem_gb: float | None = None

    @classmethod
    def from_config(cls, node: Any) -> Resources:
        """From a config node {gpus, timeout_min, cpus, mem_gb} (missing keys: the defaults)."""
        if node is None:
            return cls()
        get = node.get
        return cls(gpus=int(get("gpus") or 0), timeout_min=get("timeout_min"), cpus=get("cpus"),
                   mem_gb=get("mem_gb"))


@dataclass
class Stage:
    """One shared build. `build()` (or `build(shard)` for an array stage) must be picklable: on Slurm
    it runs in its own job."""

    name: str  # the Slurm job name, e.g. "dataset-cache"
    key: str  # what it builds (an artifact path); a sweep runs each distinct key once
    build: Callable[..., Any]
    done: Callable[[], bool]
    resources: Resources = field(default_factory=Resources)
    resumable: bool = False  # a stopped build resumes from its saved state (else it starts over)
    after: tuple[str, ...] = ()  # keys of the stages that must be done first
    shards: list[int] | None = None  # an array stage: the shards still to build
    local: Callable[[], None] | None = None  # an array stage run here in one go (default: shard by shard)


# ---------------------------------------------------------------------------------- declaring

def decode_dataset(ds: DictConfig, timeout_s: float | None = None) -> None:
    """The dataset stage's build: decode into the cache once (harness.core.data.datasets.ensure_cache).

    A job that finds another decoding waits for it at most `timeout_s`, saying so. An encoded image
    folder (dataset.store=encoded) builds its JPEG store instead (harness/core/data/encoded.py)."""
    from harness.core.data import encoded
    from harness.core.data.datasets import ensure_cache

    if encoded.is_encoded(ds):
        encoded.ensure_store(ds, timeout_s)
    else:
        ensure_cache(ds, timeout_s)


def _never() -> bool:
    return False


def dataset_stage(cfg: DictConfig) -> Stage:
    from harness.core.data import encoded
    from harness.core.data.datasets import cache_file

    ds = cfg.dataset
    source = {k: ds.get(k) for k in ("name", "root", "archive", "download", "cache_dir", "image_size")}
    cache = encoded.store_paths(ds)[1] if encoded.is_encoded(ds) else cache_file(ds)
    done = cache.exists if cache is not None else _never  # a download: ensure_cache finds out
    return Stage(name="dataset-cache", key=f"dataset:{cache or config_hash(source)}",
                 build=partial(decode_dataset, ds, lock_timeout_s(cfg)), done=done,
                 resources=Resources.from_config(OmegaConf.select(cfg, "artifacts.dataset_stage")))


def stages_of(cfg: DictConfig) -> list[Stage]:
    """The stages a job with config `cfg` needs, in the order they must run."""
    from harness.jobs.config import addon_classes

    cfg = with_absolute_artifacts(cfg)  # stage jobs run elsewhere: they must find the same folders
    first = dataset_stage(cfg)
    found = [first]
    for addon in addon_classes(cfg):
        for stage in getattr(addon, "stages", lambda _cfg: [])(cfg) or []:
            if first.key not in stage.after:
                stage.after = (first.key, *stage.after)
            found.append(stage)
    return found


def sweep_stages(points: Sequence[DictConfig]) -> tuple[list[Stage], list[list[str]]]:
    """The distinct stages of a sweep's points, in order, and for each point the keys it needs."""
    distinct: dict[str, Stage] = {}
    needs = []
    for cfg in points:
        keys = []
        for stage in stages_of(cfg):
            distinct.setdefault(stage.key, stage)
            keys.append(stage.key)
        needs.append(keys)
    return list(distinct.values()), needs


# ------------------------------------------------------------------------------------- running

def run_here(stages: Sequence[Stage], where: str, keep_going: bool = False) -> None:
    """Build each stage that is not done, in order, in this process (`where`: the driver or the job).

    `keep_going` (the sweep driver): a stage that fails is reported in one line and the stages that
    need it are skipped; the points that need it then fail in their own jobs with the same error, and
    the sweep's other points still run."""
    failed: set[str] = set()
    for stage in stages:
        if stage.done() or failed.intersection(stage.after):
            if not stage.done():
                failed.add(stage.key)
            continue
        print(f"[stage] {stage.name}: building in the {where} ({stage.key})", file=sys.stderr, flush=True)
        try:
            if stage.shards is None:
                stage.build()
            elif stage.local is not None:
                stage.local()
            else:
                for shard in stage.shards:
                    stage.build(shard)
        except Exception as e:
            if not keep_going:
                raise
            failed.add(stage.key)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"[stage] {stage.name} could not be built in the {where}: {first}; the points that need it fail in "
                  "their own jobs, the others run", file=sys.stderr, flush=True)


class StageJob:
    """What a stage's Slurm job runs: the build (one shard of an array stage).

    On the pre-timeout or preemption signal it stops where it is, as a training job does outside its
    loop (harness/core/preempt.py), and submitit requeues it with the same arguments (``checkpoint``);
    the build then resumes from its saved state (a resumable stage) or starts over.
    """

    def __init__(self, stage: Stage):
        self.stage = stage

    def __call__(self, *shard: int) -> None:
        from harness.core import preempt

        preempt.install()
        try:
            with preempt.stop_at_once():
                if not self.stage.done():
                    self.stage.build(*shard)
        except preempt.Preempted:
            then = "resumes from its saved state" if self.stage.resumable else "starts over"
            print(f"[stage] {self.stage.name} stops for a requeue on Slurm's signal; its build {then}",
                  file=sys.stderr, flush=True)
            preempt.hand_over()

    def checkpoint(self, *shard: int):
        """submitit's hook on the signal: requeue this same job."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *shard)


def array_id(jobs: Sequence[Any]) -> str:
    """The Slurm id of a stage's job, or of its array (afterok on an array waits for every task)."""
    return jobs[0].job_id.split("_")[0]


def submit_slurm(stages: Sequence[Stage], params_for: Callable[[Stage, list[str]], dict], folder: Path | str,
                 max_requeues: int) -> dict[str, list[Any]]:
    """Queue one Slurm job (an array for a sharded stage) per stage that is not done, each after the jobs
    of the stages it needs. ``params_for(stage, after_job_ids)`` gives its submitit parameters.
    Returns {stage key: its submitit jobs} for the stages queued."""
    import submitit

    queued: dict[str, list[Any]] = {}
    for stage in stages:
        if stage.done():
            continue
        after = [array_id(queued[k]) for k in stage.after if k in queued]
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=max_requeues)
        executor.update_parameters(name=stage.name, **params_for(stage, after))
        if stage.shards is None:
            queued[stage.key] = [executor.submit(StageJob(stage))]
        else:
            queued[stage.key] = list(executor.map_array(StageJob(stage), list(stage.shards)))
    if queued:
        names = ", ".join(f"{s.name} ({array_id(queued[s.key])})" for s in stages if s.key in queued)
        print(f"[stages] {len(queued)} stage job(s) queued on Slurm: {names}", file=sys.stderr, flush=True)
    return queued


def run_in_job(cfg: DictConfig) -> None:
    """A training job's own stages: found when a driver staged them, else built here (a single run)."""
    run_here(stages_of(cfg), "job")
