"""Datasets as whole uint8 tensors, decoded once and cached.

SSL on CIFAR-sized images is bound by data movement, so a dataset here is four tensors
(train/test images as N×3×H×W uint8, labels as int64). Decoding is slow (60,000 JPEGs take about
10 s on one core; ImageNet-100 far longer), so it runs once, in parallel processes, into one
cache file keyed by where the images came from; jobs map that file (torch.load(mmap=True)), so
a job starts in well under a second and the processes of a node share one copy in the page
cache. Image folders are decoded as the ImageNet pipelines do: the shorter side resized to
dataset.image_size, then the centre crop (aspect kept). Whether the training set then goes to
the device whole or stays in host memory is harness/core/data/residency.py's choice.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import shutil
import sys
import tarfile
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness.atomic import atomic_file, lock_or_wait
from harness.core.data import official
from harness.core.data.workers import DecodeFailed, WorkerDied, map_in_processes, usable_cores
from harness.core.progress import Progress
from harness.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")
ARCHIVE_ENV = "HARNESS_CIFAR10_ARCHIVE"
REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_CIFAR10_ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"


@dataclass
class ImageData:
    """A labelled image dataset held as uint8 tensors (N×3×H×W) and int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    source: str
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    # Position of each training image in the full training split: the stable image id that
    # per-image artifacts (synthetic positives) are indexed by.
    train_index: torch.Tensor | None = None
    # Where the training images live while training (harness/core/data/residency.py): the trainer
    # sets it before add-ons are set up, so an add-on's own image sets (CLSP's candidates) follow it.
    residency: str = "device"
    # The images SSL trains on when they are more than the labelled train split (STL-10's train +
    # unlabeled), and their positions in the full pretraining split (the labelled ones first, at
    # the positions train_index gives). None: training uses train_x. Probes never see them.
    pretrain_x: torch.Tensor | None = None
    pretrain_index: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ---------------------------------------------------------------------------------- discovery
def default_archive() -> Path | None:
    """The CIFAR-10 JPEG archive to use when none is configured, if this machine has one."""
    env = os.environ.get(ARCHIVE_ENV)
    if env:
        return Path(env)
    return DEFAULT_CIFAR10_ARCHIVE if DEFAULT_CIFAR10_ARCHIVE.exists() else None


def _torchvision_folder(root: Path, name: str) -> Path | None:
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    if (root / folder).is_dir():
        return root / folder
    if root.name == folder and root.is_dir():
        return root
    return None


