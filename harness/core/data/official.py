"""STL-10 and Tiny-ImageNet read from their official files, decoded once into the dataset cache.

- ``stl10``: torchvision's copy of the binary release, ``stl10_binary/`` with ``train_X.bin`` and
  ``train_y.bin`` (5,000 labelled), ``test_X.bin`` and ``test_y.bin`` (8,000), ``unlabeled_X.bin``
  (100,000) and ``class_names.txt``. Each image is 3 x 96 x 96 bytes stored column-major (so each
  channel is transposed), labels are bytes 1..10. Pretraining uses train + unlabeled, as the
  references do (``dataset.unlabeled=true``); the probes only ever see the labelled train split.
- ``tinyimagenet``: the official ``tiny-imagenet-200/`` layout: ``wnids.txt``, ``train/<wnid>/images/*.JPEG``
  (500 per class) and ``val/images/*.JPEG`` with ``val/val_annotations.txt`` (file, wnid, box),
  used as the test split (the official test split has no labels). 64 px, 200 classes.

Both are resized to ``dataset.image_size`` when it differs from the native size (CLSP's DDPM
trains on STL-10 at 64 px). The cache blob of STL-10 holds the pretraining images as one tensor,
labelled first, so the labelled split is a view of it (datasets.load_full) and nothing is copied.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from harness.core.progress import Progress
from harness.errors import ConfigError

NAMES = ("stl10", "tinyimagenet")
STL_FOLDER = "stl10_binary"
STL_SIZE = 96
STL_BYTES = 3 * STL_SIZE * STL_SIZE
STL_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin", "class_names.txt")
TINY_FOLDER = "tiny-imagenet-200"
TINY_SIZE = 64
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
# Images per class of the full releases, for size checks before any file is read.
KNOWN_COUNTS = {"stl10": ([500] * 10, [800] * 10), "tinyimagenet": ([500] * 200, [50] * 200)}
NATIVE_SIZE = {"stl10": STL_SIZE, "tinyimagenet": TINY_SIZE}


def folder(root: Path, name: str) -> Path:
    """The release folder under `root` (or `root` itself when it is that folder)."""
    sub = STL_FOLDER if name == "stl10" else TINY_FOLDER
    return root / sub if (root / sub).is_dir() else root


def missing(name: str, path: Path, unlabeled: bool = True) -> list[str]:
    """What a complete copy of `name` has and `path` lacks (empty when it is complete)."""
    if name == "stl10":
        wanted = [f for f in STL_FILES if unlabeled or not f.startswith("unlabeled")]
        gone = [f for f in wanted if not (path / f).is_file()]
        for x in ("train", "test", "unlabeled"):
            xf = path / f"{x}_X.bin"
            if xf.is_file() and xf.stat().st_size % STL_BYTES:
                gone.append(f"{x}_X.bin whole (its {xf.stat().st_size} bytes are not a multiple of {STL_BYTES})")
            yf = path / f"{x}_y.bin"
            if xf.is_file() and yf.is_file() and yf.stat().st_size * STL_BYTES != xf.stat().st_size:
                gone.append(f"as many {x}_y.bin labels as {x}_X.bin images")
        return gone
    gone = [p for p in ("wnids.txt", "train", "val/images", "val/val_annotations.txt") if not (path / p).exists()]
    if not gone:
        wnids = _wnids(path)
        empty = [w for w in wnids if not (path / "train" / w / "images").is_dir()]
        if empty:
            gone.append(f"train/<wnid>/images/ of {len(empty)} classes of wnids.txt ({', '.join(empty[:3])} ...)")
    return gone


def check(ds, root: Path) -> Path:
    """The release folder of dataset config `ds` under `root`; one ConfigError naming all that is missing."""
    path = folder(root, ds.name)
    gone = missing(ds.name, path, bool(ds.get("unlabeled", True)))
    if gone:
        layout = (f"torchvision's {STL_FOLDER}/ ({', '.join(STL_FILES)})" if ds.name == "stl10" else
                  f"the official {TINY_FOLDER}/ (wnids.txt, train/<wnid>/images/, val/images/, "
                  "val/val_annotations.txt)")
        raise ConfigError("dataset.root", str(root), f"{layout}; missing: {'; '.join(gone)}")
    return path


def fingerprint(name: str, path: Path) -> str:
    """Part of the cache key: the sizes of the release's files (a truncated copy is other data)."""
    if name == "stl10":
        parts = [f"{f}:{(path / f).stat().st_size}" for f in STL_FILES if (path / f).is_file()]
    else:
        parts = [f"{f}:{(path / f).stat().st_size}" for f in ("wnids.txt", "val/val_annotations.txt")]
        parts.append(str(sum(1 for _ in (path / "train").glob("*/images/*"))))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def counts(name: str, path: Path) -> tuple[list[int], list[int]]:
    """Images per class (label order) of the labelled train and the test split, read from labels only."""
    if name == "stl10":
        found = []
        for split in ("train", "test"):
            y = np.fromfile(path / f"{split}_y.bin", dtype=np.uint8).astype(np.int64) - 1
            found.append([c for c in np.bincount(y, minlength=10).tolist() if c])
        return found[0], found[1]
    wnids = _wnids(path)
    train = [sum(1 for _ in (path / "train" / w / "images").iterdir()) for w in wnids]
    val = _val_labels(path, wnids)
    test = np.bincount(np.array(list(val.values()), dtype=np.int64), minlength=len(wnids)).tolist()
    return [c for c in train if c], [c for c in test if c]


