"""CLSP stage costs: DDPM training and anchor-interpolated sampling speed, and what they imply.

For the tiny preset and the released CIFAR UNet (positives=clsp defaults), measures images per
second of a DDPM training step and of one interpolated-sampler step (sample and anchor through the
encoder, the sample through the decoder), against a plain UNet forward for scale, then projects the
hours to train the DDPM (2000 epochs of CIFAR-10) and to generate the CIFAR-10 set (50,000 × 8
candidates × 100 steps) on this machine.

    python benchmarks/clsp_sampler.py [--device cuda] [--batch 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import report

from harness.jobs.config import compose
from methods.clsp.diffusion import build_unet, interpolated_noise


def timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def measure(preset: str, device: torch.device, batch: int, repeats: int, sync) -> dict:
    cfg = compose([f"positives={preset}"]).positives
    unet = build_unet(cfg.diffusion.unet, 32).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-4)

    def train_step():
        loss = F.mse_loss(unet(x, t).sample, x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    unet.train()
    train_s = timed(train_step, repeats, sync)
    unet.eval()
    with torch.no_grad():
        plain_s = timed(lambda: unet(x, t[:1]).sample, repeats, sync)
        mixed_s = timed(lambda: interpolated_noise(unet, x, x, t[:1], 0.1), repeats, sync)
    train_ips, mixed_ips = batch / train_s, batch / mixed_s
    d, s = cfg.diffusion, cfg.sampler
    return {
        "preset": preset,
        "params (M)": f"{sum(p.numel() for p in unet.parameters()) / 1e6:.1f}",
        "train img/s": f"{train_ips:,.1f}",
        "UNet fwd img/s": f"{batch / plain_s:,.1f}",
        "sampler step img/s": f"{mixed_ips:,.1f}",
        "sampler / fwd": f"{plain_s / mixed_s:.2f}",
        "DDPM C10 h": f"{int(d.epochs) * 50_000 / train_ips / 3600:,.1f}",
        "set C10 h": f"{50_000 * int(cfg.candidates) * int(s.steps) / mixed_ips / 3600:,.1f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = [measure(preset, device, args.batch, args.repeats, sync) for preset in ("clsp_tiny", "clsp")]
    report("CLSP stage costs (clsp_sampler.py)", rows, list(rows[0]),
           notes=f"device {device}, batch {args.batch}. 'DDPM C10 h': diffusion.epochs × 50,000 images at the "
                 "train rate; 'set C10 h': 50,000 × candidates × sampler.steps at the sampler-step rate, "
                 "each with that preset's settings.")


if __name__ == "__main__":
    main()
