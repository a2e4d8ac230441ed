"""W-MSE (Ermolov et al. 2021): MSE between L2-normalised views after whitening the projections.

Per iteration (methods.md §2.3): a random permutation splits the batch into sub-batches of
`whitening_size` images; each view's projections are whitened inside each sub-batch (Cholesky:
W = L⁻¹ with Cov = L Lᵀ, unbiased covariance, optional shrinkage eps), then image i's loss is
2 − 2·cos(w1_i, w2_i) over every pair of views. Repeated `whitening_iters` times and averaged.
Split for the method contract: the whitening is a batch operation, but the loss after it is one
value per image, so everything is in `pair` and the batch term is 0.

`stop_gradient` (default true, solo-learn's `wmse_loss_func(simplified=True)`) detaches the second
view's whitened vector; the original W-MSE code does not detach (methods.md marks this [U]).

Under DDP: solo-learn whitens each GPU's local batch only (sub-batches never mix GPUs), so its
loss depends on the number of GPUs. We gather the projections from all ranks with gradients and
draw one permutation of the global batch, identical on every rank (a generator seeded by a step
counter, not the per-rank global RNG), so N ranks on N slices give exactly the loss and gradient
of one process on the whole batch; each rank returns the per-image losses of its own slice. The
sub-batch size keeps its meaning (`whitening_size` images per whitening, as solo-learn on one GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.core import distributed
from harness.core.method import LossParts, mlp


def whiten(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Whiten each sub-batch of x (S × w × d): (x − mean) @ L⁻ᵀ with (1−eps)·Cov + eps·I = L Lᵀ."""
    centred = x - x.mean(dim=1, keepdim=True)
    cov = centred.transpose(1, 2) @ centred / (x.shape[1] - 1)
    eye = torch.eye(x.shape[2], device=x.device, dtype=x.dtype)
    # cholesky_ex: linalg.cholesky reads its status back to the host to raise (a sync on a GPU every step).
    # A covariance that is not positive definite gives NaN here instead, which the trainer's check of a
    # finite loss at its next logging point raises as Diverged.
    chol, status = torch.linalg.cholesky_ex((1 - eps) * cov + eps * eye)
    chol = torch.where((status == 0).view(-1, 1, 1), chol, torch.nan)
    inverse = torch.linalg.solve_triangular(chol, eye.expand_as(cov), upper=False)  # L⁻¹
    return centred @ inverse.transpose(1, 2)


def wmse_pairs(views: list[torch.Tensor], perms: torch.Tensor, whitening_size: int, eps: float = 0.0,
               stop_gradient: bool = True) -> torch.Tensor:
    """Per-image W-MSE of this rank's projections (one n × d tensor per view).

    `perms` (iterations × M) holds one permutation of the global batch of M images per whitening
    iteration; it must be the same on every rank.
    """
    n = views[0].shape[0]
    gathered = [distributed.gather(z) for z in views]  # M × d each, rank order
    m, d = gathered[0].shape
    if m % whitening_size:
        raise ValueError(f"method.whitening_size={whitening_size} must divide the global batch size {m}")
    mine = slice(distributed.rank() * n, (distributed.rank() + 1) * n)
    total = views[0].new_zeros(n)
    count = 0
    for perm in perms:
        inverse = torch.argsort(perm)
        white = [whiten(z[perm].view(m // whitening_size, whitening_size, d), eps).view(m, d)[inverse]
                 for z in gathered]
        for i in range(len(white)):
            for j in range(i + 1, len(white)):
                target = white[j][mine].detach() if stop_gradient else white[j][mine]
                total = total + 2 - 2 * F.cosine_similarity(white[i][mine], target, dim=1)
                count += 1
    return total / count


class WMSE(nn.Module):
    """Projector feat → hidden (BN, ReLU) → out, whitening sub-batches of `whitening_size` images."""

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 1024, proj_output_dim: int = 64,
                 whitening_size: int = 128, whitening_iters: int = 1, whitening_eps: float = 0.0,
                 stop_gradient: bool = True, seed: int = 0):
        super().__init__()
        if whitening_size <= proj_output_dim:
            raise ValueError(f"method.whitening_size={whitening_size} must exceed method.proj_output_dim="
                             f"{proj_output_dim}: a smaller sub-batch has a singular covariance")
        self.backbone = backbone
        self.projector = mlp([backbone.feat_dim, proj_hidden_dim, proj_output_dim])
        self.whitening_size, self.whitening_iters = whitening_size, whitening_iters
        self.whitening_eps, self.stop_gradient, self.seed = whitening_eps, stop_gradient, seed
        # Steps taken: seeds the permutations, so every rank draws the same ones and a resumed run
        # repeats them. A Python int (no device sync per step), checkpointed as the module's extra state.
        self.steps = 0
        # The permutations' generator, on the projections' device (moved there at the first step).
        self._generator = torch.Generator()

    def get_extra_state(self) -> dict:
        return {"steps": self.steps}

    def set_extra_state(self, state: dict) -> None:
        self.steps = int(state["steps"])

    @staticmethod
    def check_config(cfg) -> list:
        """Config problems found before anything runs (called by harness.jobs.config.validate)."""
        from harness.errors import ConfigError

        size, batch = cfg.method.get("whitening_size"), cfg.trainer.get("batch_size")
        if isinstance(size, int) and isinstance(batch, int) and size > 0 and batch % size:
            return [ConfigError("method.whitening_size", size, f"a divisor of trainer.batch_size={batch}")]
        return []

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(x)), dim=1)

    def forward(self, views: list[torch.Tensor]) -> LossParts:
        feats = [self.backbone(v) for v in views]
        zs = [self.projector(f) for f in feats]
        m = zs[0].shape[0] * distributed.world_size()
        device = zs[0].device
        if self._generator.device != device:  # made once, not per step
            self._generator = torch.Generator(device=device)
        # Drawn on the device (no host-to-device copy per step), reseeded from the step count each step.
        self._generator.manual_seed(self.seed * 1_000_003 + self.steps)
        perms = torch.stack([torch.randperm(m, generator=self._generator, device=device)
                             for _ in range(self.whitening_iters)])
        if self.training:
            self.steps += 1
        with torch.autocast(device.type, enabled=False):  # Cholesky and products in float32
            pair = wmse_pairs([z.float() for z in zs], perms, self.whitening_size, self.whitening_eps,
                              self.stop_gradient)
        return LossParts(pair=pair, batch=pair.new_zeros(()), feats=torch.cat(feats).detach())
