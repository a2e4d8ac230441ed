"""Input normalisation of a dataset: `dataset.mean/std` as given, or `auto` from the training images.

``dataset.mean: auto`` (and/or ``std: auto``) computes the per-channel mean and standard deviation
of the pixels (in [0, 1]) of every image of the decoded training split (a validation hold-out is
carved from it later and counts too: the statistics describe the dataset file, not one run's
subset) and caches them in a small JSON beside the decoded-tensor cache file
(``<cache>.pt.stats.json``), so later jobs read four numbers instead of the whole split.

Kept apart from datasets.py on purpose: that module decodes, this one only reads its cache.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf, read_write

from harness.atomic import write_text_atomic

AUTO = "auto"
CHANNELS = 3  # every image is decoded to RGB (grayscale is converted), so mean/std have 3 entries


def stats_file(cache: Path) -> Path:
    """Where the statistics of the decoded dataset `cache` are kept: beside it."""
    return cache.with_name(cache.name + ".stats.json")


@torch.no_grad()
def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 N×C×H×W `images`, on the [0, 1] scale.

    Sums in float64 over chunks, so 50,000 CIFAR images need no more than a chunk's float copy.
    """
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(torch.float64).div_(255)
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return [round(v, 6) for v in mean.tolist()], [round(v, 6) for v in std.tolist()]


def _read_stats(path: Path) -> dict | None:
    try:
        stats = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing or damaged: computed again
    ok = isinstance(stats, dict) and all(
        isinstance(stats.get(k), list) and len(stats[k]) == CHANNELS for k in ("mean", "std"))
    return stats if ok else None


def auto_stats(ds, verbose: bool = True) -> dict:
    """{"mean", "std", "images", "cache"} of dataset config `ds`'s training split, computed once per
    decoded cache file and then read from the JSON beside it."""
    from harness.core.data.datasets import ensure_cache

    cache = ensure_cache(ds)
    path = stats_file(cache)
    stats = _read_stats(path)
    if stats is None:
        # mmap: only the training images are read, never the test split.
        blob = torch.load(cache, map_location="cpu", weights_only=True, mmap=True)
        mean, std = channel_stats(blob["train_x"])
        stats = {"mean": mean, "std": std, "images": len(blob["train_x"]), "cache": cache.name}
        write_text_atomic(path, json.dumps(stats, indent=1) + "\n")  # two jobs may race: same numbers, whole files
        how = "computed from"
    else:
        how = "read (cached) for"
    if verbose:
        print(f"[data] dataset.mean/std = auto: mean {stats['mean']}, std {stats['std']}, {how} the "
              f"{stats['images']} training images of {ds.name} ({path})", file=sys.stderr, flush=True)
    return stats


def is_auto(ds) -> bool:
    return ds.get("mean") == AUTO or ds.get("std") == AUTO


def normalization(ds, verbose: bool = True) -> tuple[list[float], list[float]]:
    """(mean, std) that images of dataset config `ds` are normalised with, `auto` resolved."""
    mean, std = ds.get("mean"), ds.get("std")
    if AUTO in (mean, std):
        stats = auto_stats(ds, verbose)
        mean = stats["mean"] if mean == AUTO else mean
        std = stats["std"] if std == AUTO else std
    return [float(v) for v in mean], [float(v) for v in std]


def resolve_normalization(cfg, verbose: bool = True):
    """Job config `cfg` with `auto` in dataset.mean/std replaced by the numbers (a copy; `cfg` itself is
    returned when there is no `auto`), so every part of the job (views, probes, add-ons) reads plain
    lists. The caller's config keeps `auto`, and with it its run key."""
    if not is_auto(cfg.dataset):
        return cfg
    mean, std = normalization(cfg.dataset, verbose)
    resolved = copy.deepcopy(cfg)
    with read_write(resolved):  # a composed config may be read-only
        resolved.dataset.mean, resolved.dataset.std = mean, std
    return resolved


def mean_std_errors(ds) -> list:
    """Config errors of `dataset.mean` and `dataset.std`: each `auto` or 3 numbers (std > 0)."""
    from harness.errors import ConfigError

    errors = []
    for field in ("mean", "std"):
        value = ds.get(field)
        if value == AUTO:
            continue
        plain = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        numbers = isinstance(plain, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in plain)
        if numbers and len(plain) == CHANNELS and (field == "mean" or all(v > 0 for v in plain)):
            continue
        allowed = (f"auto or a list of {CHANNELS} numbers{' > 0' if field == 'std' else ''}, one per RGB channel "
                   "(grayscale images are converted to RGB)")
        errors.append(ConfigError(f"dataset.{field}", plain, allowed))
    return errors
