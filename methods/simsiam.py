"""SimSiam (Chen & He 2021): predict one view's projection from the other's, with a stop-gradient.

Loss per image i: ½·(−cos(p1_i, sg(z2_i))) + ½·(−cos(p2_i, sg(z1_i))) (methods.md §2.2). Every
term involves only image i's own two views, so the whole loss is per-pair, there is no batch term,
and nothing is gathered under DDP: N ranks on N slices already give the mean of the whole batch.
(BatchNorm sees the global batch under trainer.sync_bn=true, the default; see harness/core/distributed.py.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.method import LossParts, mlp


def simsiam_pairs(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Per-image symmetrised negative cosine between predictions and stop-gradient projections."""
    return -0.5 * (F.cosine_similarity(p1, z2.detach(), dim=1) + F.cosine_similarity(p2, z1.detach(), dim=1))


class SimSiam(nn.Module):
    """Projector 3 layers (no bias, BN, ReLU; last BN without affine), predictor bottleneck 2 layers.

    `predictor_static_lr`: the predictor keeps the peak lr throughout (no warm-up or cosine decay),
    as in the SimSiam paper and solo-learn (`static_lr: True` on the predictor's group).
    """

    # solo-learn's SimSiam, like its NNCLR, takes the two large crops' z and p only: no multi-crop form.
    no_multi_crop = "solo-learn's SimSiam has none (its loss takes the two large crops only)"

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 2048, proj_output_dim: int = 2048,
                 pred_hidden_dim: int = 512, predictor_static_lr: bool = True):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp([backbone.feat_dim, proj_hidden_dim, proj_hidden_dim, proj_output_dim],
                             last_bn=True, last_affine=False)
        self.predictor = mlp([proj_output_dim, pred_hidden_dim, proj_output_dim])
        self.predictor_static_lr = predictor_static_lr

    def optim_groups(self) -> list[tuple[nn.Module, dict]]:
        return [(self.predictor, {"static_lr": True})] if self.predictor_static_lr else []

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(x)), dim=1)

    def forward(self, views: list[torch.Tensor]) -> LossParts:
        f1, f2 = (self.backbone(v) for v in views[:2])
        z1, z2 = self.projector(f1), self.projector(f2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        pair = simsiam_pairs(p1.float(), p2.float(), z1.float(), z2.float())
        # Collapse shows as a per-dimension std of the normalised projection near 0 (1/sqrt(d) is healthy).
        z_std = F.normalize(z1.detach().float(), dim=1).std(dim=0).mean()
        return LossParts(pair=pair, batch=pair.new_zeros(()), logs={"z_std": z_std},
                         feats=torch.cat([f1, f2]).detach())
