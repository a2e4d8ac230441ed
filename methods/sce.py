"""SCE: Similarity Contrastive Estimation (Denize et al., WACV 2023), methods.md §3.

A MoCo-style online/momentum pair with a queue, trained with a soft target: for image i, the target
over a candidate set is w_i = λ·one-hot(own key) + (1−λ)·s_i, where s_i is the momentum view's
softmax (temperature τ_m) over the candidates, renormalised to sum to 1; the loss is the
cross-entropy of w_i with the online softmax (temperature τ) over the same candidates.
λ = 1 is MoCo's InfoNCE; λ = 0 is purely relational.

Reference implementation: eztorch (eztorch/losses/sce_loss.py), the authors' successor to the SCE
repo. Its ``use_keys`` switch decides the candidates and the own key's target logit, and this
module's ``use_keys`` computes the same thing:
- ``use_keys: false`` (eztorch's default, and the original SCE repo): candidates {own key, queue};
  the own key's target logit is 0 (not −∞), so s_i keeps mass 1/(1 + Σ_queue exp(k_i·c/τ_m)) on
  it and w_i's own-key mass is λ + (1−λ)/(1 + Σ_queue exp(k_i·c/τ_m)).
- ``use_keys: true``: candidates {the keys of the whole global batch, queue}; the own key is
  excluded from s_i (logit −∞, as in the paper's formula) and the batch's other keys are extra
  negatives on both the target and the online side.

CIFAR setting (``symmetric: false``): view 0 (weak) goes only to the momentum encoder, view 1
(strong) only to the online encoder. Keys of view 0 from every rank are enqueued after each step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.core import distributed
from harness.core.method import LossParts, mlp, split_views
from methods.common import (
    Queue,
    forward_in_shuffled_groups,
    full_precision,
    keep_queues_out_of_ddp_broadcast,
    momentum_copy,
    momentum_tau,
    update_momentum_encoder,
)


def sce_target_and_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
                          temperature_m: float, lam: float, use_keys: bool = False,
                          batch_keys: torch.Tensor | None = None, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """SCE's soft target w (n, C) and online logits (n, C) over the C candidates of each anchor.

    q: online (n, d); k: momentum keys of the same images (n, d); queue: (K, d).
    use_keys=False: candidates {own key, queue}, own key's target logit 0 (eztorch's default).
    use_keys=True: candidates {batch_keys, queue}, where batch_keys (N, d) are the keys of the whole
    global batch in rank order (default: k, one process) and row i's own key is batch_keys[offset + i];
    its target logit is −∞ (eztorch's ``use_keys=True``).
    """
    queue = queue.to(q.dtype)
    rows = torch.arange(len(q), device=q.device)
    if use_keys:
        batch_keys = k if batch_keys is None else batch_keys.to(q.dtype)
        own = offset + rows
        logits_q = torch.cat([q @ batch_keys.T, q @ queue.T], dim=1) / temperature
        logits_k = torch.cat([k @ batch_keys.T, k @ queue.T], dim=1) / temperature_m
        logits_k[rows, own] = float("-inf")
    else:
        own = torch.zeros_like(rows)
        logits_q = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ queue.T], dim=1) / temperature
        logits_k = torch.cat([torch.zeros_like(logits_q[:, :1]), k @ queue.T / temperature_m], dim=1)
    target = (1 - lam) * torch.softmax(logits_k, dim=1)
    target[rows, own] += lam
    return (target / target.sum(dim=1, keepdim=True)).detach(), logits_q


@full_precision
def sce_pairs(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float, temperature_m: float,
              lam: float, use_keys: bool = False, batch_keys: torch.Tensor | None = None,
              offset: int = 0) -> torch.Tensor:
    """SCE loss per anchor: the cross-entropy of `sce_target_and_logits`'s target with the online softmax."""
    target, logits_q = sce_target_and_logits(q, k, queue, temperature, temperature_m, lam, use_keys, batch_keys,
                                             offset)
    return -(target * torch.log_softmax(logits_q, dim=1)).sum(dim=1)


class SCE(nn.Module):
    """Projector feat→512 (BN, ReLU)→128 (SCE's CIFAR trunk head); optional predictor; momentum copies.

    Multi-crop (eztorch's num_global_crops / num_local_crops, its five-crop ImageNet run): keys come
    from the large (global) views only. Symmetric: every view's query against every OTHER global
    view's keys, averaged over the (views − 1) × globals pairs, and the keys of all global views are
    enqueued; not symmetric: the first view's keys against the queries of all other views."""

    multi_crop = True

    def __init__(self, backbone: nn.Module, temperature: float = 0.1, temperature_m: float = 0.05, lam: float = 0.5,
                 proj_hidden_dim: int = 512, proj_output_dim: int = 128, pred_hidden_dim: int | None = None,
                 queue_size: int = 4096, momentum_base: float = 0.99, momentum_final: float = 1.0,
                 momentum_schedule: str = "constant", symmetric: bool = False, shuffle_bn_groups: int = 8,
                 use_keys: bool = False, proj_last_bn: bool = False):
        super().__init__()
        if not isinstance(use_keys, bool):
            raise ValueError(f"method.use_keys={use_keys!r} is not true or false")
        self.backbone = backbone
        self.temperature, self.temperature_m, self.lam = temperature, temperature_m, lam
        self.symmetric, self.shuffle_bn_groups, self.use_keys = symmetric, shuffle_bn_groups, use_keys
        self.momentum = (momentum_base, momentum_final, momentum_schedule)
        momentum_tau(0.0, *self.momentum)
        # ImageNet's projector has two hidden layers and a BN without affine on its output (eztorch's
        # projector_resnet50_mlp3_bn3): proj_hidden_dim may list the hidden widths.
        hidden = [proj_hidden_dim] if isinstance(proj_hidden_dim, int) else list(proj_hidden_dim)
        self.projector = mlp([backbone.feat_dim, *hidden, proj_output_dim], last_bn=proj_last_bn, last_affine=False)
        self.predictor = mlp([proj_output_dim, pred_hidden_dim, proj_output_dim]) if pred_hidden_dim else nn.Identity()
        self.momentum_encoder = momentum_copy(nn.Sequential(backbone, self.projector))
        self.queue = Queue(queue_size, proj_output_dim)
        keep_queues_out_of_ddp_broadcast(self)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.predictor(self.projector(self.backbone(x))), dim=1)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(forward_in_shuffled_groups(self.momentum_encoder, x, self.shuffle_bn_groups), dim=1)

    @staticmethod
    def check_config(cfg) -> list:
        """Config problems found before anything runs (called by harness.jobs.config.validate)."""
        from harness.errors import ConfigError

        value = cfg.method.get("use_keys", False)
        return [] if isinstance(value, bool) else [ConfigError("method.use_keys", value, "true or false")]

    def _loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        batch_keys, offset = None, 0
        if self.use_keys:  # every rank's keys of this step are candidates (equal local batches, rank order)
            batch_keys, offset = distributed.gather(k.float(), grad=False), distributed.rank() * len(k)
        return sce_pairs(q.float(), k.float(), self.queue.keys, self.temperature, self.temperature_m, self.lam,
                         self.use_keys, batch_keys, offset)

    def forward(self, views: list[torch.Tensor]) -> LossParts:
        if len(views) > 2 or split_views(views)[1]:
            return self.forward_multi_crop(views)
        target_view, online_view = views[0], views[1]
        f_online = self.backbone(online_view)
        q = F.normalize(self.predictor(self.projector(f_online)), dim=1)
        k = self.keys(target_view)
        pair = self._loss(q, k)
        if self.symmetric:  # each view also as the online view against the other's keys
            q_first = self.embed(target_view)
            k_second = self.keys(online_view)
            pair = (pair + self._loss(q_first, k_second)) / 2
            k = torch.cat([k, k_second])  # eztorch enqueues the keys of both views when symmetric
        self.queue.stage(k)
        return LossParts(pair=pair, batch=pair.new_zeros(()), feats=f_online.detach())

    def forward_multi_crop(self, views: list[torch.Tensor]) -> LossParts:
        large, _ = split_views(views)
        keyed = range(len(large)) if self.symmetric else range(1)
        keys = {i: self.keys(views[i]) for i in keyed}
        feats = {j: self.backbone(views[j]) for j in range(len(views)) if not (len(keyed) == 1 and j == 0)}
        queries = {j: F.normalize(self.predictor(self.projector(f)), dim=1) for j, f in feats.items()}
        losses = [self._loss(queries[j], keys[i]) for i in keyed for j in queries if j != i]
        pair = torch.stack(losses).mean(dim=0)
        self.queue.stage(torch.cat([keys[i] for i in keyed]))
        return LossParts(pair=pair, batch=pair.new_zeros(()), feats=feats[min(feats)].detach())

    def after_step(self, progress: float) -> None:
        update_momentum_encoder(self, progress)
        self.queue.push_staged()
