"""One GPU: seconds per SimCLR ResNet-18 CIFAR-10 epoch (batch 512) and model FLOP utilisation, eager vs compiled.

    python benchmarks/epoch_gpu.py [--epochs 2] [--peak-tflops 989]

Runs only where CUDA is present (it says so and exits otherwise). The full training set (50,000
images) lives on the GPU as uint8; views are made there in one batched pass; bf16 autocast and
channels_last as in the trainer, which is what is timed (`harness.core.trainer.fit`). MFU counts the
model's forward+backward FLOPs of one step (torch.utils.flop_counter) × steps per epoch ÷ epoch
time ÷ peak bf16 dense FLOP/s (989 TFLOP/s for an H100 SXM; pass yours).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import report  # noqa: E402
from harness.core import distributed  # noqa: E402
from harness.core.data.augment import ViewMaker  # noqa: E402
from harness.core.data.datasets import load_dataset  # noqa: E402
from harness.core.trainer import fit  # noqa: E402
from harness.jobs.config import compose, instantiate  # noqa: E402


def step_flops(cfg, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = instantiate(cfg.method, instantiate(cfg.backbone)).to(device)
    views = ViewMaker(cfg.augment, cfg.dataset.mean, cfg.dataset.std, device, seed=0)
    x = torch.randint(0, 256, (int(cfg.trainer.batch_size), 3, 32, 32), dtype=torch.uint8, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast("cuda", dtype=torch.bfloat16):
        model(views(x)).total().backward()
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("epoch_gpu: skipped: no CUDA device on this machine (run it on a GPU node)")
        return
    device = torch.device("cuda")
    rows = []
    for compiled in (False, True):
        cfg = compose(["backbone=resnet18", f"trainer.batch_size={args.batch}", f"trainer.epochs={args.epochs}",
                       "eval.every=0", "trainer.log_every=1000", f"trainer.compile={str(compiled).lower()}",
                       "trainer.device=cuda"])
        data = load_dataset(cfg.dataset)
        data.test_x, data.test_y = data.test_x[:512], data.test_y[:512]  # evaluation is not what we time
        flops = step_flops(cfg, device)
        times: list[float] = []
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            model = instantiate(cfg.method, instantiate(cfg.backbone))
            fit(cfg, model, data, distributed.DistInfo(device=device), Path(tmp) / "ckpt.pt",
                lambda e, m, times=times: times.append(m["epoch_time_s"]))
        steps = len(data.train_x) // args.batch
        best = min(times[1:] or times)  # the first epoch pays for compilation and warm-up
        rows.append({"mode": "compiled" if compiled else "eager", "epoch_s": best, "first_epoch_s": times[0],
                     "images_per_s": steps * args.batch / best,
                     "mfu_pct": 100 * flops * steps / best / (args.peak_tflops * 1e12)})
    report(f"epoch_gpu: SimCLR ResNet-18, CIFAR-10, batch {args.batch}, {torch.cuda.get_device_name()}", rows,
           ["mode", "epoch_s", "first_epoch_s", "images_per_s", "mfu_pct"],
           notes="Target: under 4 s per epoch on an H100.")


if __name__ == "__main__":
    main()
