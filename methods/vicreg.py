"""VICReg (Bardes, Ponce & LeCun 2022): invariance + variance + covariance on the projections.

Loss (methods.md §2.4, solo-learn's form):
    sim·MSE(z1, z2) + var·[mean_j ReLU(1 − sqrt(Var_j(z1) + 1e-4)) + same for z2]
                    + cov·[Σ_{j≠k} Cov(z1)_jk² / D + same for z2]
Split for the method contract: the invariance term is per-pair (image i's entry is
sim·mean_j (z1_ij − z2_ij)², whose batch mean is sim·MSE); variance and covariance exist only over
the batch and form the batch term.

Under DDP: the official VICReg code (FullGatherLayer) and solo-learn (`gather` with gradients in
`vicreg_loss_func`) both compute variance and covariance on embeddings gathered from all GPUs, and
the invariance term on the local batch. We do the same: `distributed.gather` with gradients, so N
ranks on N slices give exactly the loss (and, after DDP's gradient averaging, the gradient) of one
process on the whole batch. (The official code halves each std term; solo-learn and methods.md sum
them: we sum.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.core import distributed
from harness.core.method import LossParts, mlp


def invariance_pairs(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Per-image squared error, averaged over dimensions: its batch mean is F.mse_loss(z1, z2)."""
    return (z1 - z2).pow(2).mean(dim=1)


def variance_term(z: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """mean_j ReLU(1 − std_j), with the unbiased std over the batch and eps inside the sqrt."""
    return F.relu(1 - torch.sqrt(z.var(dim=0) + eps)).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """Sum of squared off-diagonal entries of the (unbiased) covariance matrix, divided by D."""
    n, d = z.shape
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (n - 1)
    off_diagonal = cov - torch.diag(torch.diagonal(cov))
    return off_diagonal.pow(2).sum() / d


def vicreg_parts(z1: torch.Tensor, z2: torch.Tensor, sim_loss_weight: float = 25.0, var_loss_weight: float = 25.0,
                 cov_loss_weight: float = 1.0) -> LossParts:
    """VICReg on this rank's projections z1, z2 (n × D); variance/covariance over the global batch."""
    pair = sim_loss_weight * invariance_pairs(z1, z2)
    all1, all2 = distributed.gather(z1), distributed.gather(z2)
    var = variance_term(all1) + variance_term(all2)
    cov = covariance_term(all1) + covariance_term(all2)
    batch = var_loss_weight * var + cov_loss_weight * cov
    return LossParts(pair=pair, batch=batch, logs={"vicreg_invariance": pair.detach().mean() / sim_loss_weight,
                                                    "vicreg_variance": var.detach(), "vicreg_covariance": cov.detach()})


class VICReg(nn.Module):
    """Projector 3 layers: feat → hidden (BN, ReLU) → hidden (BN, ReLU) → out, as solo-learn's CIFAR setup."""

    # solo-learn, the reference, has no multi-crop form for VICReg: its training_step takes the two large
    # crops' z only and forwards small crops through the backbone for nothing, and main_pretrain
    # allows more than two large crops only for W-MSE and MAE. Accepting the recipe would train a
    # two-view run at the cost of a multi-crop one, so it is refused.
    no_multi_crop = "solo-learn's VICReg has none (its loss takes the two large crops only)"

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 2048, proj_output_dim: int = 2048,
                 sim_loss_weight: float = 25.0, var_loss_weight: float = 25.0, cov_loss_weight: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp([backbone.feat_dim, proj_hidden_dim, proj_hidden_dim, proj_output_dim])
        self.weights = (sim_loss_weight, var_loss_weight, cov_loss_weight)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(x)), dim=1)

    def forward(self, views: list[torch.Tensor]) -> LossParts:
        f1, f2 = (self.backbone(v) for v in views[:2])
        z1, z2 = self.projector(f1), self.projector(f2)
        with torch.autocast(z1.device.type, enabled=False):  # covariance products in float32, not bf16
            parts = vicreg_parts(z1.float(), z2.float(), *self.weights)
        parts.feats = torch.cat([f1, f2]).detach()
        return parts
