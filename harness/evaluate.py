"""Evaluation on frozen backbone features: weighted k-NN (InstDisc/DINO style).

Every result is stored under an explicit protocol name such as ``knn:cosine:k=200:T=0.1``, so
numbers from different protocols are never compared by accident.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness import distributed


def knn_protocol(k: int, temperature: float) -> str:
    return f"knn:cosine:k={k}:T={temperature:g}"


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor],
                     batch_size: int = 512, device: torch.device | None = None) -> torch.Tensor:
    """L2-normalised backbone features of uint8 `images`, computed in eval mode.

    Under DDP each rank computes a slice and the slices are gathered, so every rank ends with all
    features at 1/N of the cost.
    """
    device = device or next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    world, rank = distributed.world_size(), distributed.rank()
    per_rank = -(-len(images) // world)
    mine = images[rank * per_rank:(rank + 1) * per_rank]
    feats = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for start in range(0, len(mine), batch_size):
        x = prepare(mine[start:start + batch_size].to(device, non_blocking=True))
        with autocast:
            f = backbone(x)
        feats.append(F.normalize(f.float(), dim=1))
    dim = backbone.feat_dim
    out = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)
    if world > 1:
        padded = torch.zeros(per_rank, dim, device=device)
        padded[: len(out)] = out
        out = distributed.gather(padded, grad=False)[: len(images)]
    backbone.train(was_training)
    return out


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, settings: Sequence[tuple[int, float]], num_classes: int,
                 chunk: int = 1024) -> dict[str, tuple[float, float]]:
    """Weighted k-NN accuracy for several (k, T): {protocol: (top1 %, top5 %)}.

    Neighbours are the top-k train features by cosine similarity; each votes for its class with
    weight exp(sim / T). One top-k search at the largest k serves all settings.
    """
    train_labels = train_labels.to(train_feats.device)
    test_labels = test_labels.to(train_feats.device)
    kmax = min(max(k for k, _ in settings), len(train_feats))
    hits = {(k, t): torch.zeros(2, device=train_feats.device) for k, t in settings}
    for start in range(0, len(test_feats), chunk):
        sims, idx = (test_feats[start:start + chunk] @ train_feats.T).topk(kmax, dim=1)
        neighbour_labels = train_labels[idx]
        truth = test_labels[start:start + chunk].view(-1, 1)
        for k, t in settings:
            k_eff = min(k, kmax)
            votes = torch.zeros(len(sims), num_classes, device=sims.device)
            votes.scatter_add_(1, neighbour_labels[:, :k_eff], torch.exp(sims[:, :k_eff] / t))
            ranked = votes.topk(min(5, num_classes), dim=1).indices
            hits[(k, t)][0] += (ranked[:, :1] == truth).any(dim=1).sum()
            hits[(k, t)][1] += (ranked == truth).any(dim=1).sum()
    n = max(len(test_feats), 1)
    return {knn_protocol(k, t): (100 * h[0].item() / n, 100 * h[1].item() / n) for (k, t), h in hits.items()}


def knn_evaluate(backbone: nn.Module, bank_x: torch.Tensor, bank_y: torch.Tensor,
                 queries: dict[str, tuple[torch.Tensor, torch.Tensor]], prepare: Callable,
                 settings: Sequence[tuple[int, float]], num_classes: int,
                 batch_size: int = 512) -> dict[str, dict[str, tuple[float, float]]]:
    """k-NN for every setting and every query split: {split: {protocol: (top1, top5)}}.

    The bank's features are extracted once and serve all splits.
    """
    bank = extract_features(backbone, bank_x, prepare, batch_size)
    return {
        split: knn_classify(bank, bank_y, extract_features(backbone, x, prepare, batch_size), y, settings, num_classes)
        for split, (x, y) in queries.items()
    }
