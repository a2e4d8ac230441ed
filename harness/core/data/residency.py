"""Where the training images live while a job trains, and what that costs in memory.

``dataset.residency``:

- ``device``: the whole uint8 training set is copied to the training device once; each step indexes
  it there (the fastest path, CIFAR's).
- ``host``: the set stays in host memory, memory-mapped from the dataset cache (one copy per node in
  the page cache, shared by every rank); each step's batch is gathered into a pinned buffer by a
  helper thread while the previous step runs and copied to the device without blocking, on a stream
  of its own.
- ``auto``: ``device`` when the set plus the add-ons' copies of it (CLSP's candidate set) fits within
  ``dataset.device_memory_fraction`` of the device's free memory, else ``host``; the job says which
  and why.

The memory budget is checked with the config (``memory_errors``), before anything loads or runs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from harness.errors import ConfigError

RESIDENCIES = ("auto", "device", "host")
DEFAULT_DEVICE_FRACTION = 0.5
GB = 1e9


def gb(n: float) -> str:
    return f"{n / GB:,.1f} GB"


def addon_bytes(cfg, addon_classes: list[type], n_images: int, image_bytes: int) -> int:
    """Bytes the add-ons hold beside a training set of `n_images` images of `image_bytes` each, where the
    set is held (class hook ``held_bytes(cfg, n_images, image_bytes)``; CLSP: its K candidates per image,
    at its own image size)."""
    return int(sum(getattr(c, "held_bytes", lambda *_: 0)(cfg, n_images, image_bytes) for c in addon_classes))


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on `device` now; None on the CPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def choose(wanted: str, device: torch.device, set_bytes: int, fraction: float) -> tuple[str, str]:
    """(residency, why) for a training set of `set_bytes` (with the add-ons' copies) on `device`
    (an encoded set's `set_bytes` are its JPEG bytes)."""
    free = free_device_memory(device) if wanted == "auto" else None  # None on the CPU
    return choose_for_free(wanted, set_bytes, fraction, free, device)


def choose_for_free(wanted: str, set_bytes: int, fraction: float, free: int | None,
                    device: torch.device) -> tuple[str, str]:
    """choose's rule, given the device's free bytes (None: training on the CPU)."""
    if wanted != "auto":
        return wanted, f"dataset.residency={wanted}"
    if free is None:
        return "device", "training on the CPU: the host copy is the one the steps read"
    if set_bytes <= fraction * free:
        return "device", (f"the set ({gb(set_bytes)}) fits within dataset.device_memory_fraction={fraction:g} of "
                          f"the {gb(free)} free on {device}")
    return "host", (f"the set ({gb(set_bytes)}) exceeds dataset.device_memory_fraction={fraction:g} of the "
                    f"{gb(free)} free on {device}")


# ---------------------------------------------------------------------------------- the budget
@dataclass
class MemoryNeeds:
    """Bytes one rank holds for the data: on the device, privately on the host, and shared on the host
    (the memory-mapped cache, one copy per node in the page cache)."""

    device: int
    host_private: int
    host_shared: int
    residency: str  # the residency these figures assume (auto resolved where the device is visible)
    subsets: int = 0  # the subset files (shared, in host_shared), which one process writes from memory first


def _image_bytes(ds) -> int | None:
    if ds.get("store") == "encoded":  # JPEG bytes (harness/core/data/encoded.py)
        from harness.core.data.encoded import estimated_image_bytes

        return estimated_image_bytes(ds)
    if ds.name in ("cifar10", "cifar100"):
        return 3 * 32 * 32
    size = ds.get("image_size")
    return 3 * int(size) * int(size) if size else None


def _ranks_per_node() -> int:
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "").split("(")[0]
        if value.isdigit():
            return int(value)
    return 1


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _visible_device(cfg) -> torch.device:
    """The device this rank will train on, when it can be seen from here (else the CPU)."""
    if cfg.trainer.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local = os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or "0"
    return torch.device("cuda", int(local) % torch.cuda.device_count())


def memory_errors(cfg, counts, addon_classes: list[type]) -> list[ConfigError]:
    """The data's memory needs on this node checked against what it has, before anything loads.

    `counts` is the dataset's SplitCounts (harness.core.data.datasets.split_counts). Refused: a set
    that must go to the device (residency=device) but does not fit its free memory; private host
    subsets that the process writing them cannot hold (they are then shared, datasets.mapped_subset).
    """
    ds = cfg.dataset
    image = _image_bytes(ds)
    if counts is None or image is None:  # an unknown size is checked as the data loads
        return []
    needs = memory_needs(cfg, counts, image, addon_classes, _visible_device(cfg))
    errors = []
    wanted = ds.get("residency", "auto")
    device = _visible_device(cfg)
    if wanted == "device" and device.type == "cuda":
        free = free_device_memory(device)
        if needs.device > free:
            held = addon_bytes(cfg, addon_classes, 1, image)
            what = "the training set and what its add-ons hold" if held else "the training set"
            errors.append(ConfigError("dataset.residency", "device", f"host or auto: {what} need {gb(needs.device)} "
                                      f"on each GPU, {device} has {gb(free)} free"))
    available = _host_available()
    ranks = _ranks_per_node()
    if available is not None and needs.host_private * ranks + needs.subsets > available:
        field = "dataset.train_size" if ds.get("train_size") else "dataset.val_size" if ds.get("val_size") else \
            "dataset.test_size"
        errors.append(ConfigError(field, ds.get(field.split(".")[1]),
                                  f"subsets that fit in host memory: one process of this node writes its subsets "
                                  f"({gb(needs.subsets)}) into files shared by its {ranks} process(es), holding them "
                                  f"in memory meanwhile, with {gb(needs.host_private * ranks)} of pinned buffers, "
                                  f"more than the {gb(available)} available; without subsets (train_size=null, "
                                  f"val_size=0, test_size=null) the splits stay memory-mapped and shared "
                                  f"({gb(needs.host_shared - needs.subsets)} per node)"))
    return errors


def memory_needs(cfg, counts, image: int, addon_classes: list[type], device: torch.device) -> MemoryNeeds:
    """Bytes one rank holds for the data (see MemoryNeeds), from the config and the split's counts."""
    ds = cfg.dataset
    n_train_split, n_test_split = sum(counts.train), sum(counts.test)
    if ds.get("store") == "encoded":  # the mapped JPEG bytes, shared by the node; subsets are views of them,
        # and only each step's batch is decoded (on the device). residency=device also copies the training
        # images' bytes to each GPU; auto is counted as host, as below.
        residency = ds.get("residency", "auto") if device.type == "cuda" else "device"
        residency = "host" if residency == "auto" else residency
        n_train = int(ds.get("train_size") or (n_train_split - int(ds.get("val_size") or 0)))
        # What the add-ons hold (CLSP's candidates, decoded at their own size) goes where the set goes: to
        # each GPU, mapped and shared by the node (host), or loaded by each process (the CPU's "device").
        held = addon_bytes(cfg, addon_classes, n_train, image)
        on_gpu = residency == "device" and device.type == "cuda"
        on_device = n_train * image + held if on_gpu else 0
        shared = (n_train_split + n_test_split) * image + (held if residency == "host" else 0)
        private = 2 * int(cfg.trainer.batch_size) * image if device.type == "cuda" else 0  # a step's bytes, twice
        private += held if residency == "device" and not on_gpu else 0
        return MemoryNeeds(on_device, private, shared, residency)
    val = int(ds.get("val_size") or 0)
    n_train = int(ds.get("train_size") or (n_train_split - val))
    n_test = int(ds.get("test_size") or n_test_split)
    private = 0
    # Subsets and the hold-out are files of their own, memory-mapped like the cache and shared by the
    # node's ranks (datasets.mapped_subset); the process that writes one holds it once meanwhile.
    subsets = (n_train + val) * image if n_train < n_train_split else 0
    subsets += n_test * image if ds.get("test_size") else 0
    from harness.core.data.official import unlabeled_count

    unlabeled = unlabeled_count(ds)  # STL-10's: trained on (and copied by add-ons) beside the labelled split
    train_bytes = (n_train + unlabeled) * image + addon_bytes(cfg, addon_classes, n_train + unlabeled, image)
    wanted = ds.get("residency", "auto")
    residency = "device" if device.type != "cuda" else wanted
    if residency == "auto":
        # Not resolved here: that would start CUDA in the checking process (a sweep's launcher). Counted
        # as host (its pinned buffers); the job resolves it on its GPU and never refuses auto.
        residency = "host"
    on_device = train_bytes if residency == "device" and device.type == "cuda" else 0
    if residency == "host" and device.type == "cuda":
        private += 2 * int(cfg.trainer.batch_size) * image  # the two pinned batch buffers
    return MemoryNeeds(on_device, private, (n_train_split + n_test_split + unlabeled) * image + subsets, residency,
                       subsets)


# ---------------------------------------------------------------------------------- the batches
class DeviceBatches:
    """The whole training set on the device; a step indexes it there."""

    residency = "device"

    def __init__(self, images: torch.Tensor, device: torch.device):
        self.images, self.device = images.to(device), device

    def close(self) -> None:
        """Nothing to stop: the device batches need no helper."""

    def epoch(self, order: torch.Tensor, steps: range, start: Callable[[int], int],
              size: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(step, indices into the training set on the device, uint8 batch on the device) for each step."""
        order = order.to(self.device)
        for step in steps:
            idx = order[start(step):][:size]
            yield step, idx, self.images[idx]


class HostBatches:
    """The training set in (memory-mapped) host memory; each step's batch is gathered by a helper
    thread while the previous step runs, into one of two pinned buffers, and copied to the device on
    a stream of its own (non-blocking); the step's stream waits for that copy only."""

    residency = "host"

    def __init__(self, images: torch.Tensor, device: torch.device, size: int):
        self.images, self.device = images, device
        self.cuda = device.type == "cuda"
        self.buffers = [torch.empty((size, *images.shape[1:]), dtype=images.dtype, pin_memory=True)
                        for _ in range(2)] if self.cuda else []
        self.copied: list[torch.cuda.Event | None] = [None, None]
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="host-batches")

    def close(self) -> None:
        """Stop the helper thread (the run ends, or fails): a batch it still gathers is dropped."""
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _gather(self, slot: int, idx: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return self.images.index_select(0, idx)  # a fresh tensor: the step may keep its batch
        if self.copied[slot] is not None:  # the buffer's last copy to the device must be done
            self.copied[slot].synchronize()
        return torch.index_select(self.images, 0, idx, out=self.buffers[slot][:len(idx)])

    def epoch(self, order: torch.Tensor, steps: range, start: Callable[[int], int],
              size: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(step, indices into the training set on the device, uint8 batch on the device) for each step."""
        order = order.cpu()
        steps = list(steps)
        pending = self.pool.submit(self._gather, 0, order[start(steps[0]):][:size]) if steps else None
        for i, step in enumerate(steps):
            slot = i % 2
            batch = pending.result()
            idx = order[start(step):][:size]
            if i + 1 < len(steps):  # the next batch is gathered while this step runs
                pending = self.pool.submit(self._gather, 1 - slot, order[start(steps[i + 1]):][:size])
            if self.cuda:
                with torch.cuda.stream(self.stream):
                    x = batch.to(self.device, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(self.stream)
                self.copied[slot] = done
                current = torch.cuda.current_stream(self.device)
                current.wait_stream(self.stream)
                x.record_stream(current)  # x's memory belongs to the step's stream from here
            else:
                x = batch
            yield step, idx.to(self.device, non_blocking=True), x


def resolve(cfg, images: torch.Tensor, device: torch.device, addons: list, verbose: bool) -> str:
    """dataset.residency for this job's training set on `device` (auto resolved, and said on the main
    rank). Called before the add-ons are set up: their own image sets follow the same choice."""
    ds = cfg.dataset
    wanted = ds.get("residency", "auto") or "auto"
    fraction = float(ds.get("device_memory_fraction", DEFAULT_DEVICE_FRACTION))
    n = len(images)  # an encoded split's nbytes: its JPEG bytes
    set_bytes = int(images.nbytes) + addon_bytes(cfg, [type(a) for a in addons], n, int(images.nbytes) // max(n, 1))
    residency, why = choose(wanted, device, set_bytes, fraction)
    if verbose:
        print(f"[data] residency={residency}: {why}", file=sys.stderr, flush=True)
    return residency


def batch_source(residency: str, images: torch.Tensor, device: torch.device,
                 local_batch: int) -> DeviceBatches | HostBatches:
    """The training set placed as `residency` says (an encoded split brings its own source, which places
    its JPEG bytes as `residency` says and decodes each step's batch on the device)."""
    if hasattr(images, "batches"):
        return images.batches(device, local_batch, residency)
    if residency == "host":
        return HostBatches(images, device, local_batch)
    return DeviceBatches(images, device)
