"""The one exponential moving average of a module's parameters: momentum encoders (BYOL, MoCo v2,
SCE, ...), the score network's and the DDPM's EMA copies all move through it."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(online: nn.Module, target: nn.Module, tau: float) -> None:
    """θ_target ← τ·θ_target + (1 − τ)·θ_online for every parameter (buffers such as BN statistics are
    the target's own, from its own forward passes, as in solo-learn and MoCo)."""
    target_params = list(target.parameters())
    online_params = [p.detach() for p in online.parameters()]
    if len(target_params) != len(online_params):
        raise ValueError(f"EMA of modules with {len(online_params)} and {len(target_params)} parameters")
    torch._foreach_lerp_(target_params, online_params, 1.0 - tau)
