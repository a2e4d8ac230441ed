"""The bill of a sweep before it runs (``dry_run=true``): per point and in total, device-hours and
wall-clock, plus the shared stages and the disk, each figure from a measurement this store holds.

- **Training.** The throughput (images/s, the median over a run's epochs of the ``images_per_s``
  metric, per device) of a recorded run with the same method, add-ons, backbone, dataset, image
  size and device; where none matches exactly, the nearest (the backbone and image size must match:
  they set the cost of a step), with what differs named. Images per epoch come from the point's
  data (its subset sizes, the split's counts, STL-10's unlabeled images); epochs from the point.
  Wall-clock of the sweep: the points spread over ``launcher.array_parallelism`` slots (1 locally).
- **Shared stages** (score network, DDPM, synthetic set): a stage already built costs nothing; one
  to build is priced from the ``build_seconds`` of a built artifact of the same kind (named).
- **Disk.** Decoded dataset caches are their arithmetic (images x 3 x H x W bytes); a point's run
  folder (checkpoint and rows) is the size of the matched run's folder.

No figure is printed without the measurement it came from: where the store holds none, the line
says "no measurement" and how to get one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

FIELDS = ("method", "weighting", "positives", "dataset", "device")  # may differ, named; backbone and size may not


@dataclass
class Measurement:
    run_id: str
    run_key: str
    method: str
    weighting: str
    positives: str
    backbone: str
    dataset: str
    image_size: int
    device: str
    world_size: int
    images_per_s: float  # per device


def _image_size(tree: dict[str, Any] | DictConfig) -> int:
    ds = tree.get("dataset") or {}
    return int(ds.get("image_size") or 32)


def measurements(store) -> list[Measurement]:
    """Every run of the store with a recorded throughput (an empty list when there is no store yet)."""
    if not Path(store.path).exists():
        return []
    rows = store.query("""
        SELECT r.run_id, any_value(r.run_key) AS run_key, any_value(r.config) AS config,
               any_value(r.device_name) AS device, any_value(coalesce(r.world_size, 1)) AS world_size,
               median(m.value) AS ips
        FROM runs r JOIN metrics m ON m.run_id = r.run_id AND m.name = 'images_per_s' AND m.value > 0
        GROUP BY r.run_id""", timeout=5)
    found = []
    for r in rows:
        try:
            tree = json.loads(r["config"] or "{}")
        except json.JSONDecodeError:
            continue
        method, weighting, positives, backbone, dataset = (str((tree.get(g) or {}).get("name") or "none") for g in
                                                           ("method", "weighting", "positives", "backbone", "dataset"))
        found.append(Measurement(r["run_id"], r["run_key"], method, weighting, positives, backbone, dataset,
                                 _image_size(tree), str(r["device"] or "?"),
                                 int(r["world_size"]), float(r["ips"]) / max(int(r["world_size"]), 1)))
    return found


def _point_identity(cfg: DictConfig) -> dict[str, Any]:
    name = lambda group: str(OmegaConf.select(cfg, f"{group}.name", default=None) or "none")  # noqa: E731
    return {"method": name("method"), "weighting": name("weighting"), "positives": name("positives"),
            "backbone": name("backbone"), "dataset": name("dataset"), "image_size": _image_size(cfg),
            "device": OmegaConf.select(cfg, "launcher.constraint", default=None)}


def nearest(cfg: DictConfig, found: list[Measurement]) -> tuple[Measurement | None, list[str]]:
    """The measurement nearest to point `cfg` and the fields in which it differs (None: none usable)."""
    want = _point_identity(cfg)
    usable = [m for m in found if m.backbone == want["backbone"] and m.image_size == want["image_size"]]
    if not usable:
        return None, []

    def differs(m: Measurement) -> list[str]:
        out = [f for f in ("method", "weighting", "positives", "dataset") if getattr(m, f) != want[f]]
        if want["device"] and str(want["device"]).lower() not in m.device.lower():
            out.append("device")
        return out

    best = min(usable, key=lambda m: (len(differs(m)), [f in differs(m) for f in FIELDS], -m.images_per_s))
    return best, differs(best)


def train_images(cfg: DictConfig) -> int | None:
    """Images one epoch of point `cfg` trains on (None when the data cannot be counted before loading)."""
    from harness.core.data.datasets import split_counts

    ds = cfg.dataset
    counts = split_counts(ds)
    if counts is None:
        return None
    return int(ds.get("train_size") or sum(counts.train) - int(ds.get("val_size") or 0)) + unlabeled_images(cfg)


def unlabeled_images(cfg: DictConfig) -> int:
    """STL-10's unlabeled images that pretraining adds (0 for every other dataset)."""
    from harness.core.data.official import unlabeled_count

    return unlabeled_count(cfg.dataset)


