"""How strongly the interpolated sampler pulls a sample toward its anchor, with a model trained here.

Trains (or reuses, through the artifact folder) the diffusion model a job's config asks for, then
samples 64 of its own training images as anchors with w = 0.1, 0.5 and 1 from the same noise. For
each w it reports the MSE to the anchor and to the other 63 anchors, in pixels and on 4×4 block
means (the colour layout, which is what the bottleneck carries), the share of anchors whose sample
is closer to them than the w = 1 sample from the same noise, and how often the anchor is the
sample's nearest image among the 64 (1/64 by chance). With w = 1 the sampler is plain DDIM, so the
anchor does not matter there. It also saves a grid (anchor | w = 0.1 | 0.5 | 1) beside the store.
On a GPU, a full-size model on 10,000 images:

    python benchmarks/clsp_anchor_pull.py positives=clsp positives.diffusion.epochs=200 \
        dataset.train_size=10000 store.path=/tmp/pull.duckdb

On 2 CPU cores, the small model of tests/fixtures/clsp_ddpm_cifar10_256 (88 minutes; its README has
the command), sampled with positives.sampler.clip_sample=true.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import report

from harness.core.data.datasets import load_dataset
from harness.jobs.config import compose, validate
from methods.clsp.diffusion import ddim_scheduler, diffusion_model, load_model, sample_interpolated, to_uint8
from methods.clsp.generate import generation_device, save_grid

WEIGHTS = (0.1, 0.5, 1.0)


def squared_distances(samples: torch.Tensor, anchors: torch.Tensor, block: int = 1) -> torch.Tensor:
    """Mean squared distance of sample i to anchor j (an N×N matrix), after block×block averaging."""
    if block > 1:
        samples, anchors = F.avg_pool2d(samples, block), F.avg_pool2d(anchors, block)
    return (samples[:, None] - anchors[None]).pow(2).flatten(2).mean(2)


def main(overrides: list[str]) -> None:
    cfg = compose(overrides)
    validate(cfg)
    device = generation_device(cfg)
    data = load_dataset(cfg.dataset)
    model = diffusion_model(cfg, data.train_x, device)
    unet, trained = load_model(model)
    unet = unet.to(device).eval()
    scheduler = ddim_scheduler(trained, cfg.positives.sampler)
    n = 64
    rows_idx = torch.linspace(0, len(data.train_x) - 1, n).round().long()
    anchors = data.train_x[rows_idx].to(device).float() / 127.5 - 1
    samples = {}
    for w in WEIGHTS:
        samples[w] = sample_interpolated(
            unet, scheduler, anchors, weight=w, steps=int(cfg.positives.sampler.steps),
            eta=float(cfg.positives.sampler.eta), generators=[torch.Generator().manual_seed(i) for i in range(n)],
            anchor_generators=[torch.Generator().manual_seed(1000 + i) for i in range(n)])
    own = torch.eye(n, dtype=torch.bool, device=device)
    scales = ((1, "pixels"), (8, "4×4 means"))
    dists = {(w, block): squared_distances(samples[w], anchors, block) for w in WEIGHTS for block, _ in scales}
    rows = []
    for w in WEIGHTS:
        row = {"w": w}
        for block, label in scales:
            dist, plain = dists[w, block], dists[1.0, block].diag()
            row[f"{label}: to anchor"] = f"{dist.diag().mean():.4f}"
            row[f"{label}: to others"] = f"{dist[~own].mean():.4f}"
            row[f"{label}: closer than w=1"] = f"{(dist.diag() < plain).float().mean():.2f}"
            nearest_is_own = dist.argmin(1) == torch.arange(n, device=device)
            row[f"{label}: nearest is anchor"] = f"{nearest_is_own.float().mean():.2f}"
        rows.append(row)
    grid = Path(str(cfg.store.path)).parent / "anchor_pull.png"
    shown = torch.arange(0, n, n // 8)
    save_grid(grid, data.train_x[rows_idx[shown]],
              np.stack([to_uint8(samples[w][shown].cpu()).numpy() for w in WEIGHTS], axis=1))
    report("CLSP anchor pull (clsp_anchor_pull.py)", rows, list(rows[0]),
           notes="overrides: " + " ".join(overrides) + f"; model {model}; sampler steps {cfg.positives.sampler.steps}, "
                 f"eta {cfg.positives.sampler.eta}; 64 of the model's {len(data.train_x)} training images of "
                 f"{cfg.dataset.name}; grid (anchor | w=0.1 | 0.5 | 1) in {grid}.")


if __name__ == "__main__":
    main(sys.argv[1:])
