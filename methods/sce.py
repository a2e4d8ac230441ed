"""SCE: Similarity Contrastive Estimation (Denize et al., WACV 2023), methods.md §3.

A MoCo-style online/momentum pair with a queue, trained with a soft target: for image i, the target
over {its own key, the queue} is w_i = λ·one-hot(own key) + (1−λ)·s_i, where s_i is the momentum
view's softmax (temperature τ_m) over the OTHER instances (the queue), renormalised to sum to 1; the
loss is the cross-entropy of w_i with the online softmax (temperature τ) over the same set.
λ = 1 is MoCo's InfoNCE; λ = 0 is purely relational.

CIFAR setting (``symmetric: false``): view 0 (weak) goes only to the momentum encoder, view 1
(strong) only to the online encoder. Keys of view 0 from every rank are enqueued after each step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.method import LossParts, mlp
from methods.common import (
    Queue,
    forward_in_shuffled_groups,
    full_precision,
    keep_queues_out_of_ddp_broadcast,
    momentum_copy,
    momentum_tau,
    update_momentum_encoder,
)

TARGET_SELF = ("exclude", "zero")


@full_precision
def sce_pairs(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float, temperature_m: float,
              lam: float, target_self: str = "exclude") -> torch.Tensor:
    """SCE loss per anchor. q: online (n, d); k: momentum keys of the same images (n, d); queue: (K, d).

    target_self: ``exclude`` leaves the own key out of the relational distribution (the paper's
    formula, eztorch with keys); ``zero`` gives it a target logit of 0 (the original SCE repo).
    """
    queue = queue.to(q.dtype)
    logits_q = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ queue.T], dim=1) / temperature
    self_logit = float("-inf") if target_self == "exclude" else 0.0
    logits_k = torch.cat([torch.full_like(logits_q[:, :1], self_logit), k @ queue.T / temperature_m], dim=1)
    target = (1 - lam) * torch.softmax(logits_k, dim=1)
    target[:, 0] += lam
    target = target / target.sum(dim=1, keepdim=True)
    return -(target.detach() * torch.log_softmax(logits_q, dim=1)).sum(dim=1)


class SCE(nn.Module):
    """Projector feat→512 (BN, ReLU)→128 (SCE's CIFAR trunk head); optional predictor; momentum copies."""

    num_views = 2

    def __init__(self, backbone: nn.Module, temperature: float = 0.1, temperature_m: float = 0.05, lam: float = 0.5,
                 proj_hidden_dim: int = 512, proj_output_dim: int = 128, pred_hidden_dim: int | None = None,
                 queue_size: int = 4096, momentum_base: float = 0.99, momentum_final: float = 1.0,
                 momentum_schedule: str = "constant", symmetric: bool = False, shuffle_bn_groups: int = 8,
                 target_self: str = "exclude"):
        super().__init__()
        if target_self not in TARGET_SELF:
            raise ValueError(f"method.target_self={target_self!r} is not one of {', '.join(TARGET_SELF)}")
        self.backbone = backbone
        self.temperature, self.temperature_m, self.lam = temperature, temperature_m, lam
        self.symmetric, self.shuffle_bn_groups, self.target_self = symmetric, shuffle_bn_groups, target_self
        self.momentum = (momentum_base, momentum_final, momentum_schedule)
        momentum_tau(0.0, *self.momentum)
        self.projector = mlp([backbone.feat_dim, proj_hidden_dim, proj_output_dim])
        self.predictor = mlp([proj_output_dim, pred_hidden_dim, proj_output_dim]) if pred_hidden_dim else nn.Identity()
        self.momentum_encoder = momentum_copy(nn.Sequential(backbone, self.projector))
        self.queue = Queue(queue_size, proj_output_dim)
        keep_queues_out_of_ddp_broadcast(self)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.predictor(self.projector(self.backbone(x))), dim=1)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(forward_in_shuffled_groups(self.momentum_encoder, x, self.shuffle_bn_groups), dim=1)

    def _loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return sce_pairs(q.float(), k.float(), self.queue.keys, self.temperature, self.temperature_m, self.lam,
                         self.target_self)

    def forward(self, views: list[torch.Tensor]) -> LossParts:
        target_view, online_view = views[0], views[1]
        f_online = self.backbone(online_view)
        q = F.normalize(self.predictor(self.projector(f_online)), dim=1)
        k = self.keys(target_view)
        pair = self._loss(q, k)
        if self.symmetric:  # each view also as the online view against the other's keys
            q_first = self.embed(target_view)
            pair = (pair + self._loss(q_first, self.keys(online_view))) / 2
        self.queue.stage(k)
        return LossParts(pair=pair, batch=pair.new_zeros(()), feats=f_online.detach())

    def after_step(self, progress: float) -> None:
        update_momentum_encoder(self, progress)
        self.queue.push_staged()
