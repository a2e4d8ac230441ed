"""SimCLR (Chen et al. 2020): NT-Xent over the 2N L2-normalised projections of two views.

Negatives are gathered from every rank (with gradients), so N processes on N slices of a batch
compute the same loss as one process on the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.core import distributed
from harness.core.method import LossParts, mlp, split_views
from methods.common import full_precision


@full_precision
def nt_xent_pairs(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-pair NT-Xent: for image i, the mean of its two views' −log softmax(positive).

    z1, z2: this rank's L2-normalised embeddings (n × d) of views 1 and 2. Each anchor is
    contrasted with its positive and all 2M−2 other embeddings of the global batch (M images).
    In float32 with autocast off (full_precision): at τ = 0.2 bf16 logits round to steps of ~0.04.
    """
    n = z1.shape[0]
    all1, all2 = distributed.gather(z1), distributed.gather(z2)
    m = all1.shape[0]
    offset = distributed.rank() * n
    candidates = torch.cat([all1, all2])  # 2M × d
    anchors = torch.cat([z1, z2])  # 2n × d
    logits = anchors @ candidates.T / temperature
    local = torch.arange(n, device=z1.device) + offset
    self_index = torch.cat([local, local + m])
    positive_index = torch.cat([local + m, local])
    rows = torch.arange(2 * n, device=z1.device)
    positive = logits[rows, positive_index]
    # Each anchor's own column masked out; the mask is built on the device (no tensor from the host).
    is_self = torch.arange(2 * m, device=z1.device) == self_index[:, None]
    logits = logits.masked_fill(is_self, float("-inf"))
    per_anchor = torch.logsumexp(logits, dim=1) - positive
    return (per_anchor[:n] + per_anchor[n:]) / 2


@full_precision
def nt_xent_multi_pairs(zs: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Per-image NT-Xent over V ≥ 2 views of different sizes (multi-crop), as solo-learn's
    ``simclr_loss_func`` on every crop's embedding with the image index repeated per crop: each of
    the V·n anchors has the image's V − 1 other views as positives; its loss is
    −log(Σ_pos exp(s/τ) / Σ_not-self exp(s/τ)). Returns the mean over an image's V anchors."""
    v, n = len(zs), zs[0].shape[0]
    gathered = [distributed.gather(z) for z in zs]
    m = gathered[0].shape[0]
    dev = zs[0].device
    logits = torch.cat(zs) @ torch.cat(gathered).T / temperature  # (V·n) × (V·M)
    image_of_candidate = torch.arange(m, device=dev).repeat(v)
    image_of_anchor = (torch.arange(n, device=dev) + distributed.rank() * n).repeat(v)
    self_column = torch.arange(v, device=dev).repeat_interleave(n) * m + image_of_anchor
    is_self = torch.arange(v * m, device=dev) == self_column[:, None]
    positive = (image_of_candidate[None, :] == image_of_anchor[:, None]) & ~is_self
    logits = logits.masked_fill(is_self, float("-inf"))
    per_anchor = torch.logsumexp(logits, dim=1) - torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
    return per_anchor.view(v, n).mean(dim=0)


class SimCLR(nn.Module):
    """Projector Linear(feat→hidden)–ReLU–Linear(hidden→out), no BN, as solo-learn's CIFAR setup.

    Multi-crop (solo-learn's num_large_crops + num_small_crops): every crop, large or small, is an
    anchor and a candidate (nt_xent_multi_pairs)."""

    multi_crop = True

    def __init__(self, backbone: nn.Module, temperature: float = 0.2, proj_hidden_dim: int = 2048,
                 proj_output_dim: int = 256):
        super().__init__()
        self.backbone = backbone
        self.temperature = temperature
        self.projector = mlp([backbone.feat_dim, proj_hidden_dim, proj_output_dim], bn=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(x)), dim=1)

    def forward(self, views: list[torch.Tensor]) -> LossParts:
        large, small = split_views(views)
        if len(views) > 2 or small:
            feats = [self.backbone(v) for v in views]
            pair = nt_xent_multi_pairs([F.normalize(self.projector(f), dim=1) for f in feats], self.temperature)
            return LossParts(pair=pair, batch=pair.new_zeros(()), feats=torch.cat(feats[:len(large)]).detach())
        f1, f2 = (self.backbone(v) for v in views[:2])
        z1, z2 = (F.normalize(self.projector(f), dim=1) for f in (f1, f2))
        pair = nt_xent_pairs(z1, z2, self.temperature)
        return LossParts(pair=pair, batch=pair.new_zeros(()), feats=torch.cat([f1, f2]).detach())