def _is_image_tree(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def resolve_source(ds) -> tuple[str, Path | None]:
    """Decide where the images of dataset config `ds` come from, in the documented order.

    Returns (kind, path) with kind one of torchvision, folder, archive, download.
    """
    name = ds.name
    if ds.get("root"):
        root = Path(str(ds.root)).expanduser()
        if not root.exists():
            raise ConfigError("dataset.root", ds.root, "an existing directory")
        if name in official.NAMES:  # their own release layouts: official.py
            return name, official.check(ds, root)
        if name in ("cifar10", "cifar100") and _torchvision_folder(root, name):
            return "torchvision", root
        if _is_image_tree(root):
            return "folder", root
        allowed = "a train/<class>/* and test/<class>/* image tree"
        if name in ("cifar10", "cifar100"):
            allowed = f"torchvision's {name} files (e.g. cifar-10-batches-py/) or " + allowed
        raise ConfigError("dataset.root", ds.root, allowed)
    if name == "imagefolder":
        raise ConfigError("dataset.root", None, "a directory with train/<class>/* and test/<class>/* images")
    if name in official.NAMES and not ds.get("download", False):
        raise ConfigError("dataset.root", None, f"a directory with the {name} release, or dataset.download=true")
    archive = ds.get("archive")
    if archive == "auto":  # null means no archive at all
        archive = default_archive() if name == "cifar10" else None
    if archive:
        archive = Path(str(archive)).expanduser()
        if not archive.exists():
            raise ConfigError("dataset.archive", str(archive), "an existing .tar/.tar.xz of train/ and test/ images")
        return "archive", archive
    if ds.get("download", True):
        return "download", None
    raise ConfigError(
        "dataset.root",
        None,
        f"a directory with the {name} images, a dataset.archive, or dataset.download=true",
    )


SAMPLED_BYTES = 4096  # read from each end of an image file for its folder's manifest


def _file_fingerprint(path: Path) -> str:
    """Size and a hash of the first and last SAMPLED_BYTES (so the whole of any file up to 8 KiB)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(SAMPLED_BYTES)
        if size > 2 * SAMPLED_BYTES:
            fh.seek(size - SAMPLED_BYTES)
        tail = fh.read(SAMPLED_BYTES)
    return f"{size}:{hashlib.sha256(head + tail).hexdigest()[:16]}"


@cache
def folder_manifest(root: str | Path) -> str:
    """The identity of an image folder: a hash of the image files it holds (the files
    ``dataset=imagefolder`` reads, train/<class>/* and test/<class>/*), each as its path inside
    the folder, its size and a hash of its first and last 4 KiB.

    A copy moved or copied elsewhere is the same data (modification times are left out: a copy
    changes them); a file added, removed, renamed, resized or changed is not, with one exception
    kept for speed: a same-size edit only in the middle of a file over 8 KiB (compressed images
    almost always change size when edited; CIFAR-sized files are hashed whole). Hashing every
    byte would read the whole dataset (ImageNet-100: 14 GB) before each job. One walk of the
    folder, cached per process (a test that changes a folder calls ``folder_manifest.cache_clear()``).
    """
    root = Path(str(root)).expanduser()
    digest = hashlib.sha256()
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise ConfigError("dataset.root", str(root), "a directory with train/<class>/* and test/<class>/* images")
        for cls_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            for f in sorted(cls_dir.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    digest.update(f"{split}/{cls_dir.name}/{f.name}\t{_file_fingerprint(f)}\n".encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------- decoding
# Part of an image folder's cache key: a change to how images are decoded must not reuse old caches.
DECODE_VERSION = "short-side-resize-center-crop-1"


def _fit(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (bicubic, antialiased when shrinking), then take the centred
    size x size crop, as the standard ImageNet pipelines do (Resize + CenterCrop): aspect is kept."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _decode(source: bytes | str, size: int | None) -> np.ndarray:
    """One image file (its bytes or its path) as H x W x 3 uint8; at `size` x `size` when `size` is set."""
    img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    if size and img.format == "JPEG":
        # libjpeg decodes straight at a 1/2, 1/4 or 1/8 scale no smaller than what the resize needs:
        # a 500 px JPEG for 224 px storage is decoded at 250 px, several times faster.
        w, h = img.size
        img.draft("RGB", (math.ceil(w * size / min(w, h)), math.ceil(h * size / min(w, h))))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # a palette's transparent entry goes through RGBA, as PIL asks
    img = img.convert("RGB")  # grayscale, palette, CMYK and alpha images all become 3 channels
    if size:
        img = _fit(img, size)
    return np.asarray(img, dtype=np.uint8)


def _split_and_class(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """('…', 'train', 'dog', 'x.jpg') -> ('train', 'dog')."""
    for i in range(len(parts) - 2, 0, -1):
        if parts[i - 1] in ("train", "test"):
            return parts[i - 1], parts[i]
    return None


def decode_workers(ds) -> int:
    """Processes that decode: dataset.decode_workers, else every core this process may use (then at
    most one per IMAGES_PER_PROCESS images)."""
    configured = ds.get("decode_workers")
    if configured:
        return int(configured)
    return usable_cores()


IMAGES_PER_PROCESS = 1000
_OPEN_OUTPUTS: dict[str, np.ndarray] = {}  # per worker process: the output arrays it has opened


def _decode_chunk(task: tuple[dict[str, str], list[tuple[str, int, bytes | str]], int | None]) -> list[str]:
    """Decode a chunk of (split, row, source) into row `row` of the split's preallocated .npy array
    (opened memory-mapped, so each worker writes its rows in place). Returns the images whose size
    differs from the split's array (only possible when the images keep their native size)."""
    outputs, chunk, size = task
    mismatched = []
    for split, row, source in chunk:
        out = _OPEN_OUTPUTS.get(outputs[split])
        if out is None:
            out = _OPEN_OUTPUTS[outputs[split]] = np.load(outputs[split], mmap_mode="r+")
        img = _decode(source, size)
        if img.shape[:2] != out.shape[2:]:
            name = source if isinstance(source, str) else f"{split} image {row}"
            mismatched.append(f"{name} is {img.shape[1]}x{img.shape[0]}")
            continue
        out[row] = img.transpose(2, 0, 1)
    for out in _OPEN_OUTPUTS.values():
        out.flush()
    return mismatched


def _native_size(source: bytes | str) -> tuple[int, int]:
    """(height, width) of an image, from its header."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        return img.size[1], img.size[0]


def _collect(items: list[tuple[str, str, bytes | str]], size: int | None, what: str, workers: int,
             scratch: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """Decode (split, class, bytes or path) items into per-split N x 3 x H x W uint8 arrays with
    alphabetical class ids, in `workers` processes that write straight into preallocated arrays
    (memory-mapped .npy files under `scratch`, removed by the caller).

    `size` None keeps the images' native size, which all of them must share.
    """
    classes = sorted({cls for _, cls, _ in items})
    index = {c: i for i, c in enumerate(classes)}
    rows: dict[str, list[tuple[int, bytes | str]]] = {"train": [], "test": []}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    for split, cls, source in items:
        rows[split].append((len(rows[split]), source))
        labels[split].append(index[cls])
    for split in ("train", "test"):
        if not rows[split]:
            raise ValueError(f"{what}: no {split} images found")
    height, width = (size, size) if size else _native_size(rows["train"][0][1])
    if not size and "imagefolder" in what:
        print(f"[data] dataset.image_size=null: keeping the images' native size {width}x{height} "
              "(all must share it)", file=sys.stderr, flush=True)
    outputs = {}
    for split in ("train", "test"):
        outputs[split] = str(scratch / f"{split}.npy")
        np.lib.format.open_memmap(outputs[split], mode="w+", dtype=np.uint8,
                                  shape=(len(rows[split]), 3, height, width)).flush()
    jobs = [(split, row, source) for split in ("train", "test") for row, source in rows[split]]
    total = len(jobs)
    # Chunks small enough to balance the workers and show progress, large enough to keep overheads low.
    per_chunk = max(16, min(512, total // (workers * 8) or 16))
    chunks = [(outputs, jobs[i:i + per_chunk], size) for i in range(0, total, per_chunk)]
    workers = max(1, min(workers, len(chunks)))
    progress = Progress(f"[data] {what}:", total, every=3.0)
    print(f"[data] {what}: {total} images in {workers} process{'es' if workers > 1 else ''}", file=sys.stderr,
          flush=True)
    mismatched: list[str] = []
    done = 0
    results = map(_decode_chunk, chunks) if workers == 1 else map_in_processes(_decode_chunk, chunks, workers, __name__)
    try:
        for chunk, bad in zip(chunks, results):
            done += len(chunk[1])
            mismatched += bad
            progress.update(done, f"{done}/{total} images", final=done == total)
    except WorkerDied as e:
        raise DecodeFailed(f"{what}: a decode worker died ({e.how}) after {done} of "
                           f"{total} images; nothing was cached. Run again (with fewer dataset.decode_workers if "
                           "memory is short)") from e
    finally:
        _OPEN_OUTPUTS.clear()
    if mismatched:
        raise ValueError(f"{what}: images of different sizes with dataset.image_size=null: the first is "
                         f"{width}x{height}, but {', '.join(mismatched[:3])}"
                         f"{f' and {len(mismatched) - 3} more' if len(mismatched) > 3 else ''}; set "
                         "dataset.image_size (each image's shorter side is resized to it, then centre-cropped)")
    out = {}
    for split in ("train", "test"):
        x = torch.from_numpy(np.load(outputs[split], mmap_mode="r+"))
        out[split] = (x, torch.tensor(labels[split], dtype=torch.int64))
    return out, classes


def _archive_items(path: Path) -> list[tuple[str, str, bytes]]:
    """(split, class, bytes) of every image in a tar archive (the compressed files: small)."""
    items = []
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if not member.isfile() or not member.name.lower().endswith(IMAGE_SUFFIXES):
                continue
            where = _split_and_class(Path(member.name).parts)
            if where:
                items.append((*where, tar.extractfile(member).read()))
    return items


def _folder_items(root: Path) -> list[tuple[str, str, str]]:
    """(split, class, path) of every image in a train/<class>/*, test/<class>/* tree, in sorted order."""
    items = []
    for split in ("train", "test"):
        for cls_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            for f in sorted(cls_dir.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    items.append((split, cls_dir.name, str(f)))
    return items


def _load_torchvision_pickles(folder: Path, name: str):
    """Read torchvision's CIFAR python-pickle files directly (no torchvision needed)."""

    def read(files: list[str], label_key: str):
        xs, ys = [], []
        for f in files:
            with open(folder / f, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.extend(entry[label_key])
        return torch.from_numpy(np.concatenate(xs)), torch.tensor(ys, dtype=torch.int64)

    if name == "cifar10":
        train = read([f"data_batch_{i}" for i in range(1, 6)], "labels")
        test = read(["test_batch"], "labels")
        meta, key = "batches.meta", "label_names"
    else:
        train = read(["train"], "fine_labels")
        test = read(["test"], "fine_labels")
        meta, key = "meta", "fine_label_names"
    with open(folder / meta, "rb") as fh:
        classes = pickle.load(fh, encoding="latin1")[key]
    return {"train": train, "test": test}, list(classes)


def _download(name: str, cache_dir: Path) -> Path:
    """torchvision's download, for users with the internet; returns the root it wrote."""
    from harness.core.tv import torchvision

    root = cache_dir / "downloads"
    if name in official.NAMES:
        return official.download(name, root)
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}.get(name)
    if cls is None:
        raise ConfigError("dataset.download", True, "only cifar10 and cifar100 can be downloaded")
    cls(str(root), train=True, download=True)
    cls(str(root), train=False, download=True)
    return root


# ---------------------------------------------------------------------------------- caching
def _cache_key(kind: str, path: Path | None, name: str, size: int | None) -> str:
    ident = [kind, name, str(size)]
    if path is not None:
        st = path.stat()
        ident += [str(path.resolve()), str(st.st_size), str(int(st.st_mtime))]
    if kind == "folder":  # a folder's own mtime does not change when a file in train/<class>/ does
        ident += [folder_manifest(path), DECODE_VERSION]
    if kind in official.NAMES:
        ident += [official.fingerprint(kind, path), DECODE_VERSION]
    return hashlib.sha256("|".join(ident).encode()).hexdigest()[:16]


def _cache_file(ds, kind: str, path: Path | None) -> Path:
    """The decoded-tensor cache of the images at `path` (read by kind) for dataset config `ds`."""
    size = _image_size(ds)
    if ds.name == "stl10" and not ds.get("unlabeled", True):
        size = f"{size}-labelled"  # a cache without the unlabeled split is another file
    return cache_dir(ds) / f"{ds.name}-{_cache_key(kind, path, ds.name, size)}.pt"


def _image_size(ds) -> int | None:
    """The size images are stored at: dataset.image_size for folders and the official releases."""
    if ds.name == "imagefolder":
        return ds.get("image_size")
    if ds.name in official.NAMES:
        return int(ds.get("image_size") or official.NATIVE_SIZE[ds.name])
    return None


def cache_dir(ds) -> Path:
    """Where decoded datasets are cached: dataset.cache_dir, $HARNESS_CACHE or ~/.cache/harness."""
    configured = ds.get("cache_dir")
    if configured:
        return Path(str(configured)).expanduser()
    return Path(os.environ.get("HARNESS_CACHE", "~/.cache/harness")).expanduser() / "datasets"


def cache_file(ds) -> Path | None:
    """Where `ensure_cache` puts the decoded dataset of `ds`; None while a download has still to fetch
    its files (the key covers them)."""
    kind, path = resolve_source(ds)
    if kind == "download" and ds.name in official.NAMES:
        path = official.folder(cache_dir(ds) / "downloads", ds.name)
        return _cache_file(ds, ds.name, path) if not official.missing(ds.name, path) else None
    if kind == "download":
        kind, path = "torchvision", cache_dir(ds) / "downloads"  # where _download puts them
        if not _torchvision_folder(path, ds.name):
            return None
    return _cache_file(ds, kind, path)


def ensure_cache(ds, lock_timeout_s: float | None = None) -> Path:
    """Decode the dataset of config `ds` into its cache file unless it is there; return the file.

    The decode happens once: the first process takes ``<file>.lock`` and writes the file atomically;
    any other process that needs the same file says it waits, waits (at most `lock_timeout_s`, else
    LockWaitTimeout names the lock and the option), and then reads it. This is the
    build function of the dataset's stage (run before training jobs start) and the fallback of a
    job that finds no cache.
    """
    kind, path = resolve_source(ds)
    cdir = cache_dir(ds)
    if kind == "download":
        path = _download(ds.name, cdir)
        kind = "torchvision"
        if ds.name in official.NAMES:
            kind, path = ds.name, official.check(ds, path)
    cache = _cache_file(ds, kind, path)
    if cache.exists():
        return cache
    cdir.mkdir(parents=True, exist_ok=True)
    lock = lock_or_wait(str(cache) + ".lock", f"[data] another job is decoding {ds.name} into {cache}; waiting for it",
                        lock_timeout_s)
    try:
        if cache.exists():
            return cache
        size = _image_size(ds)
        what = f"decoding {ds.name} from {path}"
        print(f"[data] {what} into {cache}", file=sys.stderr, flush=True)
        if kind == "folder":  # say once what decoding changes (RGB conversion, resizing): folder_notes.py
            from harness.core.data.folder_notes import announce_folder_changes

            announce_folder_changes(path, size, IMAGE_SUFFIXES)
        scratch = Path(str(cache) + ".decoding")  # the preallocated arrays the workers write into
        shutil.rmtree(scratch, ignore_errors=True)  # left by a job killed while decoding
        scratch.mkdir()
        try:
            if kind == "stl10":
                blob = official.read_stl10(path, size, bool(ds.get("unlabeled", True)), scratch)
                splits = {s: (blob[f"{s}_x"], blob[f"{s}_y"]) for s in ("train", "test")}
                classes = blob["classes"]
            elif kind == "torchvision":
                splits, classes = _load_torchvision_pickles(_torchvision_folder(path, ds.name), ds.name)
            else:
                if kind == "tinyimagenet":
                    items = official.tiny_items(path)
                else:
                    items = _archive_items(path) if kind == "archive" else _folder_items(path)
                workers = decode_workers(ds)
                if not ds.get("decode_workers"):  # a process costs seconds to start (it imports torch)
                    workers = min(workers, max(1, len(items) // IMAGES_PER_PROCESS))
                splits, classes = _collect(items, size, what, workers, scratch)
            blob = {
                "train_x": splits["train"][0],
                "train_y": splits["train"][1],
                "test_x": splits["test"][0],
                "test_y": splits["test"][1],
                "classes": classes,
                "source": f"{kind}:{path}",
            }
            # torch's zip format stores each tensor uncompressed and aligned: load_full maps it
            # (torch.load(mmap=True)), so the images are read as they are used and shared by every
            # process on the node through the page cache.
            with atomic_file(cache) as f:  # a reader sees the whole file or none
                torch.save(blob, f)
            return cache
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        lock.release()


def load_full(ds) -> ImageData:
    """The whole dataset described by config `ds`, memory-mapped from its cache (decoded first if
    needed): nothing is read until it is used, and every process on a node shares the pages."""
    return _read_cache(ensure_cache(ds))


def _read_cache(cache: Path) -> ImageData:
    data = ImageData(**torch.load(cache, weights_only=True, mmap=True))
    if len(data.train_x) > len(data.train_y):  # labelled images first, then unlabeled (official.read_stl10)
        data.pretrain_x, data.train_x = data.train_x, data.train_x[:len(data.train_y)]
        data.pretrain_index = torch.arange(len(data.pretrain_x))
    return data


def pretraining_view(data: ImageData) -> ImageData:
    """What SSL and its add-ons (score network, DDPM, synthetic positives) train on: `data` itself, or
    for STL-10 the labelled train images followed by the unlabeled ones, labelled -1, at their positions
    in the full pretraining split. The probes keep reading `data`'s labelled split."""
    if data.pretrain_x is None:
        return data
    labels = torch.full((len(data.pretrain_x),), -1, dtype=torch.int64)
    labels[: len(data.train_y)] = data.train_y  # the labelled images come first (load_dataset)
    return replace(data, train_x=data.pretrain_x, train_y=labels, train_index=data.pretrain_index, pretrain_x=None,
                   pretrain_index=None)


SUBSET_LOCK_TIMEOUT_S = 600.0  # writing a subset file takes as long as reading its images once


def mapped_subset(cache: Path, images: torch.Tensor, idx: torch.Tensor, split: str) -> torch.Tensor:
    """`images[idx]` as a file beside the cache, memory-mapped: written once (the first process of a
    node, under a lock) and then shared by every rank through the page cache, instead of one copy in
    each rank's memory. Its name is the cache's plus a hash of the index, so a subset is one file."""
    digest = hashlib.sha1(idx.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    path = cache.with_name(f"{cache.name}.{split}-{digest}.pt")
    if not path.exists():
        lock = lock_or_wait(str(path) + ".lock", f"[data] another process writes the {split} subset {path}; "
                            "waiting for it", SUBSET_LOCK_TIMEOUT_S)
        try:
            if not path.exists():
                with atomic_file(path) as f:  # a reader sees the whole file or none
                    torch.save({"images": images[idx].contiguous()}, f)
        finally:
            lock.release()
    return torch.load(path, weights_only=True, mmap=True)["images"]


def class_quota(num_classes: int, size: int, gen: torch.Generator) -> list[int]:
    """How many of `size` items each class gives to a balanced subset: size // C, and one more for the
    first size % C classes of a permutation drawn from `gen`."""
    extra = set(torch.randperm(num_classes, generator=gen)[: size % num_classes].tolist())
    return [size // num_classes + (1 if i in extra else 0) for i in range(num_classes)]


def balanced_subset(labels: torch.Tensor, size: int, seed: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of a class-balanced random subset of `size` items (sorted), seeded.

    Each class gets size // C items, and the first size % C classes (in a seeded order) one more.
    """
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    if len(classes) == 0:
        raise ValueError(f"a balanced subset of {size} items was asked of no items")
    pool_mask = torch.ones(len(labels), dtype=torch.bool)
    if exclude is not None:
        pool_mask[exclude] = False
    chosen = []
    for c, want in zip(classes.tolist(), class_quota(len(classes), size, gen)):
        pool = torch.nonzero((labels == c) & pool_mask).flatten()
        if want > len(pool):
            raise ValueError(f"class {c} has {len(pool)} images, fewer than the {want} a balanced subset needs")
        chosen.append(pool[torch.randperm(len(pool), generator=gen)[:want]])
    return torch.sort(torch.cat(chosen)).values


def load_dataset(ds) -> ImageData:
    """The dataset of config `ds` with its validation hold-out and train/test subsets applied; subsets
    stay memory-mapped and shared by the node's processes (`mapped_subset`)."""
    cache = ensure_cache(ds)
    return with_subsets(_read_cache(cache), ds, cache)


def with_subsets(data: ImageData, ds, cache: Path | None = None) -> ImageData:
    """`data` (a whole dataset) with the hold-out and subsets of config `ds` applied. A subset of a decoded
    split is a file beside its `cache`, mapped and shared by the node's ranks (`mapped_subset`); of an
    encoded split, a view of the same bytes."""

    def rows(images, idx: torch.Tensor, split: str):
        if hasattr(images, "take_rows"):
            return images.take_rows(idx)
        return mapped_subset(cache, images, idx, split) if cache is not None else images[idx]

    labelled = len(data.train_y)
    seed = int(ds.get("subset_seed", 0))
    val_size = int(ds.get("val_size") or 0)
    train_idx = torch.arange(len(data.train_y))
    if val_size:
        val_idx = balanced_subset(data.train_y, val_size, seed + 1)
        data.val_x, data.val_y = rows(data.train_x, val_idx, "val"), data.train_y[val_idx]
        keep = torch.ones(len(data.train_y), dtype=torch.bool)
        keep[val_idx] = False
        train_idx = torch.nonzero(keep).flatten()
    if ds.get("train_size"):
        sub = balanced_subset(data.train_y[train_idx], int(ds.train_size), seed)
        train_idx = train_idx[sub]
    if len(train_idx) < len(data.train_y):
        data.train_x, data.train_y = rows(data.train_x, train_idx, "train"), data.train_y[train_idx]
    data.train_index = train_idx  # the whole split stays memory-mapped (shared by the node's processes)
    if data.pretrain_x is not None and len(train_idx) < labelled:
        # A hold-out or subset of the labelled split leaves its other images out of pretraining too.
        data.pretrain_x = torch.cat([data.train_x, data.pretrain_x[labelled:]])
        data.pretrain_index = torch.cat([train_idx, torch.arange(labelled, len(data.pretrain_index))])
    if ds.get("test_size"):
        test_idx = balanced_subset(data.test_y, int(ds.test_size), seed)
        data.test_x, data.test_y = rows(data.test_x, test_idx, "test"), data.test_y[test_idx]
    return data


# ---------------------------------------------------------------------------------- sizes, before loading
# Images per class in the train and test splits of the standard datasets (both are balanced).
KNOWN_COUNTS = {"cifar10": ([5000] * 10, [1000] * 10), "cifar100": ([500] * 100, [100] * 100), **official.KNOWN_COUNTS}


@dataclass
class SplitCounts:
    """Images per class (classes that have any, in label order) of each split, and where that came from."""

    train: list[int]
    test: list[int]
    source: str


def _cached_counts(cache: Path) -> SplitCounts:
    # mmap: only the label tensors are read, never the images.
    blob = torch.load(cache, map_location="cpu", weights_only=True, mmap=True)
    n = len(blob["classes"])
    train, test = (torch.bincount(blob[k], minlength=n).tolist() for k in ("train_y", "test_y"))
    return SplitCounts([c for c in train if c], [c for c in test if c], f"the cached dataset {cache}")


@lru_cache(maxsize=16)
def _listed_counts(root: Path, mtimes: tuple[float, ...]) -> SplitCounts:
    """Images per class of a train/<class>/*, test/<class>/* tree, from its listing (as _iter_folder reads it).

    `mtimes` (of the split folders) only keys the memo: a sweep's launcher checks every point.
    """
    found: dict[str, dict[str, int]] = {}
    for split in ("train", "test"):
        found[split] = {}
        for cls_dir in (e for e in os.scandir(root / split) if e.is_dir()):
            n = sum(1 for f in os.scandir(cls_dir.path) if os.path.splitext(f.name)[1].lower() in IMAGE_SUFFIXES)
            if n:
                found[split][cls_dir.name] = n
    return SplitCounts(*([n for _, n in sorted(found[s].items())] for s in ("train", "test")),
                       f"the listing of {root}")


def split_counts(ds) -> SplitCounts | None:
    """Images per class of dataset config `ds` without decoding an image: from its decoded-tensor
    cache when there is one, else counted from an image folder's listing, else CIFAR's known counts;
    None when none of these applies (the sizes are then checked as the data loads)."""
    kind, path = resolve_source(ds)
    if kind == "download":
        kind, path = "torchvision", cache_dir(ds) / "downloads"
    if path is not None and path.exists():
        cache = _cache_file(ds, kind, path)
        if cache.exists():
            try:
                return _cached_counts(cache)
            except Exception:  # noqa: BLE001 - a cache that cannot be read is rebuilt by the loader, not checked here
                pass
    if kind in official.NAMES:
        return SplitCounts(*official.counts(kind, path), f"the labels of {path}")
    if kind == "folder":
        try:
            return _listed_counts(path, tuple((path / s).stat().st_mtime for s in ("train", "test")))
        except OSError as e:
            raise ConfigError("dataset.root", ds.get("root"), f"a directory this user can list: {e}") from None
    if ds.name in KNOWN_COUNTS:
        train, test = KNOWN_COUNTS[ds.name]
        return SplitCounts(train, test, f"{ds.name}'s known counts")
    return None


def _describe(counts: list[int], split: str) -> str:
    each = f"{counts[0]} each" if len(set(counts)) == 1 else f"the smallest with {min(counts)}"
    return f"{len(counts)} classes of {split} images, {each}, {sum(counts)} in all"


def _fits(counts: list[int], size: int, seed: int) -> bool:
    """Whether load_dataset's balanced_subset of `size` items, seeded `seed`, finds them in `counts`."""
    quota = class_quota(len(counts), size, torch.Generator().manual_seed(seed))
    return all(q <= c for q, c in zip(quota, counts))


def size_errors(ds, batch_size: int) -> list[ConfigError]:
    """The dataset sizes and the batch size that the images of `ds` cannot fill, checked before loading.

    Every subset is class-balanced (balanced_subset), so a size is refused exactly when the seeded
    subset load_dataset draws would need more images of some class than it holds; the bound in the
    message (classes x the smallest class) always fits.
    """
    counts = split_counts(ds)
    if counts is None:
        return []
    if not counts.train or not counts.test:
        return [ConfigError("dataset.root", ds.get("root"), f"a directory with train/<class>/* and test/<class>/* "
                            f"images ({', '.join(IMAGE_SUFFIXES)}): {counts.source} finds none in one of them")]
    errors = []
    seed = int(ds.get("subset_seed", 0) or 0)
    train = counts.train
    val_size = int(ds.get("val_size") or 0)
    if val_size:
        # What the hold-out leaves of each class is what training subsets and batches are drawn from.
        if val_size >= sum(train) or not _fits(train, val_size, seed + 1):
            bound = min(len(train) * min(train), sum(train) - 1)
            return [ConfigError("dataset.val_size", val_size, f"at most {bound}, a class-balanced hold-out that "
                                f"leaves training images, of {_describe(train, 'training')} ({counts.source})")]
        quota = class_quota(len(train), val_size, torch.Generator().manual_seed(seed + 1))
        train = [c - q for c, q in zip(train, quota) if c > q]
    after_val = f" after the dataset.val_size={val_size} hold-out" if val_size else ""
    train_size = ds.get("train_size")
    if train_size and not _fits(train, int(train_size), seed):
        errors.append(ConfigError("dataset.train_size", train_size, f"at most {len(train) * min(train)}, a class-"
                                  f"balanced subset of {_describe(train, 'training')}{after_val} ({counts.source})"))
    elif batch_size > (train_size or sum(train)):
        which = f"dataset.train_size={train_size}" if train_size else f"{counts.source}{after_val}"
        errors.append(ConfigError("trainer.batch_size", batch_size,
                                  f"at most {train_size or sum(train)}, the training images ({which})"))
    test_size = ds.get("test_size")
    if test_size and not _fits(counts.test, int(test_size), seed):
        errors.append(ConfigError("dataset.test_size", test_size, f"at most {len(counts.test) * min(counts.test)}, "
                                  f"a class-balanced subset of {_describe(counts.test, 'test')} ({counts.source})"))
    return errors
