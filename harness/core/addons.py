"""Add-ons: what joins training without the method knowing about it.

Pair weights, extra (e.g. synthetic) positives and an online linear probe all work on any
method through the method contract (``LossParts``), so none of them is written into a method
file or the training loop. Each is an object built from config (``weighting``, ``positives``,
``eval.online_linear``) with any of these optional hooks:

- ``setup(data, info) -> None``: once, before training (load its artifacts, move to device).
- ``step(batch: Batch) -> AddonOut``: every step, after the method's forward, under autocast.
  It may return per-pair ``weights`` (multiplied together across add-ons, never carrying
  gradient), an extra ``loss`` (added to the total), and scalars to ``log`` (epoch means).
- ``epoch_metrics() -> dict[str, float]``: extra per-epoch metrics, e.g. a weight distribution;
  called on every rank at each epoch end (reduce over ranks inside if needed).
- ``evaluate(backbone, queries, prepare) -> {split: {protocol: (top1, top5)}}``: results under the
  add-on's own protocol name, stored with the k-NN ones (the online linear classifier).
- ``optim_groups() -> [(module, settings)]``: its parameters' own lr scale / weight decay (see
  harness/core/method.py).

Class-level hooks (called without building the add-on):

- ``check_config(cfg) -> [ConfigError | None]``: its fields, checked with the rest of the job
  before anything runs (harness/jobs/config.py ``validate``).
- ``stages(cfg) -> list[Stage]``: the shared artifacts it needs built before training (a score
  network, a diffusion model, a synthetic set), each a ``harness.jobs.stages.Stage`` with a key, a
  build function, resources and whether it resumes. A sweep builds each distinct key once before
  the training jobs (locally in the driver, on Slurm as jobs they depend on); a single run builds
  them in the job. ``setup`` then only loads them (building under the artifact's lock only when
  nothing staged them, e.g. an add-on built directly in a test).

The add-ons of papers live in methods/, one package each; the core never names them.

An add-on is built as ``Target(job_cfg, **node_keys)``: its constructor gets the whole job config
first (for artifact paths, see harness/artifacts.py, and dataset normalisation), then the other
keys of its config node.

An add-on that is an ``nn.Module`` with parameters is trained by the same optimizer as the
method and saved in the same checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from harness.core.method import LossParts


@dataclass
class Batch:
    """What an add-on sees of one training step (this rank's slice of the global batch)."""

    images: torch.Tensor  # uint8 N×3×H×W, before augmentation
    index: torch.Tensor  # the images' positions in the FULL training split (before subsets and hold-outs)
    views: list[torch.Tensor]  # the method's normalised views
    parts: LossParts  # the method's loss, split into per-pair and batch parts
    method: nn.Module  # the method itself (not the DDP wrapper): heads, embed(), backbone
    epoch: int
    progress: float  # fraction of training done


@dataclass
class AddonOut:
    weights: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


def combine(batch: Batch, addons: list) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, torch.Tensor]]:
    """Run every add-on's step; return (product of weights, sum of extra losses, logs)."""
    weights, extra, logs = None, None, {}
    for addon in addons:
        if not hasattr(addon, "step"):
            continue
        out = addon.step(batch)
        if out.weights is not None:
            w = out.weights.detach()  # weights scale a loss; they never carry gradient
            weights = w if weights is None else weights * w
        if out.loss is not None:
            extra = out.loss if extra is None else extra + out.loss
        logs.update(out.logs)
    return weights, extra, logs
