"""Trainer overhead: images/s of the harness trainer vs a minimal plain-PyTorch loop doing the same work.

    python benchmarks/train_step.py [--images 4096] [--epochs 2] [--batch 256] [--backbone convnet]

Same model (SimCLR on the chosen backbone), loss, optimizer (SGD), views from the same batched
pipeline, data in memory. The plain loop is what one would write by hand: views, forward, loss,
backward, step. The harness adds the lr schedule, loss bookkeeping, NaN checks, progress lines
and add-on hooks; the ratio is what those cost. Epoch times exclude evaluation and checkpoints.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import report  # noqa: E402
from harness.core import distributed  # noqa: E402
from harness.core.data.augment import ViewMaker  # noqa: E402
from harness.core.data.datasets import load_dataset  # noqa: E402
from harness.core.trainer import fit  # noqa: E402
from harness.jobs.config import compose, instantiate  # noqa: E402


def plain_loop(cfg, data, device, epochs: int) -> float:
    torch.manual_seed(0)
    model = instantiate(cfg.method, instantiate(cfg.backbone)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    views = ViewMaker(cfg.augment, cfg.dataset.mean, cfg.dataset.std, device, seed=0)
    x = data.train_x.to(device)
    batch = int(cfg.trainer.batch_size)
    times = []
    for _ in range(epochs):
        order = torch.randperm(len(x), device=device)
        started = time.perf_counter()
        for s in range(0, len(x) - batch + 1, batch):
            loss = model(views(x[order[s:s + batch]])).total()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        loss.item()
        times.append(time.perf_counter() - started)
    steps = len(x) // batch
    return steps * batch / min(times)


def harness_loop(cfg, data, device, epochs: int) -> float:
    torch.manual_seed(0)
    model = instantiate(cfg.method, instantiate(cfg.backbone))
    info = distributed.DistInfo(device=device)
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        fit(cfg, model, data, info, Path(tmp) / "checkpoint.pt", lambda e, m: times.append(m["epoch_time_s"]))
    steps = len(data.train_x) // int(cfg.trainer.batch_size)
    return steps * int(cfg.trainer.batch_size) / min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--backbone", default="convnet")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = compose([f"backbone={args.backbone}", f"dataset.train_size={args.images}", "dataset.test_size=100",
                   f"trainer.epochs={args.epochs}", f"trainer.batch_size={args.batch}", "trainer.optimizer=sgd",
                   "trainer.lr=0.1", "trainer.warmup_epochs=0", "eval.every=0", "trainer.log_every=1000"])
    data = load_dataset(cfg.dataset)
    plain_loop(cfg, data, device, 1)  # warm-up
    rows = []
    for _ in range(2):  # interleaved, so drifting machine load hits both sides alike
        rows.append({"loop": "plain PyTorch", "images_per_s": plain_loop(cfg, data, device, args.epochs)})
        rows.append({"loop": "harness trainer", "images_per_s": harness_loop(cfg, data, device, args.epochs)})
    best = {name: max(r["images_per_s"] for r in rows if r["loop"] == name) for name in ("plain PyTorch",
                                                                                        "harness trainer")}
    table = [{"loop": k, "images_per_s": v, "ratio": v / best["plain PyTorch"]} for k, v in best.items()]
    report(f"train_step: SimCLR {args.backbone}, batch {args.batch}, {args.images} images ({device.type})", table,
           ["loop", "images_per_s", "ratio"], notes="Best epoch of each side. Target: the trainer within 5% "
           "of the plain loop (ratio ≥ 0.95).")


if __name__ == "__main__":
    main()
