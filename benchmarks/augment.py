"""Two-view augmentation throughput: our batched pipeline vs torchvision v2 per image in a DataLoader.

    python benchmarks/augment.py [--images 10000] [--workers 2] [--batch 256] [--recipe symmetric]

The per-image side is what solo-learn and lightly do: a Dataset whose __getitem__ applies a
torchvision v2 Compose twice to one uint8 image, a DataLoader with worker processes and the same
batch size. Both sides run the same operations with the same settings (one recipe from
harness/conf/augment/) on the same real CIFAR-10 images, in one run, and we report the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from benchmarks.common import report  # noqa: E402
from benchmarks.torchvision_reference import torchvision_equivalent  # noqa: E402
from harness.core.data.augment import Pipeline, ViewMaker  # noqa: E402
from harness.core.data.datasets import load_dataset  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "harness" / "conf"


class TwoViews(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, transforms: list):
        self.images, self.transforms = images, transforms

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return [t(self.images[i]) for t in self.transforms]


def per_image_rate(images, transforms, batch: int, workers: int) -> float:
    loader = torch.utils.data.DataLoader(TwoViews(images, transforms), batch_size=batch, shuffle=True,
                                         num_workers=workers, persistent_workers=False, drop_last=True)
    started = time.perf_counter()
    seen = 0
    for v1, _ in loader:
        seen += len(v1)
    return seen / (time.perf_counter() - started)


def batched_rate(images, maker: ViewMaker, batch: int) -> float:
    maker(images[:batch])  # warm-up (allocator, kernels)
    started = time.perf_counter()
    seen = 0
    order = torch.randperm(len(images))
    for s in range(0, len(images) - batch + 1, batch):
        maker(images[order[s:s + batch]])
        seen += batch
    return seen / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for the per-image side")
    ap.add_argument("--recipe", default="symmetric")
    args = ap.parse_args()

    ds = OmegaConf.load(CONF / "dataset" / "cifar10.yaml")
    ds.train_size, ds.test_size = args.images, 100
    data = load_dataset(ds)
    recipe = OmegaConf.load(CONF / "augment" / f"{args.recipe}.yaml")
    pipelines = [Pipeline.from_config(recipe.pipelines[v]) for v in recipe.views]
    threads = torch.get_num_threads()
    maker = ViewMaker(recipe, ds.mean, ds.std, "cpu", seed=0)
    ours = batched_rate(data.train_x, maker, args.batch)
    theirs = per_image_rate(data.train_x, [torchvision_equivalent(p, ds.mean, ds.std) for p in pipelines],
                            args.batch, args.workers)
    rows = [
        {"pipeline": f"torchvision v2 per image, DataLoader {args.workers} workers", "images_per_s": theirs,
         "ratio": 1.0},
        {"pipeline": f"harness batched (1 process, {threads} threads)", "images_per_s": ours, "ratio": ours / theirs},
    ]
    report(f"augment: two views, recipe {args.recipe}, {args.images} CIFAR-10 images, batch {args.batch}", rows,
           ["pipeline", "images_per_s", "ratio"], notes="Target: batched ≥ 5× the per-image pipeline on 2 cores.")


if __name__ == "__main__":
    main()