def cache_bytes(cfg: DictConfig) -> int | None:
    """Bytes of the decoded-tensor cache of point `cfg`'s dataset: its images x 3 x H x W."""
    from harness.core.data.datasets import split_counts

    counts = split_counts(cfg.dataset)
    if counts is None:
        return None
    size = _image_size(cfg)
    images = sum(counts.train) + sum(counts.test) + unlabeled_images(cfg)
    return images * 3 * size * size


def _folder_bytes(folder: Path) -> int | None:
    if not folder.is_dir():
        return None
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _gpus(cfg: DictConfig) -> int:
    nodes = int(OmegaConf.select(cfg, "launcher.nodes", default=1) or 1)
    return nodes * int(OmegaConf.select(cfg, "launcher.gpus_per_node", default=1) or 1)


def hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 360 else f"{seconds / 60:,.1f} min"


def gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**27 else f"{n / 2**20:,.1f} MiB"


@dataclass
class PointBill:
    text: str  # the estimate and where it came from, or why there is none
    device_seconds: float | None
    wall_seconds: float | None
    run_bytes: int | None


def point_bill(cfg: DictConfig, found: list[Measurement], runs_dir: Path, done: bool) -> PointBill:
    """The training cost of one point from the nearest measurement (or the line saying there is none)."""
    if done:
        return PointBill("already completed: 0 h", 0.0, 0.0, 0)
    match, differs = nearest(cfg, found)
    ident = _point_identity(cfg)
    if match is None:
        return PointBill(f"no measurement of {ident['backbone']} at {ident['image_size']} px in this store: run one "
                         "epoch of this point on one GPU first (the same overrides with trainer.epochs=1; or "
                         "benchmarks/epoch_gpu.py for SimCLR on CIFAR-10)", None, None, None)
    n = train_images(cfg)
    if n is None:
        return PointBill("images per epoch unknown before the data are decoded: no estimate", None, None, None)
    gpus = _gpus(cfg)
    epochs = int(cfg.trainer.epochs)
    wall = epochs * n / (match.images_per_s * gpus)
    near = "same setting" if not differs else "nearest: " + ", ".join(
        f"{f} {getattr(match, f)}" for f in differs) + " differ" + ("s" if len(differs) == 1 else "")
    text = (f"{hours(wall * gpus)} on {gpus} device{'s' if gpus > 1 else ''} ({epochs} ep x {n:,} img at "
            f"{match.images_per_s:,.0f} img/s per device, from run {match.run_id} on {match.device}; {near})")
    return PointBill(text, wall * gpus, wall, _folder_bytes(runs_dir / match.run_key))


