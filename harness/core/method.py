"""The method contract, and the small pieces every method file builds from.

A method is an ``nn.Module`` that owns the backbone it is given and its own heads. Called on a
list of views (normalised image batches), it returns ``LossParts``: the per-pair loss (one entry
per anchor image, not yet averaged), a batch-level scalar, and scalars to log. The trainer forms
``mean(w * pair) + batch`` with ``w = 1`` unless a pair weighting is configured; that single
contract is what lets a pair weighting or extra positives (add-ons) join any method without touching it.

Optional hooks a method may define:
- ``after_step(progress: float)``: after each optimizer step (EMA updates, queue pushes);
  `progress` is the fraction of training done, for momentum schedules.
- ``embed(x) -> Tensor``: the L2-normalised embedding an extra positive is compared in.
- ``optim_groups() -> list[tuple[nn.Module, dict]]``: sub-modules whose parameters need their own
  optimizer settings: ``weight_decay``, ``lr_scale`` (times the scheduled lr) or ``static_lr``
  (the peak lr throughout, e.g. SimSiam's predictor). Add-ons may define it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LossParts:
    pair: torch.Tensor  # shape (n,), one loss per anchor image of this rank's batch
    batch: torch.Tensor  # scalar; zero for methods without batch-level terms
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    # Detached backbone features of one or more views of this rank's batch, stacked view after
    # view ((k·n) × feat_dim): what an online linear probe trains on (harness/core/evaluate.py). None
    # when a method does not expose them.
    feats: torch.Tensor | None = None

    def total(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        pair = self.pair if weights is None else weights * self.pair
        return pair.mean() + self.batch


def mlp(dims: list[int], *, bn: bool = True, last_bn: bool = False, last_affine: bool = True,
        bias: bool = True) -> nn.Sequential:
    """Linear layers through `dims` with (BN,) ReLU between them; options for the last layer's BN."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        last = i == len(dims) - 2
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias and not (bn and (not last or last_bn))))
        if not last:
            if bn:
                layers.append(nn.BatchNorm1d(dims[i + 1]))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(dims[i + 1], affine=last_affine))
    return nn.Sequential(*layers)


def split_views(views: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(large, small) views of a multi-crop step: the leading views of the first view's size, then
    the rest (solo-learn's num_large_crops / num_small_crops, eztorch's global / local crops)."""
    size = views[0].shape[-1]
    n_large = next((i for i, v in enumerate(views) if v.shape[-1] != size), len(views))
    return views[:n_large], views[n_large:]


def multi_crop_errors(cfg, method_class: type) -> list:
    """A multi-crop recipe (more than two views, or views of different sizes) is refused, in one line,
    for a method whose reference has no multi-crop form here (class attribute ``multi_crop = True``
    says it has one; ``no_multi_crop``, a phrase, says why not) and with the pair add-ons, which
    score or extend a two-view pair."""
    from harness.errors import ConfigError

    views = list(cfg.augment.views)
    sizes = [(cfg.augment.pipelines[v].get("size") if v in cfg.augment.pipelines else None) for v in views]
    if len(views) <= 2 and len(set(sizes)) <= 1:
        return []
    errors = []
    if len(set(sizes)) > 1 and sizes != sorted(sizes, key=lambda s: -(s or 0)):
        errors.append(ConfigError("augment.views", views, "the large views first, then the small ones"))
    name = cfg.method.get("name", method_class.__name__)
    if not getattr(method_class, "multi_crop", False):
        # A method may say why its reference has no multi-crop form (class attribute no_multi_crop).
        why = getattr(method_class, "no_multi_crop", "its multi-crop form is not implemented")
        errors.append(ConfigError("augment.views", views, f"two views of one size for method={name}: {why} "
                                  "(simclr, sce and byol have one)"))
    for group in ("weighting", "positives"):
        node = cfg.get(group)
        if node is not None and node.get("_target_"):
            errors.append(ConfigError(group, node.get("name"), f"none with a multi-crop recipe: the {group} add-on "
                                      "scores or extends a pair of two views of one size"))
    return errors
