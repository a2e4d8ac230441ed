"""Datasets as whole uint8 tensors, decoded once and cached.

SSL on CIFAR-sized images is bound by data movement, so a dataset here is four tensors
(train/test images as N×3×H×W uint8, labels as int64) that fit in memory and go to the training
device in one copy. Decoding is slow (60,000 JPEGs take about 10 s), so the decoded tensors are
cached in one file keyed by where the images came from, and later jobs start in well under a
second.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from PIL import Image

from harness.atomic import atomic_file
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
def _decode(data: bytes, size: int | None) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if size and img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def _split_and_class(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """('…', 'train', 'dog', 'x.jpg') -> ('train', 'dog')."""
    for i in range(len(parts) - 2, 0, -1):
        if parts[i - 1] in ("train", "test"):
            return parts[i - 1], parts[i]
    return None


def _collect(items: Iterable[tuple[str, str, bytes]], size: int | None, what: str, total: int | None):
    """Decode (split, class, bytes) triples into per-split arrays with alphabetical class ids."""
    images: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    names: dict[str, list[str]] = {"train": [], "test": []}
    progress = Progress(f"[data] {what}:", total, every=3.0)
    for n, (split, cls, data) in enumerate(items, 1):
        images[split].append(_decode(data, size))
        names[split].append(cls)
        progress.update(n, f"{n}/{total} images" if total else f"{n} images")
    classes = sorted(set(names["train"]) | set(names["test"]))
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split in ("train", "test"):
        if not images[split]:
            raise ValueError(f"{what}: no {split} images found")
        shapes = {a.shape for a in images[split]}
        if len(shapes) != 1:
            raise ValueError(f"{what}: images of different sizes {sorted(shapes)[:3]}; set dataset.image_size")
        x = torch.from_numpy(np.stack(images[split])).permute(0, 3, 1, 2).contiguous()
        y = torch.tensor([index[c] for c in names[split]], dtype=torch.int64)
        out[split] = (x, y)
    return out, classes


def _iter_archive(path: Path) -> Iterator[tuple[str, str, bytes]]:
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if not member.isfile() or not member.name.lower().endswith(IMAGE_SUFFIXES):
                continue
            where = _split_and_class(Path(member.name).parts)
            if where:
                yield (*where, tar.extractfile(member).read())


def _iter_folder(root: Path) -> Iterator[tuple[str, str, bytes]]:
    for split in ("train", "test"):
        for cls_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            for f in sorted(cls_dir.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    yield split, cls_dir.name, f.read_bytes()


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
        ident.append(folder_manifest(path))
    return hashlib.sha256("|".join(ident).encode()).hexdigest()[:16]


def _cache_file(ds, kind: str, path: Path | None) -> Path:
    """The decoded-tensor cache of the images at `path` (read by kind) for dataset config `ds`."""
    size = ds.get("image_size") if ds.name == "imagefolder" else None
    return cache_dir(ds) / f"{ds.name}-{_cache_key(kind, path, ds.name, size)}.pt"


def cache_dir(ds) -> Path:
    """Where decoded datasets are cached: dataset.cache_dir, $HARNESS_CACHE or ~/.cache/harness."""
    configured = ds.get("cache_dir")
    if configured:
        return Path(str(configured)).expanduser()
    return Path(os.environ.get("HARNESS_CACHE", "~/.cache/harness")).expanduser() / "datasets"


def ensure_cache(ds) -> Path:
    """Decode the dataset of config `ds` into its cache file unless it is there; return the file.

    The decode happens once: the first process takes ``<file>.lock`` and writes the file atomically;
    any other process that needs the same file says it waits, waits, and then reads it. This is the
    build function of the dataset's stage (run before training jobs start) and the fallback of a
    job that finds no cache.
    """
    kind, path = resolve_source(ds)
    cdir = cache_dir(ds)
    if kind == "download":
        path = _download(ds.name, cdir)
        kind = "torchvision"
    cache = _cache_file(ds, kind, path)
    if cache.exists():
        return cache
    cdir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(cache) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"[data] another job is decoding {ds.name} into {cache}; waiting for it", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        if cache.exists():
            return cache
        size = ds.get("image_size") if ds.name == "imagefolder" else None
        what = f"decoding {ds.name} from {path}"
        print(f"[data] {what} into {cache}", file=sys.stderr, flush=True)
        if kind == "folder":  # say once what decoding changes (RGB conversion, resizing): folder_notes.py
            from harness.core.data.folder_notes import announce_folder_changes

            announce_folder_changes(path, size, IMAGE_SUFFIXES)
        if kind == "torchvision":
            splits, classes = _load_torchvision_pickles(_torchvision_folder(path, ds.name), ds.name)
        elif kind == "archive":
            splits, classes = _collect(_iter_archive(path), size, what, None)
        else:
            splits, classes = _collect(_iter_folder(path), size, what, None)
        blob = {
            "train_x": splits["train"][0],
            "train_y": splits["train"][1],
            "test_x": splits["test"][0],
            "test_y": splits["test"][1],
            "classes": classes,
            "source": f"{kind}:{path}",
        }
        with atomic_file(cache) as f:  # a reader sees the whole file or none
            torch.save(blob, f)
        return cache
    finally:
        lock.release()


def load_full(ds) -> ImageData:
    """Load the whole dataset described by config `ds` from its cache (decoding it first if needed)."""
    return ImageData(**torch.load(ensure_cache(ds), weights_only=True))


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
    """The dataset of config `ds` with its validation hold-out and train/test subsets applied."""
    data = load_full(ds)
    seed = int(ds.get("subset_seed", 0))
    val_size = int(ds.get("val_size") or 0)
    train_idx = torch.arange(len(data.train_y))
    if val_size:
        val_idx = balanced_subset(data.train_y, val_size, seed + 1)
        data.val_x, data.val_y = data.train_x[val_idx], data.train_y[val_idx]
        keep = torch.ones(len(data.train_y), dtype=torch.bool)
        keep[val_idx] = False
        train_idx = torch.nonzero(keep).flatten()
    if ds.get("train_size"):
        sub = balanced_subset(data.train_y[train_idx], int(ds.train_size), seed)
        train_idx = train_idx[sub]
    data.train_x, data.train_y, data.train_index = data.train_x[train_idx], data.train_y[train_idx], train_idx
    if ds.get("test_size"):
        test_idx = balanced_subset(data.test_y, int(ds.test_size), seed)
        data.test_x, data.test_y = data.test_x[test_idx], data.test_y[test_idx]
    return data


# ---------------------------------------------------------------------------------- sizes, before loading
# Images per class in the train and test splits of the standard datasets (both are balanced).
KNOWN_COUNTS = {"cifar10": ([5000] * 10, [1000] * 10), "cifar100": ([500] * 100, [100] * 100)}


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
