"""NNCLR (Dwibedi et al. 2021), methods.md §2.5: the positive of a view is the nearest neighbour of the
other view's projection in a support set of past projections.

Per image: ½·[InfoNCE(nn1 → p2) + InfoNCE(nn2 → p1)] with nn_v the support-set neighbour of z_v and
the candidates the predictions of the whole global batch. Unlike solo-learn, which used only its own
GPU's predictions as negatives and a per-GPU support set, the predictions are gathered from every
rank and the support set is filled with every rank's z1 (methods/common.py): N ranks compute what one
process computes on the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.method import LossParts, mlp
from methods.common import Queue, keep_queues_out_of_ddp_broadcast, nn_infonce_pairs, synthetic_positive_pairs


def nnclr_pairs(pos1: torch.Tensor, pos2: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """Per image: the mean of the two directions. pos_v: (n, d) neighbours of view v, or (n, P, d) when
    extra positives (e.g. synthetic) stand beside them; each picks out the prediction of the other view."""
    return (nn_infonce_pairs(pos1, p2, temperature) + nn_infonce_pairs(pos2, p1, temperature)) / 2


class NNCLR(nn.Module):
    """Projector feat→2048→2048→256 (BN on every layer); predictor 256→4096 (BN, ReLU)→256."""

    # solo-learn, the reference, has no multi-crop form for NNCLR: its training_step takes the two large
    # crops' z and p only and forwards small crops through the backbone for nothing, and main_pretrain
    # allows more than two large crops only for W-MSE and MAE. Accepting the recipe would train a
    # two-view run at the cost of a multi-crop one, so it is refused.
    no_multi_crop = "solo-learn's NNCLR has none (its loss takes the two large crops only)"

    def __init__(self, backbone: nn.Module, temperature: float = 0.2, proj_hidden_dim: int = 2048,
                 proj_output_dim: int = 256, pred_hidden_dim: int = 4096, queue_size: int = 65536):
        super().__init__()
        self.backbone = backbone
        self.temperature = temperature
        self.projector = mlp([backbone.feat_dim, proj_hidden_dim, proj_hidden_dim, proj_output_dim], last_bn=True)
        self.predictor = mlp([proj_output_dim, pred_hidden_dim, proj_output_dim])
        self.queue = Queue(queue_size, proj_output_dim)  # the support set
        keep_queues_out_of_ddp_broadcast(self)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(x)), dim=1)

    def forward(self, views: list[torch.Tensor]) -> LossParts:
        f1, f2 = self.backbone(views[0]), self.backbone(views[1])
        z1, z2 = self.projector(f1), self.projector(f2)
        p1, p2 = self.predictor(z1).float(), self.predictor(z2).float()
        z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        nn1, nn2 = self.queue.neighbours(z1)[:, 0], self.queue.neighbours(z2)[:, 0]
        pair = nnclr_pairs(nn1, nn2, p1, p2, self.temperature)
        self.queue.stage(z1)
        self.predictions = (p1, p2)  # for synthetic_positive_loss in this step (CLSP)
        return LossParts(pair=pair, batch=pair.new_zeros(()), feats=f1.detach())

    def synthetic_positive_loss(self, z_syn: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """CLSP ``extra_positive``: synthetic embeddings stand beside the neighbours (methods/clsp/addon.py)."""
        return synthetic_positive_pairs(z_syn, selected, *self.predictions, self.temperature)

    def after_step(self, progress: float) -> None:
        self.queue.push_staged()
        self.predictions = None
