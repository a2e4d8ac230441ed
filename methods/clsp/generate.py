"""CLSP's synthetic set: K candidates per training image, generated in shards, assembled once.

Layout (methods.md §4.3; ``<artifacts>`` is ``artifacts.dir`` or ``<store.path>.artifacts``):

    <artifacts>/synthetic/<hash>/candidates.npy  uint8 N×K×H×W×3; row i belongs to training image i
                                 index.npy       int64 N: each row's position in the full training split
                                 grid.png        8 anchors spread over the set, each followed by its K candidates
    <artifacts>/synthetic/<hash>.parts/          while generating: shard-0003-of-0008.npy, config.yaml

The hash covers the diffusion model, the training split, K, the sampler settings and the
generation seed, not the SSL method, ratio or run seed, so one set serves a whole sweep. Each
candidate's randomness comes from its own generators seeded from (seed, image id, candidate),
so an image's candidates do not depend on the shard layout or on which job made them.

The set is built by three stages (``clsp_stages``, harness/jobs/stages.py): the DDPM, the shards,
the assembly. Shards are separate processes: locally this module starts them
(``positives.generate.workers`` at a time); on Slurm each task of a job array runs one, after the
DDPM's job and before the assembly's, each waiting for the one before. A finished shard file is
never redone, so a killed generation resumes where it stopped.

    python -m methods.clsp.generate [OVERRIDES...] shard=3/8     # one shard (0-based index / count)
    python -m methods.clsp.generate [OVERRIDES...] shard=all     # every missing shard, then assemble
    python -m methods.clsp.generate [OVERRIDES...] launcher=slurm shard=all   # the same as Slurm jobs
    python -m methods.clsp.generate CONFIG.yaml shard=3/8        # a saved job config instead of overrides
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from harness.artifacts import (
    MANIFEST,
    artifact_done,
    artifact_path,
    build_once,
    dataset_identity,
    lock_or_wait,
    lock_timeout_s,
    with_absolute_artifacts,
)
from harness.atomic import atomic_file, write_text_atomic
from harness.core.data.datasets import ImageData, pretraining_view
from harness.core.data.encoded import addon_image_size, at_size, load_dataset, take
from harness.core.progress import Progress
from harness.jobs.stages import Resources, Stage
from methods.clsp.diffusion import (
    ddim_scheduler,
    diffusion_model,
    load_model,
    model_identity,
    resolve_device,
    sample_interpolated,
    to_uint8,
)

REPO = Path(__file__).resolve().parents[2]
SAMPLER_KEYS = ("steps", "eta", "weight", "clip_sample")  # sampler settings that change the images


def synthetic_identity(cfg: DictConfig) -> dict:
    p = cfg.positives
    return {"model": model_identity(cfg), "data": dataset_identity(cfg.dataset), "candidates": int(p.candidates),
            "sampler": {k: OmegaConf.to_container(p.sampler, resolve=True)[k] for k in SAMPLER_KEYS},
            "seed": int(p.generate.seed)}


def synthetic_path(cfg: DictConfig) -> Path:
    return artifact_path(cfg, "synthetic", synthetic_identity(cfg))


def parts_dir(path: Path) -> Path:
    return path.parent / f"{path.name}.parts"


def shard_file(parts: Path, shard: int, shards: int) -> Path:
    return parts / f"shard-{shard:04d}-of-{shards:04d}.npy"


def shard_range(n: int, shard: int, shards: int) -> tuple[int, int]:
    """Rows [start, stop) of shard `shard` (0-based) of `shards` near-equal contiguous shards."""
    return n * shard // shards, n * (shard + 1) // shards


def candidate_seed(seed: int, image_id: int, candidate: int, stream: int) -> int:
    """A well-mixed 63-bit seed for one candidate's sample (stream 0) or anchor noise (stream 1)."""
    return int(np.random.SeedSequence([seed, image_id, candidate, stream]).generate_state(1, np.uint64)[0] >> 1)