def unlabeled_count(ds) -> int:
    """The unlabeled images dataset config `ds` pretrains on besides its labelled split: STL-10's
    (counted from unlabeled_X.bin when the copy is there, else the release's 100,000), 0 otherwise."""
    if ds.name != "stl10" or not ds.get("unlabeled", True):
        return 0
    path = folder(Path(str(ds.root)).expanduser(), "stl10") / "unlabeled_X.bin" if ds.get("root") else None
    return path.stat().st_size // STL_BYTES if path is not None and path.is_file() else 100_000


# ---------------------------------------------------------------------------------- STL-10
def _stl_images(path: Path) -> np.ndarray:
    """The images of an STL-10 .bin file as N x 3 x 96 x 96 (row-major), memory-mapped."""
    raw = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, STL_SIZE, STL_SIZE)
    return raw.transpose(0, 1, 3, 2)  # the file is column-major: each channel is stored transposed


def _resize_into(out: np.ndarray, start: int, images: np.ndarray, size: int, progress: Progress, done: int,
                 total: int, chunk: int = 1024) -> int:
    """Copy `images` into out[start:], resized to `size` (antialiased bicubic) when they differ."""
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + chunk]))
        if x.shape[-1] != size:
            x = F.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            x = x.round().clamp(0, 255).to(torch.uint8)
        out[start + i:start + i + len(x)] = x.numpy()
        done += len(x)
        progress.update(done, f"{done}/{total} images", final=done == total)
    return done


def read_stl10(path: Path, size: int | None, unlabeled: bool, scratch: Path) -> dict:
    """The cache blob of STL-10 at `path`: train_x holds the labelled train images, then (when
    `unlabeled`) the unlabeled ones; train_y labels only the first len(train_y) of them."""
    size = size or STL_SIZE
    parts = {s: _stl_images(path / f"{s}_X.bin") for s in ("train", "test")}
    if unlabeled:
        parts["unlabeled"] = _stl_images(path / "unlabeled_X.bin")
    labels = {s: torch.from_numpy(np.fromfile(path / f"{s}_y.bin", dtype=np.uint8).astype(np.int64) - 1)
              for s in ("train", "test")}
    total = sum(len(p) for p in parts.values())
    progress = Progress("[data] stl10:", total, every=3.0)
    pretrain = np.lib.format.open_memmap(scratch / "train.npy", mode="w+", dtype=np.uint8,
                                         shape=(total - len(parts["test"]), 3, size, size))
    test = np.lib.format.open_memmap(scratch / "test.npy", mode="w+", dtype=np.uint8,
                                     shape=(len(parts["test"]), 3, size, size))
    done = _resize_into(pretrain, 0, parts["train"], size, progress, 0, total)
    if unlabeled:
        done = _resize_into(pretrain, len(parts["train"]), parts["unlabeled"], size, progress, done, total)
    _resize_into(test, 0, parts["test"], size, progress, done, total)
    pretrain.flush()
    test.flush()
    classes = (path / "class_names.txt").read_text().split()
    return {"train_x": torch.from_numpy(np.load(scratch / "train.npy", mmap_mode="r+")), "train_y": labels["train"],
            "test_x": torch.from_numpy(np.load(scratch / "test.npy", mmap_mode="r+")), "test_y": labels["test"],
            "classes": classes}


# ---------------------------------------------------------------------------------- Tiny-ImageNet
def _wnids(path: Path) -> list[str]:
    return sorted(line.strip() for line in (path / "wnids.txt").read_text().splitlines() if line.strip())


def _val_labels(path: Path, wnids: list[str]) -> dict[str, int]:
    """val image file name -> class id, from val_annotations.txt (file, wnid, box)."""
    index = {w: i for i, w in enumerate(wnids)}
    out = {}
    for line in (path / "val" / "val_annotations.txt").read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 2 and fields[1] in index:
            out[fields[0]] = index[fields[1]]
    return out


def tiny_items(path: Path) -> list[tuple[str, str, str]]:
    """(split, wnid, file) of every Tiny-ImageNet image, for datasets._collect (val becomes test)."""
    wnids = _wnids(path)
    items = [("train", w, str(f)) for w in wnids for f in sorted((path / "train" / w / "images").iterdir())
             if f.suffix.lower() in (".jpeg", ".jpg", ".png")]
    for name, label in sorted(_val_labels(path, wnids).items()):
        items.append(("test", wnids[label], str(path / "val" / "images" / name)))
    return items


def download(name: str, root: Path) -> Path:
    """Fetch the release into `root` (dataset.download=true only); returns the folder to read."""
    from harness.core.tv import torchvision

    if name == "stl10":
        torchvision.datasets.STL10(str(root), split="train+unlabeled", download=True)
        torchvision.datasets.STL10(str(root), split="test", download=True)
    else:
        torchvision.datasets.utils.download_and_extract_archive(TINY_URL, str(root))
    return root
