"""Artifacts: things a job builds once and every job with the same config reuses.

A trained model (a score network, a diffusion model) or a generated data set takes far longer to build
than to load, and a sweep has many jobs that need the same one. An artifact is a folder

    <root>/<kind>/<hash of its config>/

where <root> is ``artifacts.dir`` of the job config, or ``<store.path>.artifacts`` beside the
results store when that is null (so a sweep on a shared filesystem shares its artifacts, and a
test's temporary store gets its own). The hash covers only the config that changes the artifact
(for a model trained on a dataset: its own settings and which training images it saw, see
``dataset_identity``), never the run seed or the SSL method, so jobs that differ only in those
share it.

``build_once(path, build)`` makes the folder exist exactly once:
- already there: returned at once (no lock taken);
- otherwise the job takes ``<path>.lock`` (filelock); a job that finds the lock held prints what
  it waits for and blocks until the builder finishes (at most ``timeout_s``: a training job passes
  ``artifacts.lock_timeout_min``), then finds the folder and reuses it;
- the builder calls ``build(tmp)`` on an empty temporary folder beside the final one, under a
  global RNG seeded for the artifact (``seed``, else from its config hash) and given back to the
  job unchanged afterwards (harness/core/rng.py): a job that builds an artifact trains exactly as one
  that reuses it, and the artifact does not depend on which job built it. It then writes
  ``artifact.json`` (kind, config, when) into it, and renames it into place with ``os.replace``,
  so a reader sees the whole folder or none. A build killed half-way leaves only a temporary
  folder, removed by the next builder.

Typical use in an add-on (whose constructor gets the job config first, see harness/core/addons.py):

    path = artifact_path(cfg, "score_net", {"net": net_cfg, "data": dataset_identity(cfg.dataset)})
    build_once(path, lambda tmp: train_and_save(tmp / "model.pt"))
    model = load(path / "model.pt")

In a sweep every shared artifact is a stage (harness/jobs/stages.py): the driver, or Slurm jobs it
queues, build it before the training jobs start, and a training job's ``build_once`` only finds it.

Every rank of a DDP job may call ``build_once``: one builds, the others wait on the lock. The
lock and the rename need the root on one filesystem that all jobs see (a shared one on a cluster).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from harness.atomic import LOCK_TIMEOUT_OPTION, LockWaitTimeout, lock_or_wait  # noqa: F401  (their home is atomic.py)
from harness.core.rng import isolated_rng

MANIFEST = "artifact.json"

# Dataset settings that decide which training images a model sees (where the files are read from
# does not; an image folder is named by its files, see harness.core.data.datasets.folder_manifest).
_DATASET_KEYS = ("name", "train_size", "val_size", "subset_seed", "image_size")


def _plain(node: Any) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    return node


def config_hash(node: Any) -> str:
    """A stable 16-hex-digit hash of a config node (DictConfig, dict, list or scalar)."""
    blob = json.dumps(_plain(node), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def artifacts_root(cfg: DictConfig) -> Path:
    """``artifacts.dir`` of the job config, else ``<store.path>.artifacts``."""
    configured = OmegaConf.select(cfg, "artifacts.dir", default=None)
    if configured:
        return Path(str(configured)).expanduser().absolute()
    return Path(str(Path(str(cfg.store.path)).expanduser().absolute()) + ".artifacts")


def artifact_path(cfg: DictConfig, kind: str, node: Any) -> Path:
    """Where the artifact of `kind` described by config `node` lives (it may not exist yet)."""
    return artifacts_root(cfg) / kind / config_hash(node)


def dataset_identity(ds: DictConfig) -> dict:
    """The part of a dataset config that decides the training split (for artifact keys)."""
    ident = {k: _plain(ds.get(k)) for k in _DATASET_KEYS if ds.get(k) is not None}
    if ds.get("name") == "imagefolder":
        from harness.core.data.datasets import folder_manifest

        ident["folder_manifest"] = folder_manifest(str(ds.get("root")))
    if ds.get("store") == "encoded":  # re-encoded images (quality, side cap), not the decoded squares
        ident["store"] = {"encoded": _plain(ds.get("encode")) or {}}
    return ident


def lock_timeout_s(cfg: DictConfig | None) -> float | None:
    """``artifacts.lock_timeout_min`` of a job config in seconds (None: wait as long as it takes)."""
    minutes = OmegaConf.select(cfg, LOCK_TIMEOUT_OPTION, default=None) if cfg is not None else None
    return None if minutes is None else float(minutes) * 60


def artifact_done(path: Path | str) -> bool:
    """Whether artifact folder `path` is complete (its manifest is written last)."""
    return (Path(path) / MANIFEST).exists()


def with_absolute_artifacts(cfg: DictConfig) -> DictConfig:
    """A resolved copy of `cfg` whose artifacts.dir is absolute, so other processes (stage jobs, shard
    processes), started elsewhere, find the same artifacts."""
    saved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    saved.artifacts.dir = str(artifacts_root(cfg))
    return saved


def build_once(path: Path, build: Callable[[Path], None], *, config: Any = None, what: str | None = None,
               seed: int | None = None, timeout_s: float | None = None) -> Path:
    """Make artifact folder `path` exist, building it with ``build(tmp_folder)`` only if no job has.

    `config` (optional) is written into the folder's artifact.json for people reading it later.
    ``build`` runs with the global RNG seeded with `seed` (default: from the folder's config hash)
    and the caller's RNG restored afterwards. Returns `path`. Safe to call from many processes at
    once: one builds, the rest wait (at most `timeout_s` seconds, see lock_or_wait) and reuse.
    """
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    what = what or f"{path.parent.name} {path.name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_or_wait(str(path) + ".lock",
                        f"[artifact] {what} is being built by another job; waiting for it ({path})",
                        timeout_s)
    try:
        if (path / MANIFEST).exists():
            print(f"[artifact] reusing {what} ({path})", file=sys.stderr, flush=True)
            return path
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed builder
            shutil.rmtree(stale, ignore_errors=True)
        if path.exists():  # a folder without a manifest is an incomplete leftover
            shutil.rmtree(path)
        tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
        tmp.mkdir()
        print(f"[artifact] building {what} ({path})", file=sys.stderr, flush=True)
        started = time.monotonic()
        if seed is None:
            seed = int(hashlib.sha256(path.name.encode()).hexdigest()[:15], 16)
        with isolated_rng(seed):
            build(tmp)
        manifest = {"kind": path.parent.name, "hash": path.name, "config": _plain(config),
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "build_seconds": time.monotonic() - started,
                    "pid": os.getpid()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        os.replace(tmp, path)
        print(f"[artifact] built {what} in {time.monotonic() - started:.0f}s ({path})", file=sys.stderr, flush=True)
        return path
    finally:
        lock.release()
