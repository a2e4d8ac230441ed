"""ImageNet input pipeline: images/s from stored image to a ready, augmented batch of views, ours vs
torchvision's, side by side in one run.

    python benchmarks/imagenet_input.py [--images 1024] [--batch 64] [--workers 2] [--repeats 2] [--cifar N]

- ours: the encoded store (harness/core/data/encoded.py) built once from the folder; each batch is
  decoded by the image threads (OpenCV's libjpeg-turbo on the CPU; nvJPEG on a GPU where torchvision's
  decoder loads), cropped from each whole image (RandomResizedCrop 0.08-1), resized to the view size
  and coloured (augment=imagenet_symmetric, one view), normalised: on the CPU one image per thread
  task in uint8 at 224 px (augment_cpu.py), the batched float pipeline at 32 px (augment.py).
- torchvision: ImageFolder + PIL loader + RandomResizedCrop, flip, ColorJitter (p=0.8),
  RandomGrayscale, GaussianBlur (23 px, p=0.5), RandomSolarize (p=0.1), ToTensor, Normalize, in a
  DataLoader with the same number of worker processes (`--workers`) as our decode threads.
- the same with PIL's own Gaussian filter in place of torchvision's (solo-learn's CPU recipe): the
  stricter bar, since torchvision blurs a PIL image as a float tensor with a 23×23 kernel.

The images: `--images` generated JPEGs of 200-600 px a side (smooth colour fields with noise, so they
compress like photographs, not like noise), in 10 classes, and, with `--cifar N`, N CIFAR-10 JPEGs
from the archive (views at 32 px). Each pipeline runs `--repeats` times, alternately; the best pass
counts. Also printed: bytes per stored image (the store's vs the original files'), and the peak
resident memory of this process and of its children. The machine's load average is printed: on a
shared machine only the ratios of interleaved runs mean much. Results go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import report  # noqa: E402
from harness.core.data import encoded  # noqa: E402
from harness.core.data.augment import ViewMaker  # noqa: E402
from harness.core.data.datasets import default_archive  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def generated_folder(root: Path, images: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", images), ("test", classes)):
        for i in range(n):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            w, h = (int(v) for v in rng.integers(200, 601, 2))
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            c = rng.uniform(0, 1, (3, 3))
            img = np.stack([128 + 100 * np.sin(xx / (20 + 40 * c[k, 0]) + 6 * c[k, 1])
                            * np.cos(yy / (25 + 30 * c[k, 2])) for k in range(3)], axis=2)
            img += rng.normal(0, 4, (h, w, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i}.JPEG", quality=90)


def cifar_folder(root: Path, images: int) -> bool:
    archive = default_archive()
    if archive is None or not archive.exists():
        return False
    taken = {"train": 0, "test": 0}
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            parts = Path(member.name).parts
            split = next((p for p in parts if p in taken), None)
            if not member.isfile() or split is None or taken[split] >= (images if split == "train" else 10):
                continue
            out = root / split / parts[-2] / parts[-1]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())
            taken[split] += 1
            if taken["train"] >= images and taken["test"] >= 10:
                break
    return True


def ours(ds, size: int, batch: int) -> float:
    """Images/s of one pass over the training split: decode + crop + augment + normalise."""
    split = encoded.load_encoded(ds)["train_x"]
    recipe = OmegaConf.load(Path(__file__).resolve().parents[1] / "harness/conf/augment/imagenet_symmetric.yaml")
    recipe.views = ["base"]
    recipe.pipelines.base.size = size
    views = ViewMaker(recipe, MEAN, STD, torch.device("cpu"), seed=0)
    source = split.batches(torch.device("cpu"), batch)
    steps = len(split) // batch
    start = time.perf_counter()
    for _, _, images in source.epoch(torch.randperm(len(split)), range(steps), lambda s: s * batch, batch):
        out = views(images)[0]
    assert out.shape == (batch, 3, size, size)
    return steps * batch / (time.perf_counter() - start)


class PILBlur:
    """solo-learn's CPU blur: PIL's Gaussian filter (box-filter passes) with sigma uniform in 0.1-2.0."""

    def __call__(self, img):
        from PIL import ImageFilter

        return img.filter(ImageFilter.GaussianBlur(radius=float(np.random.uniform(0.1, 2.0))))


def theirs(root: Path, size: int, batch: int, workers: int, pil_blur: bool = False) -> float:
    from harness.core.tv import torchvision

    T = torchvision.transforms
    blur = max(3, int(0.1 * size) | 1)
    transform = T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2),
        T.RandomApply([PILBlur() if pil_blur else T.GaussianBlur(blur, (0.1, 2.0))], p=0.5),
        T.RandomSolarize(128, p=0.1), T.ToTensor(), T.Normalize(MEAN, STD)])
    data = torchvision.datasets.ImageFolder(str(root / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                         persistent_workers=False)
    start = time.perf_counter()
    n = 0
    for x, _ in loader:
        n += len(x)
    return n / (time.perf_counter() - start)


def original_bytes(root: Path) -> float:
    files = [f for f in (root / "train").rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / max(len(files), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cifar", type=int, default=0, help="also N CIFAR-10 JPEGs from the archive (32 px views)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    # Ours decodes on `--workers` threads and augments with ONE torch thread: intra-op threads on the
    # per-image crops (small tensors) cost more than they give (measured: 2 threads made ours 0.1-0.5x
    # of the 1-thread figure on a loaded 2-core machine). Each loader worker uses one (DataLoader sets it).
    torch.set_num_threads(1)
    encoded.set_decode_threads(args.workers)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sets = [("generated 200-600 px", Path(tmp) / "gen", 224)]
        generated_folder(sets[0][1], args.images)
        if args.cifar and cifar_folder(Path(tmp) / "cifar", args.cifar):
            sets.append(("CIFAR-10 JPEGs", Path(tmp) / "cifar", 32))
        load = os.getloadavg()[0]
        for name, root, size in sets:
            ds = OmegaConf.create({"name": "imagefolder", "root": str(root), "cache_dir": str(Path(tmp) / "cache"),
                                   "store": "encoded", "image_size": size, "decode_workers": args.workers,
                                   "encode": {"quality": 90, "short_side": 288}})
            index_file = encoded.ensure_store(ds)
            index, _ = encoded.open_store(str(index_file))
            stored = index["bytes"] / len(index["sizes"])
            best = {"ours": 0.0, "torchvision": 0.0, "pil blur": 0.0}
            for _ in range(args.repeats):
                best["ours"] = max(best["ours"], ours(ds, size, args.batch))
                best["torchvision"] = max(best["torchvision"], theirs(root, size, args.batch, args.workers))
                best["pil blur"] = max(best["pil blur"], theirs(root, size, args.batch, args.workers, pil_blur=True))
            rows.append({"images": name, "view px": size, "ours img/s": f"{best['ours']:,.0f}",
                         "torchvision img/s": f"{best['torchvision']:,.0f}",
                         "ratio": f"{best['ours'] / best['torchvision']:.2f}x",
                         "with PIL blur img/s": f"{best['pil blur']:,.0f}",
                         "ratio to it": f"{best['ours'] / best['pil blur']:.2f}x",
                         "stored KB/img": f"{stored / 1e3:.1f}",
                         "original KB/img": f"{original_bytes(root) / 1e3:.1f}"})
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    notes = (f"`python benchmarks/imagenet_input.py --images {args.images} --batch {args.batch} --workers "
             f"{args.workers} --repeats {args.repeats} --cifar {args.cifar}`; load average {load:.1f} before, "
             f"{os.getloadavg()[0]:.1f} after. Peak RSS: this process {peak_self:,.0f} MB (ours runs here), the "
             f"largest child {peak_children:,.0f} MB (torchvision's loader workers).")
    columns = ["images", "view px", "ours img/s", "torchvision img/s", "ratio", "with PIL blur img/s", "ratio to it",
               "stored KB/img", "original KB/img"]
    if args.no_record:
        from leaderboard.text import format_table

        print(format_table(rows, columns) + "\n" + notes)
    else:
        report("ImageNet input pipeline: encoded store vs torchvision ImageFolder", rows, columns, notes)


if __name__ == "__main__":
    main()