def stage_bills(points: list[DictConfig]) -> list[str]:
    """One line per shared stage the points need (the dataset caches are under disk): done, or priced from a
    built artifact of the same kind, or no measurement."""
    from harness.jobs.stages import sweep_stages

    stages, _ = sweep_stages(points)
    lines = []
    for stage in stages:
        if stage.name == "dataset-cache":
            continue
        if stage.done():
            lines.append(f"  {stage.name}: already built ({stage.key})")
            continue
        kind = Path(stage.key).parent
        built = []
        for manifest in sorted(kind.glob("*/artifact.json")) if kind.is_dir() else []:
            try:
                seconds = json.loads(manifest.read_text()).get("build_seconds")
            except (OSError, ValueError):
                continue
            if seconds:
                built.append((float(seconds), manifest.parent))
        if built:
            seconds, where = built[-1]
            size = _folder_bytes(where) or 0
            lines.append(f"  {stage.name} {Path(stage.key).name}: {hours(seconds)} and {gib(size)} (from the built "
                         f"{kind.name} at {where}; its config may differ)")
        else:
            lines.append(f"  {stage.name} {Path(stage.key).name}: no measurement: no {kind.name} artifact has been "
                         f"built in {kind.parent} yet (build one, then preview again)")
    return lines


def print_bill(points: list[DictConfig], would_run: list[bool]) -> None:
    """Print the bill of `points` (the sweep's, already checked): per point, the total, stages and disk."""
    from harness.core.data.datasets import cache_file
    from harness.store import Store

    if not points:
        return
    first = points[0]
    store = Store(first.store.path, first.store.get("runs_dir"))
    try:
        found = measurements(store)
        source = f"{len(found)} measured run{'s' if len(found) != 1 else ''} in {store.path}"
    except Exception as e:  # noqa: BLE001 - a busy or unreadable store: say so, estimate nothing
        found, source = [], f"the store {store.path} could not be read ({type(e).__name__})"
    print(f"\nThe bill (estimates from {source}; never without the measurement named):")
    bills = [point_bill(cfg, found, store.runs, not run) for cfg, run in zip(points, would_run)]
    for i, bill in enumerate(bills):
        print(f"  #{i}: {bill.text}")
    priced = [b for b in bills if b.device_seconds is not None]
    missing = len(bills) - len(priced)
    slots = int(OmegaConf.select(first, "launcher.array_parallelism", default=1) or 1) \
        if OmegaConf.select(first, "launcher.name", default="local") == "slurm" else 1
    walls = sorted((b.wall_seconds for b in priced), reverse=True)
    lanes = [0.0] * max(1, min(slots, len(walls) or 1))
    for w in walls:  # longest first onto the least loaded slot
        lanes[lanes.index(min(lanes))] += w
    total = sum(b.device_seconds for b in priced)
    print(f"  total: {hours(total)} device time, about {hours(max(lanes))} wall-clock at {slots} point"
          f"{'s' if slots != 1 else ''} at once (launcher.array_parallelism)"
          + (f"; {missing} point{'s' if missing != 1 else ''} without a measurement not counted" if missing else ""))
    stages = stage_bills(points)
    if stages:
        print("Shared stages (each built once, before the points that need it):")
        print("\n".join(stages))
    caches: dict[str, int | None] = {}
    for cfg in points:
        try:
            key = str(cache_file(cfg.dataset) or f"{cfg.dataset.name} (after its download)")
        except Exception:  # noqa: BLE001 - a source that cannot be resolved was refused before this
            continue
        if not Path(key).exists():
            caches.setdefault(key, cache_bytes(cfg))
    runs = [b.run_bytes for b in bills if b.run_bytes]
    unknown_runs = sum(1 for b, run in zip(bills, would_run) if run and b.run_bytes is None)
    disk = [f"{gib(sum(caches.values()))} for {len(caches)} dataset cache{'s' if len(caches) != 1 else ''} to decode"
            if caches and all(v is not None for v in caches.values()) else
            ("no new dataset cache" if not caches else "dataset caches: size unknown before decoding")]
    if runs:
        disk.append(f"{gib(sum(runs))} for {len(runs)} run folder{'s' if len(runs) != 1 else ''} (checkpoint "
                    "and rows, as the matched runs' folders)")
    if unknown_runs:
        disk.append(f"{unknown_runs} run folder{'s' if unknown_runs != 1 else ''} unknown (no matched run folder)")
    print("Disk: " + "; ".join(disk) + ".")
    if math.isfinite(total) and total == 0 and not missing:
        print("Nothing to pay: every point is done.")
