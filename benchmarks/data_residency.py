"""Data at scale: training images/s with the set on the device vs in (memory-mapped) host memory, and
decoding images/s with one process vs all cores, side by side in one run.

    python benchmarks/data_residency.py [--images 1024] [--size 64] [--batch 128] [--epochs 2] [--repeats 2]

A folder of `--images` 256x256 JPEGs (plus a test split of an eighth of that) is generated once in a
temporary folder. Decoding: the folder is decoded into a fresh cache at `--size` px with
dataset.decode_workers=1 and with all cores, alternately, `--repeats` times each. Training: SimCLR on
the ConvNet over the memory-mapped cache, residency=device and residency=host alternately, `--repeats`
times each; the rate is the best epoch's (epoch times exclude evaluation and checkpoints). The
machine's load average is printed before and after: on a shared machine only the ratios of these
interleaved runs mean much.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import report  # noqa: E402
from harness.core import distributed  # noqa: E402
from harness.core.data.datasets import decode_workers, ensure_cache, load_full  # noqa: E402
from harness.core.trainer import fit  # noqa: E402
from harness.jobs.config import compose, instantiate  # noqa: E402


def make_folder(root: Path, images: int, classes: int = 8) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    for split, n in (("train", images), ("test", max(classes, images // 8))):
        for i in range(n):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            base = np.stack([(xx + i) % 256, (yy * 3 + i) % 256, (xx + yy) % 256], -1)
            img = (base + rng.integers(0, 32, base.shape)).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i}.jpg", quality=90)


def decode_rate(root: Path, scratch: Path, size: int, workers: int, total: int) -> float:
    cache = Path(tempfile.mkdtemp(dir=scratch))
    ds = compose(["dataset=imagefolder", f"dataset.root={root}", f"dataset.image_size={size}",
                  f"dataset.cache_dir={cache}", f"dataset.decode_workers={workers}"]).dataset
    started = time.perf_counter()
    ensure_cache(ds)
    return total / (time.perf_counter() - started)


def train_rate(cfg, data, device: torch.device, scratch: Path) -> float:
    torch.manual_seed(0)
    model = instantiate(cfg.method, instantiate(cfg.backbone))
    rates = []
    fit(cfg, model, data, distributed.DistInfo(device=device), Path(tempfile.mkdtemp(dir=scratch)) / "c.pt",
        lambda e, m: rates.append(m["images_per_s"]))
    return max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_folder(tmp / "tree", args.images)
        total = sum(1 for _ in (tmp / "tree").rglob("*.jpg"))
        cores = decode_workers(compose([]).dataset)
        decode = {1: [], cores: []}
        for _ in range(args.repeats):
            for workers in decode:
                decode[workers].append(decode_rate(tmp / "tree", tmp, args.size, workers, total))
        overrides = ["backbone=convnet", "method=simclr", "dataset=imagefolder", f"dataset.root={tmp / 'tree'}",
                     f"dataset.image_size={args.size}", f"dataset.cache_dir={tmp / 'cache'}",
                     f"trainer.batch_size={args.batch}", f"trainer.epochs={args.epochs}", "trainer.warmup_epochs=0",
                     "eval.every=0", f"trainer.device={device.type}"]
        data = load_full(compose(overrides).dataset)
        data.train_index = torch.arange(len(data.train_y))
        train = {"device": [], "host": []}
        for _ in range(args.repeats):
            for residency in train:
                cfg = compose([*overrides, f"dataset.residency={residency}"])
                train[residency].append(train_rate(cfg, data, device, tmp))
    load_after = os.getloadavg()
    rows = [
        {"what": "decode (JPEG 256 px -> cache)", "setting": "1 process", "images/s": f"{max(decode[1]):,.0f}",
         "ratio": "1.00"},
        {"what": "decode (JPEG 256 px -> cache)", "setting": f"{cores} processes",
         "images/s": f"{max(decode[cores]):,.0f}", "ratio": f"{max(decode[cores]) / max(decode[1]):.2f}"},
        {"what": f"SimCLR ConvNet training ({device.type})", "setting": "residency=device",
         "images/s": f"{max(train['device']):,.0f}", "ratio": "1.00"},
        {"what": f"SimCLR ConvNet training ({device.type})", "setting": "residency=host",
         "images/s": f"{max(train['host']):,.0f}", "ratio": f"{max(train['host']) / max(train['device']):.2f}"},
    ]
    notes = (f"{total} JPEGs (256x256) decoded to {args.size} px; training on {args.images} of them, batch "
             f"{args.batch}, best of {args.epochs} epochs x {args.repeats} interleaved repeats. Load average "
             f"(1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after. All rates: decode "
             f"{[round(r) for r in decode[1]]} vs {[round(r) for r in decode[cores]]}, training "
             f"{[round(r) for r in train['device']]} vs {[round(r) for r in train['host']]}.")
    report("Data residency and parallel decoding (data_residency.py)", rows, ["what", "setting", "images/s", "ratio"],
           notes)


if __name__ == "__main__":
    main()