def generate_candidates(unet, scheduler, anchors: torch.Tensor, image_ids: list[int], k: int, sampler_cfg,
                        seed: int) -> torch.Tensor:
    """K synthetic positives for each uint8 anchor (n×3×H×W on the UNet's device): uint8 n×K×H×W×3."""
    n, _, h, w = anchors.shape
    x = anchors.float().div(127.5).sub(1).repeat_interleave(k, dim=0)
    gens = [torch.Generator().manual_seed(candidate_seed(seed, i, c, 0)) for i in image_ids for c in range(k)]
    anchor_gens = [torch.Generator().manual_seed(candidate_seed(seed, i, c, 1)) for i in image_ids for c in range(k)]
    out = sample_interpolated(unet, scheduler, x, weight=float(sampler_cfg.weight), steps=int(sampler_cfg.steps),
                              eta=float(sampler_cfg.eta), generators=gens, anchor_generators=anchor_gens)
    return to_uint8(out).view(n, k, h, w, 3)


def run_shard(cfg: DictConfig, shard: int, shards: int, data: ImageData | None = None, log_every: float = 10.0) -> Path:
    """Generate shard `shard` of `shards` unless it is already there; returns its file."""
    path = synthetic_path(cfg)
    parts = parts_dir(path)
    out = shard_file(parts, shard, shards)
    label = f"[clsp] shard {shard}/{shards}"
    if (path / MANIFEST).exists() or out.exists():
        print(f"{label}: already done", file=sys.stderr, flush=True)
        return out
    parts.mkdir(parents=True, exist_ok=True)
    lock = lock_or_wait(str(out) + ".lock", f"{label}: another job is generating it; waiting", lock_timeout_s(cfg))
    try:
        if out.exists():
            return out
        p = cfg.positives
        data = data if data is not None else pretraining_view(load_dataset(cfg.dataset))
        images = generation_images(cfg, data)
        device = generation_device(cfg)
        unet, trained = load_model(diffusion_model(cfg, images, device))
        unet = unet.to(device).eval()
        scheduler = ddim_scheduler(trained, p.sampler)
        k, seed = int(p.candidates), int(p.generate.seed)
        start, stop = shard_range(len(images), shard, shards)
        ids = data.train_index.tolist()
        h, w = images.shape[-2:]
        result = np.empty((stop - start, k, h, w, 3), dtype=np.uint8)
        per_call = max(1, int(p.sampler.batch_size) // k)
        progress = Progress(label, stop, first=start, every=log_every)
        for b in range(start, stop, per_call):
            e = min(b + per_call, stop)
            anchors = images[b:e].to(device)
            result[b - start:e - start] = generate_candidates(unet, scheduler, anchors, ids[b:e], k, p.sampler,
                                                              seed).cpu().numpy()
            progress.update(e, f"{e - start}/{stop - start} images (×{k} candidates)", final=e == stop)
        with atomic_file(out) as f:  # a shard file exists whole or not at all
            np.save(f, result)
        return out
    finally:
        lock.release()


def _child_env(slot: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if torch.cuda.is_available():
        visible = env.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        env["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]
    return env


def run_shards_locally(cfg: DictConfig, todo: list[int], shards: int) -> None:
    """Run shards `todo` as `python -m methods.clsp.generate` processes, `generate.workers` at a time."""
    parts = parts_dir(synthetic_path(cfg))
    parts.mkdir(parents=True, exist_ok=True)
    config_file = parts / "config.yaml"
    write_text_atomic(config_file, OmegaConf.to_yaml(with_absolute_artifacts(cfg)))
    workers = int(cfg.positives.generate.get("workers") or max(torch.cuda.device_count(), 1))
    waiting, running = list(todo), {}  # slot -> (shard, process)
    try:
        while waiting or running:
            for slot in range(workers):
                if slot not in running and waiting:
                    shard = waiting.pop(0)
                    cmd = [sys.executable, "-m", "methods.clsp.generate", str(config_file), f"shard={shard}/{shards}"]
                    running[slot] = (shard, subprocess.Popen(cmd, env=_child_env(slot)))
            time.sleep(0.2)
            for slot, (shard, proc) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[slot]
                if proc.returncode != 0:
                    raise RuntimeError(f"synthetic-set shard {shard}/{shards} failed with exit code {proc.returncode}")
    finally:
        for _, proc in running.values():
            proc.terminate()
            proc.wait()


def save_grid(path: Path, anchors: torch.Tensor, candidates: np.ndarray, scale: int = 2) -> None:
    """A PNG with one row per anchor: the anchor, a gap, then its K candidates (nearest-upscaled)."""
    from PIL import Image

    n, k, h, w, _ = candidates.shape
    gap = 2
    grid = np.full((n * (h + gap) + gap, (k + 1) * (w + gap) + 2 * gap, 3), 255, dtype=np.uint8)
    for i in range(n):
        top = gap + i * (h + gap)
        grid[top:top + h, gap:gap + w] = anchors[i].permute(1, 2, 0).numpy()
        for c in range(k):
            left = 3 * gap + (c + 1) * (w + gap) - gap
            grid[top:top + h, left:left + w] = candidates[i, c]
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def synthetic_set(cfg: DictConfig, data: ImageData, device: torch.device) -> Path:
    """The folder of the job's synthetic set, generating the missing shards (as local processes) first."""
    path = synthetic_path(cfg)
    if (path / MANIFEST).exists():
        return path
    images = generation_images(cfg, data)
    diffusion_model(cfg, images, device)  # trained once here, before the shard processes need it
    shards = int(cfg.positives.generate.shards)
    parts = parts_dir(path)

    def assemble(tmp: Path) -> None:
        todo = [i for i in range(shards) if not shard_file(parts, i, shards).exists()]
        if len(todo) < shards:
            print(f"[clsp] {shards - len(todo)} of {shards} shards already done", file=sys.stderr, flush=True)
        if todo:
            run_shards_locally(cfg, todo, shards)
        k, (h, w) = int(cfg.positives.candidates), images.shape[-2:]
        out = np.lib.format.open_memmap(tmp / "candidates.npy", mode="w+", dtype=np.uint8,
                                        shape=(len(images), k, h, w, 3))
        for i in range(shards):
            start, stop = shard_range(len(images), i, shards)
            out[start:stop] = np.load(shard_file(parts, i, shards))
        out.flush()
        np.save(tmp / "index.npy", data.train_index.numpy().astype(np.int64))
        rows = np.linspace(0, len(images) - 1, min(8, len(images))).round().astype(int)
        save_grid(tmp / "grid.png", take(images, rows), np.asarray(out[rows]))
        del out

    build_once(path, assemble, config=synthetic_identity(cfg), what="synthetic set", timeout_s=lock_timeout_s(cfg))
    shutil.rmtree(parts, ignore_errors=True)
    return path


def needs_synthetic_set(cfg: DictConfig) -> bool:
    """Whether a job with this config draws synthetic positives (ratio 0 never reads the set)."""
    return OmegaConf.select(cfg, "positives.name") == "clsp" and float(cfg.positives.ratio) > 0


def generation_device(cfg: DictConfig) -> torch.device:
    return resolve_device(str(cfg.positives.generate.device))


def generation_images(cfg: DictConfig, data: ImageData):
    """The training images at the DDPM's side (positives.diffusion.image_size): what it trains on, the
    anchors its candidates are made from, and so the synthetic set's size (uint8 N×3×S×S, or an encoded
    split that decodes them so)."""
    size = addon_image_size(OmegaConf.select(cfg, "positives.diffusion.image_size", default=None), data.train_x)
    return at_size(data.train_x, size)


def stage_diffusion_model(cfg: DictConfig) -> str:
    """The DDPM stage's build: train (or find) the diffusion model."""
    return diffusion_model(cfg, generation_images(cfg, pretraining_view(load_dataset(cfg.dataset))),
                           generation_device(cfg))


def build_synthetic_set(cfg: DictConfig) -> str:
    """The job's synthetic set on the generation device: missing shards as local processes, then the
    assembly. As the assembly stage every shard is already there (the shard stage succeeded)."""
    return str(synthetic_set(cfg, pretraining_view(load_dataset(cfg.dataset)), generation_device(cfg)))


def build_shard(cfg: DictConfig, shards: int, shard: int) -> None:
    """The shard stage's build for one array task."""
    run_shard(cfg, shard, shards)


def shards_done(cfg: DictConfig) -> bool:
    path = synthetic_path(cfg)
    shards = int(cfg.positives.generate.shards)
    return artifact_done(path) or all(shard_file(parts_dir(path), i, shards).exists() for i in range(shards))


def clsp_stages(cfg: DictConfig) -> list[Stage]:
    """The stages of the job's synthetic set (harness/jobs/stages.py), each after the one before: the
    DDPM (unless a model is given), one array task per missing shard, then the assembly; none when
    the job draws no synthetic positives."""
    if not needs_synthetic_set(cfg):
        return []
    path = synthetic_path(cfg)
    resources = lambda name: Resources.from_config(OmegaConf.select(cfg, f"positives.stages.{name}"))  # noqa: E731
    found, after = [], ()
    ident = model_identity(cfg)
    if "path" not in ident and "hub_id" not in ident:
        model = artifact_path(cfg, "diffusion", ident)
        resumable = bool(cfg.positives.diffusion.get("checkpoint_every"))  # its train_state.pt
        found.append(Stage(name="clsp-diffusion", key=str(model), build=partial(stage_diffusion_model, cfg),
                           done=partial(artifact_done, model), resources=resources("diffusion"),
                           resumable=resumable))
        after = (str(model),)
    shards = int(cfg.positives.generate.shards)
    todo = [i for i in range(shards) if not shard_file(parts_dir(path), i, shards).exists()]
    found.append(Stage(name="clsp-shards", key=str(parts_dir(path)), build=partial(build_shard, cfg, shards),
                       done=partial(shards_done, cfg), resources=resources("shards"), after=after, shards=todo,
                       local=partial(run_shards_locally, cfg, todo, shards)))
    found.append(Stage(name="clsp-assemble", key=str(path), build=partial(build_synthetic_set, cfg),
                       done=partial(artifact_done, path), resources=resources("assemble"),
                       after=(str(parts_dir(path)),)))
    return found


def _job_config(args: list[str]) -> DictConfig:
    from harness.jobs.config import compose, validate

    if len(args) == 1 and args[0].endswith((".yaml", ".yml")) and "=" not in args[0]:
        return OmegaConf.load(args[0])
    cfg = compose(args)
    validate(cfg)
    return cfg


def main(argv: list[str]) -> int:
    shard_args = [a for a in argv if a.startswith("shard=")]
    if len(shard_args) != 1:
        print("usage: python -m methods.clsp.generate [OVERRIDES... | CONFIG.yaml] shard=I/N | shard=all",
              file=sys.stderr)
        return 2
    cfg = _job_config([a for a in argv if not a.startswith("shard=")])
    if OmegaConf.select(cfg, "positives.name") != "clsp":
        print("positives=clsp is needed to generate a synthetic set", file=sys.stderr)
        return 2
    if cfg.trainer.get("num_threads"):
        torch.set_num_threads(int(cfg.trainer.num_threads))
    value = shard_args[0].split("=", 1)[1]
    if value == "all" and OmegaConf.select(cfg, "launcher.name") == "slurm":
        from harness.jobs.stages import stages_of, submit_slurm
        from hydra_plugins.harness_launchers.launchers import stage_params

        queued = submit_slurm(stages_of(cfg), lambda stage, after: stage_params(cfg, stage, after),
                              Path.cwd() / ".submitit" / "%j", int(cfg.launcher.max_requeues))
        for jobs in queued.values():
            for job in jobs:
                job.result()  # waits; raises with the job's error when a stage failed
        print(synthetic_path(cfg))
        return 0
    if value == "all":
        print(build_synthetic_set(cfg))
        return 0
    try:
        shard, shards = (int(v) for v in value.split("/"))
    except ValueError:
        shard, shards = -1, 0
    if not 0 <= shard < shards:
        print(f"shard = {value!r} is not allowed: expected I/N with 0 <= I < N, or all", file=sys.stderr)
        return 2
    if shards != int(cfg.positives.generate.shards):
        print(f"shard = {value!r}: the config has positives.generate.shards = {cfg.positives.generate.shards}",
              file=sys.stderr)
        return 2
    run_shard(cfg, shard, shards)
    return 0


if __name__ == "__main__":
    from harness.errors import ConfigError

    try:
        sys.exit(main(sys.argv[1:]))
    except ConfigError as e:  # bad input: one line, as `python -m harness` says it, not a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
