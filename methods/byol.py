"""BYOL (Grill et al. 2020), as solo-learn's CIFAR setup: an online network with a predictor regresses the
momentum network's projection of the other view.

Per image: (2 − 2·cos(p1, z̄2)) + (2 − 2·cos(p2, z̄1)), z̄ from the momentum backbone and projector
(no gradient); summed over the two directions as solo-learn does. No negatives and no queue, so
nothing is gathered: N ranks give the same per-image losses as one process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.method import LossParts, mlp, split_views
from methods.common import momentum_copy, momentum_tau, update_momentum_encoder


def byol_pairs(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Per image: 2 − 2·cos(p1, z2) + 2 − 2·cos(p2, z1), with z the (detached) momentum projections."""
    return (4 - 2 * F.cosine_similarity(p1, z2.detach(), dim=1) - 2 * F.cosine_similarity(p2, z1.detach(), dim=1))


class BYOL(nn.Module):
    """Projector feat→4096 (BN, ReLU)→256; predictor 256→4096 (BN, ReLU)→256; momentum 0.99→1 (cosine).

    Multi-crop (solo-learn's num_large_crops / num_small_crops): the momentum network sees the large
    views only; every view's prediction regresses every OTHER large view's momentum projection, and
    the terms are summed, as solo-learn's training_step does (two views: byol_pairs)."""

    multi_crop = True

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 4096, proj_output_dim: int = 256,
                 pred_hidden_dim: int = 4096, momentum_base: float = 0.99, momentum_final: float = 1.0,
                 momentum_schedule: str = "cosine"):
        super().__init__()
        self.backbone = backbone
        self.momentum = (momentum_base, momentum_final, momentum_schedule)
        momentum_tau(0.0, *self.momentum)
        self.projector = mlp([backbone.feat_dim, proj_hidden_dim, proj_output_dim])
        self.predictor = mlp([proj_output_dim, pred_hidden_dim, proj_output_dim])
        self.momentum_encoder = momentum_copy(nn.Sequential(backbone, self.projector))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.predictor(self.projector(self.backbone(x))), dim=1)

    def forward(self, views: list[torch.Tensor]) -> LossParts:
        large, small = split_views(views)
        if len(views) > 2 or small:
            feats = [self.backbone(v) for v in views]
            preds = [self.predictor(self.projector(f)).float() for f in feats]
            with torch.no_grad():
                targets = [self.momentum_encoder(v).float() for v in large]
            pair = sum(2 - 2 * F.cosine_similarity(preds[j], targets[i], dim=1)
                       for i in range(len(large)) for j in range(len(views)) if j != i)
            return LossParts(pair=pair, batch=pair.new_zeros(()), feats=torch.cat(feats[:len(large)]).detach())
        f1, f2 = self.backbone(views[0]), self.backbone(views[1])
        p1, p2 = (self.predictor(self.projector(f)).float() for f in (f1, f2))
        with torch.no_grad():
            z1, z2 = (self.momentum_encoder(v).float() for v in views[:2])
        pair = byol_pairs(p1, p2, z1, z2)
        return LossParts(pair=pair, batch=pair.new_zeros(()), feats=f1.detach())

    def after_step(self, progress: float) -> None:
        update_momentum_encoder(self, progress)
