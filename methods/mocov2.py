"""MoCo v2+ (Chen et al. 2020, solo-learn's "mocov2plus"): symmetric InfoNCE of queries against
momentum keys and a queue of past keys; the base of SCE and of CLSP-MoCo.

Per image: ½·[InfoNCE(q1, k2, queue2) + InfoNCE(q2, k1, queue1)], one queue per view as in
solo-learn. Keys are momentum-encoder projections; after each optimizer step the momentum encoder
moves by EMA and the keys of every rank are enqueued (methods/common.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.method import LossParts, mlp
from methods.common import (
    Queue,
    infonce_queue_pairs,
    keep_queues_out_of_ddp_broadcast,
    momentum_copy,
    momentum_tau,
    update_momentum_encoder,
)


class MoCoV2(nn.Module):
    """Projector Linear(feat→2048)–ReLU–Linear(→256), no BN; momentum copies of backbone and projector."""

    # solo-learn, the reference, has no multi-crop form for MoCo v2+: its training_step takes the two large
    # crops' queries and keys only and forwards small crops through the backbone for nothing, and main_pretrain
    # allows more than two large crops only for W-MSE and MAE. Accepting the recipe would train a
    # two-view run at the cost of a multi-crop one, so it is refused.
    no_multi_crop = "solo-learn's MoCo v2+ has none (its loss takes the two large crops only)"

    def __init__(self, backbone: nn.Module, temperature: float = 0.2, proj_hidden_dim: int = 2048,
                 proj_output_dim: int = 256, queue_size: int = 32768, momentum_base: float = 0.99,
                 momentum_final: float = 0.999, momentum_schedule: str = "cosine"):
        super().__init__()
        self.backbone = backbone
        self.temperature = temperature
        self.momentum = (momentum_base, momentum_final, momentum_schedule)
        momentum_tau(0.0, *self.momentum)  # reject an unknown schedule now, not at the first step
        self.projector = mlp([backbone.feat_dim, proj_hidden_dim, proj_output_dim], bn=False)
        self.momentum_encoder = momentum_copy(nn.Sequential(backbone, self.projector))
        self.queue1 = Queue(queue_size, proj_output_dim, seed=1)  # past keys of view 1
        self.queue2 = Queue(queue_size, proj_output_dim, seed=2)  # past keys of view 2
        keep_queues_out_of_ddp_broadcast(self)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(x)), dim=1)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.momentum_encoder(x), dim=1)

    def forward(self, views: list[torch.Tensor]) -> LossParts:
        f1, f2 = self.backbone(views[0]), self.backbone(views[1])
        q1, q2 = (F.normalize(self.projector(f), dim=1).float() for f in (f1, f2))
        k1, k2 = self.keys(views[0]).float(), self.keys(views[1]).float()
        pair = (infonce_queue_pairs(q1, k2, self.queue2.keys, self.temperature)
                + infonce_queue_pairs(q2, k1, self.queue1.keys, self.temperature)) / 2
        self.queue1.stage(k1)
        self.queue2.stage(k2)
        return LossParts(pair=pair, batch=pair.new_zeros(()), feats=f1.detach())

    def after_step(self, progress: float) -> None:
        update_momentum_encoder(self, progress)
        self.queue1.push_staged()
        self.queue2.push_staged()
