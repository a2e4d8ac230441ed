"""The transfer suite's data sets, read from local copies in their torchvision or official layouts
with their official splits, as the linusericsson/ssl-transfer protocol uses them.

Each set is a list of image files (or, for CIFAR, the decoded tensors of datasets.py) with labels
per split: ``train``, ``val`` and ``test``. Sets with an official validation split (Aircraft, DTD,
Flowers, VOC2007) keep it; the others hold out a seeded 20 % of train as ``val`` (the protocol
chooses C on val, then refits on train + val). The test split is the official one, except for
Caltech-101, which has none: 30 images per class train (seeded), the rest test, the usual rule.
VOC2007 is multi-label: its labels are an N x 20 matrix, 1 present, 0 absent, -1 present only as
"difficult" objects (trained on as present, left out of the scores, as the VOC devkit does).

Nothing here downloads: a copy that is missing or incomplete is named by ``missing``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# name -> the metric the ssl-transfer tradition reports for it
METRICS = {"food101": "top1", "cifar10": "top1", "cifar100": "top1", "sun397": "top1", "cars": "top1",
           "aircraft": "mean_per_class", "voc2007": "map11", "dtd": "top1", "pets": "mean_per_class",
           "caltech101": "mean_per_class", "flowers": "mean_per_class"}
NAMES = tuple(METRICS)
OFFICIAL_VAL = ("aircraft", "dtd", "flowers", "voc2007")
VAL_FRACTION = 0.2
CALTECH_TRAIN_PER_CLASS = 30
VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]

# Where each set's release folder may sit under the given root (torchvision's folder names first).
CANDIDATES = {
    "food101": ("food-101", "."),
    "dtd": ("dtd/dtd", "dtd", "."),
    "pets": ("oxford-iiit-pet", "."),
    "aircraft": ("fgvc-aircraft-2013b/data", "data", "."),
    "flowers": ("flowers-102", "."),
    "cars": ("stanford_cars", "."),
    "sun397": ("SUN397", "."),
    "caltech101": ("caltech101/101_ObjectCategories", "101_ObjectCategories", "."),
    "voc2007": ("VOCdevkit/VOC2007", "VOC2007", "."),
}
# What a complete copy holds, relative to its release folder.
REQUIRED = {
    "food101": ("images", "meta/classes.txt", "meta/train.txt", "meta/test.txt"),
    "dtd": ("images", "labels/train1.txt", "labels/val1.txt", "labels/test1.txt"),
    "pets": ("images", "annotations/trainval.txt", "annotations/test.txt"),
    "aircraft": ("images", "variants.txt", "images_variant_train.txt", "images_variant_val.txt",
                 "images_variant_test.txt"),
    "flowers": ("jpg", "imagelabels.mat", "setid.mat"),
    "cars": ("cars_train", "cars_test", "devkit/cars_meta.mat", "devkit/cars_train_annos.mat",
             "cars_test_annos_withlabels.mat"),
    "sun397": ("ClassName.txt", "Training_01.txt", "Testing_01.txt"),
    "caltech101": (),
    "voc2007": ("JPEGImages", "Annotations", "ImageSets/Main/train.txt", "ImageSets/Main/val.txt",
                "ImageSets/Main/test.txt"),
}


@dataclass
class Split:
    """One split: image files (or a uint8 N x 3 x H x W tensor) and labels (N, or N x C for VOC)."""

    images: list[str] | torch.Tensor
    labels: np.ndarray


@dataclass
class TransferSet:
    name: str
    classes: list[str]
    splits: dict[str, Split]  # train, val, test
    metric: str


def folder(name: str, root: Path) -> Path:
    """The release folder of `name` under `root`: the first candidate that holds what it should."""
    for sub in CANDIDATES[name]:
        base = root / sub
        if base.is_dir() and not _missing_in(name, base):
            return base
    return root / CANDIDATES[name][0] if (root / CANDIDATES[name][0]).is_dir() else root


def _missing_in(name: str, base: Path) -> list[str]:
    if name == "sun397":  # the partition files ship apart (Partitions.zip): beside the classes or in Partitions/
        part = base / "Partitions" if (base / "Partitions").is_dir() else base
        return [f for f in REQUIRED[name] if not (part / f).is_file()]
    if name == "caltech101":
        return [] if any(p.is_dir() for p in base.glob("*")) else ["a folder per class"]
    return [f for f in REQUIRED[name] if not (base / f).exists()]


def missing(name: str, root: str | Path) -> list[str]:
    """What a complete copy of transfer set `name` has and `root` lacks (empty when complete)."""
    root = Path(str(root)).expanduser()
    if not root.is_dir():
        return [f"the directory {root}"]
    if name in ("cifar10", "cifar100"):
        return []  # read by datasets.py, which names what it lacks (datasets.resolve_source)
    gone = _missing_in(name, folder(name, root))
    where = "/".join(p for p in CANDIDATES[name][0].split("/") if p != ".")
    return [f"{where}/{g}" if where else g for g in gone]


# ---------------------------------------------------------------------------------- readers
def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _food101(base: Path) -> tuple[list[str], dict[str, Split]]:
    classes = _lines(base / "meta" / "classes.txt")
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split in ("train", "test"):
        lines = _lines(base / "meta" / f"{split}.txt")
        out[split] = Split([str(base / "images" / f"{x}.jpg") for x in lines],
                           np.array([index[x.split("/")[0]] for x in lines], dtype=np.int64))
    return classes, out


def _dtd(base: Path, partition: int = 1) -> tuple[list[str], dict[str, Split]]:
    classes = sorted(p.name for p in (base / "images").iterdir() if p.is_dir())
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split in ("train", "val", "test"):
        lines = _lines(base / "labels" / f"{split}{partition}.txt")
        out[split] = Split([str(base / "images" / x) for x in lines],
                           np.array([index[x.split("/")[0]] for x in lines], dtype=np.int64))
    return classes, out


def _pets(base: Path) -> tuple[list[str], dict[str, Split]]:
    names: dict[int, str] = {}
    out = {}
    for split, file in (("train", "trainval.txt"), ("test", "test.txt")):
        rows = [line.split() for line in _lines(base / "annotations" / file)]
        for r in rows:
            names[int(r[1]) - 1] = r[0].rsplit("_", 1)[0]
        out[split] = Split([str(base / "images" / f"{r[0]}.jpg") for r in rows],
                           np.array([int(r[1]) - 1 for r in rows], dtype=np.int64))
    return [names[i] for i in sorted(names)], out


def _aircraft(base: Path) -> tuple[list[str], dict[str, Split]]:
    classes = _lines(base / "variants.txt")
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split in ("train", "val", "test"):
        rows = [line.split(" ", 1) for line in _lines(base / f"images_variant_{split}.txt")]
        out[split] = Split([str(base / "images" / f"{r[0]}.jpg") for r in rows],
                           np.array([index[r[1]] for r in rows], dtype=np.int64))
    return classes, out


def _flowers(base: Path) -> tuple[list[str], dict[str, Split]]:
    from scipy.io import loadmat

    labels = loadmat(base / "imagelabels.mat")["labels"].ravel().astype(np.int64) - 1
    ids = loadmat(base / "setid.mat")
    out = {}
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        chosen = ids[key].ravel().astype(np.int64)
        out[split] = Split([str(base / "jpg" / f"image_{i:05d}.jpg") for i in chosen], labels[chosen - 1])
    return [str(i + 1) for i in range(int(labels.max()) + 1)], out


def _cars(base: Path) -> tuple[list[str], dict[str, Split]]:
    from scipy.io import loadmat

    classes = [str(c) for c in loadmat(base / "devkit" / "cars_meta.mat", squeeze_me=True)["class_names"]]
    out = {}
    for split, annos, images in (("train", base / "devkit" / "cars_train_annos.mat", "cars_train"),
                                 ("test", base / "cars_test_annos_withlabels.mat", "cars_test")):
        a = np.atleast_1d(loadmat(annos, squeeze_me=True)["annotations"])
        out[split] = Split([str(base / images / str(f)) for f in a["fname"]],
                           np.array([int(c) - 1 for c in a["class"]], dtype=np.int64))
    return classes, out


def _sun397(base: Path) -> tuple[list[str], dict[str, Split]]:
    part = base / "Partitions" if (base / "Partitions").is_dir() else base
    classes = _lines(part / "ClassName.txt")  # /a/abbey
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split, file in (("train", "Training_01.txt"), ("test", "Testing_01.txt")):
        lines = _lines(part / file)  # /a/abbey/sun_aaalbzqrimafwbiv.jpg
        out[split] = Split([str(base / x.lstrip("/")) for x in lines],
                           np.array([index[x.rsplit("/", 1)[0]] for x in lines], dtype=np.int64))
    return [c.rsplit("/", 1)[-1] for c in classes], out


def _caltech101(base: Path, seed: int) -> tuple[list[str], dict[str, Split]]:
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    rng = np.random.RandomState(seed)
    parts: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    for i, c in enumerate(classes):
        files = sorted(str(f) for f in (base / c).iterdir() if f.is_file())
        order = rng.permutation(len(files))
        for rank, j in enumerate(order):
            split = "train" if rank < CALTECH_TRAIN_PER_CLASS else "test"
            parts[split][0].append(files[j])
            parts[split][1].append(i)
    return classes, {s: Split(f, np.array(y, dtype=np.int64)) for s, (f, y) in parts.items()}


def _voc2007(base: Path) -> tuple[list[str], dict[str, Split]]:
    index = {c: i for i, c in enumerate(VOC_CLASSES)}
    out = {}
    for split in ("train", "val", "test"):
        ids = _lines(base / "ImageSets" / "Main" / f"{split}.txt")
        labels = np.zeros((len(ids), len(VOC_CLASSES)), dtype=np.int64)
        for row, image in enumerate(ids):
            for obj in ET.parse(base / "Annotations" / f"{image}.xml").getroot().iter("object"):
                c = index[obj.findtext("name").strip()]
                difficult = (obj.findtext("difficult") or "0").strip() == "1"
                labels[row, c] = 1 if not difficult or labels[row, c] == 1 else -1
        out[split] = Split([str(base / "JPEGImages" / f"{i}.jpg") for i in ids], labels)
    return VOC_CLASSES, out


def _take(split: Split, rows: np.ndarray) -> Split:
    images = split.images[torch.from_numpy(rows)] if isinstance(split.images, torch.Tensor) else \
        [split.images[i] for i in rows]
    return Split(images, split.labels[rows])


def with_val(splits: dict[str, Split], seed: int) -> dict[str, Split]:
    """`splits` with a val split: the official one, or a seeded 20 % of train (as ssl-transfer holds out)."""
    if "val" in splits:
        return splits
    order = np.random.RandomState(seed).permutation(len(splits["train"].labels))
    cut = int(np.floor(VAL_FRACTION * len(order)))
    return {**splits, "val": _take(splits["train"], np.sort(order[:cut])),
            "train": _take(splits["train"], np.sort(order[cut:]))}


def read(name: str, root: str | Path, seed: int = 0) -> TransferSet:
    """Transfer set `name` (not CIFAR: datasets.py reads those) from the complete copy at `root`."""
    base = folder(name, Path(str(root)).expanduser())
    reader = {"food101": _food101, "dtd": _dtd, "pets": _pets, "aircraft": _aircraft, "flowers": _flowers,
              "cars": _cars, "sun397": _sun397, "voc2007": _voc2007}.get(name)
    classes, splits = reader(base) if reader else _caltech101(base, seed)
    return TransferSet(name, classes, with_val(splits, seed), METRICS[name])


class Images(torch.utils.data.Dataset):
    """The images of a split as uint8 3 x size x size tensors: files decoded as ssl-transfer's transform
    does (shorter side resized to `size`, bicubic, then the centre crop), tensors (CIFAR, image folders
    already decoded) resized to `size` when they differ."""

    def __init__(self, images: list[str] | torch.Tensor, size: int):
        self.images, self.size = images, size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        if isinstance(self.images, torch.Tensor):
            x = self.images[i]
            if tuple(x.shape[-2:]) != (self.size, self.size):
                x = F.interpolate(x[None].float(), size=(self.size, self.size), mode="bicubic", antialias=True,
                                  align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
            return x
        from harness.core.data.datasets import _decode

        return torch.from_numpy(np.ascontiguousarray(_decode(self.images[i], self.size).transpose(2, 0, 1)))
