"""How strongly the interpolated sampler pulls a sample toward its anchor, with a model trained here.

Trains (or reuses, through the artifact folder) the diffusion model a job's config asks for, then
samples 64 real training anchors with w = 0.1, 0.5 and 1 from the same noise and reports the pixel
MSE to the anchor and how often the anchor is the sample's nearest image among the 64 (1/64 by
chance). With w = 1 the sampler is plain DDIM, so the anchor should not matter there. Needs a
model that generates images: on a GPU, e.g.

    python benchmarks/clsp_anchor_pull.py positives=clsp positives.diffusion.epochs=200 \
        dataset.train_size=10000 store.path=/tmp/pull.duckdb
"""

from __future__ import annotations

import sys

import torch
from common import report

from harness.config import compose, validate
from harness.data.datasets import load_dataset
from harness.diffusion import ddim_scheduler, diffusion_model, load_model, resolve_device, sample_interpolated


def main(overrides: list[str]) -> None:
    cfg = compose(overrides)
    validate(cfg)
    device = resolve_device(str(cfg.positives.generate.device))
    data = load_dataset(cfg.dataset)
    unet, trained = load_model(diffusion_model(cfg, data.train_x, device))
    unet = unet.to(device).eval()
    scheduler = ddim_scheduler(trained, cfg.positives.sampler)
    rows_idx = torch.linspace(0, len(data.train_x) - 1, 64).round().long()
    anchors = data.train_x[rows_idx].to(device).float() / 127.5 - 1
    rows = []
    for w in (0.1, 0.5, 1.0):
        gens = [torch.Generator().manual_seed(i) for i in range(64)]
        anchor_gens = [torch.Generator().manual_seed(1000 + i) for i in range(64)]
        out = sample_interpolated(unet, scheduler, anchors, weight=w, steps=int(cfg.positives.sampler.steps),
                                  eta=float(cfg.positives.sampler.eta), generators=gens, anchor_generators=anchor_gens)
        dist = (out[:, None] - anchors[None]).pow(2).flatten(2).mean(2)  # sample i × anchor j
        own = torch.eye(64, dtype=torch.bool, device=device)
        nearest_own = (dist.argmin(1) == torch.arange(64, device=device)).float().mean()
        rows.append({"w": w, "MSE to anchor": f"{dist.diag().mean():.4f}",
                     "MSE to other anchors": f"{dist[~own].mean():.4f}", "nearest is own anchor": f"{nearest_own:.2f}"})
    report("CLSP anchor pull (clsp_anchor_pull.py)", rows, list(rows[0]),
           notes="overrides: " + " ".join(overrides) + f"; sampler steps {cfg.positives.sampler.steps}, "
                 f"eta {cfg.positives.sampler.eta}; 64 training images of {cfg.dataset.name}.")


if __name__ == "__main__":
    main(sys.argv[1:])
