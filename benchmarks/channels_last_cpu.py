"""CPU: images/s of a SimCLR ResNet-18 (CIFAR stem) training step, contiguous (the old CPU path) vs
channels_last (the one path since issue 18), interleaved in one run; the ratio goes to RESULTS.md.

    python benchmarks/channels_last_cpu.py [--batch 64] [--repeats 3] [--steps 2]

Each repeat times `steps` steps (views made beforehand, forward, backward, SGD step) of each layout,
alternating, and the best repeat of each is kept. The machine's load average is recorded beside it:
on a shared machine the ratio is the figure to read, not the absolute speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import report  # noqa: E402
from harness.core.data.augment import ViewMaker  # noqa: E402
from harness.jobs.config import compose, instantiate  # noqa: E402


def timed_steps(model, optimizer, views, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(views).total().backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    cfg = compose(["method=simclr", "backbone=resnet18", "trainer.device=cpu"])
    x = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    setups = {}
    for layout in ("contiguous", "channels_last"):
        torch.manual_seed(0)
        model = instantiate(cfg.method, instantiate(cfg.backbone))
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        model.to(memory_format=fmt)
        maker = ViewMaker(cfg.augment, cfg.dataset.mean, cfg.dataset.std, torch.device("cpu"), seed=0,
                          channels_last=layout == "channels_last")
        views = maker(x)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        timed_steps(model, optimizer, views, 1)  # warm-up
        setups[layout] = (model, optimizer, views)
    best = {layout: float("inf") for layout in setups}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for layout, (model, optimizer, views) in setups.items():
            best[layout] = min(best[layout], timed_steps(model, optimizer, views, args.steps))
    load_after = os.getloadavg()[0]
    rows = [{"layout": layout, "s_per_step": best[layout] / args.steps,
             "images_per_s": args.batch * args.steps / best[layout]} for layout in setups]
    ratio = best["contiguous"] / best["channels_last"]
    report(f"channels_last_cpu: SimCLR ResNet-18 step, batch {args.batch}, torch threads {torch.get_num_threads()}",
           rows, ["layout", "s_per_step", "images_per_s"],
           notes=f"channels_last / contiguous images/s: {ratio:.2f}× (best of {args.repeats} interleaved repeats of "
                 f"{args.steps} steps). Load average (1 min) {load_before:.1f} before, {load_after:.1f} after: "
                 f"the machine was shared.")


if __name__ == "__main__":
    main()
