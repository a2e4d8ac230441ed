"""Optimizers (SGD, LARS, Adam, AdamW), the learning-rate scaling rule and warm-up + cosine.

Scaling rule: ``lr = trainer.lr × global_batch / trainer.base_batch`` (linear, the default and
solo-learn's rule), ``× sqrt(global_batch / base_batch)`` (sqrt), or unscaled (none). The global
batch is ``trainer.batch_size`` whatever the number of processes, so a config means the same
experiment on one GPU or sixteen; the lr actually used is recorded with the run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step per tensor is scaled by a trust ratio ‖w‖ / ‖g + wd·w‖.

    Parameter groups with ``lars_exclude=True`` (biases and norm layers) take plain SGD steps
    without weight decay. ``clip_lr`` caps the trust ratio at 1 (solo-learn's setting).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.02,
                 clip_lr: bool = True, eps: float = 1e-8):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip_lr=clip_lr, eps=eps,
                        lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if not group["lars_exclude"]:
                    if group["weight_decay"]:
                        d_p = d_p.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.norm(p), torch.norm(d_p)
                    trust = group["eta"] * w_norm / (g_norm + group["eps"])
                    if group["clip_lr"]:
                        trust = torch.clamp(trust / group["lr"], max=1.0) if group["lr"] > 0 else trust
                    trust = torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
                    d_p = d_p.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.clone(d_p).detach()
                else:
                    buf.mul_(group["momentum"]).add_(d_p)
                p.add_(buf, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float, exclude_bias_and_norm: bool = True,
                 skip: frozenset[int] = frozenset()) -> list[dict]:
    """Weights with decay; biases and norm parameters without (and without LARS).

    A parameter carrying an ``lr_scale`` attribute (set by a method, e.g. All4One's transformer)
    goes in a group of its own whose lr is the scheduled lr times that factor. Parameters in
    `skip` (by id) are left out: their owner gives them groups of their own.
    """
    found: dict[tuple[bool, float], list] = {(False, 1.0): []}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in skip:
            continue
        plain = exclude_bias_and_norm and (p.ndim <= 1 or name.endswith(".bias"))
        found.setdefault((plain, float(getattr(p, "lr_scale", 1.0))), []).append(p)
    groups = []
    for (plain, scale), params in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1] != 1.0, kv[0][1])):
        if not params and (plain or scale != 1.0):
            continue
        group = {"params": params, "weight_decay": 0.0 if plain else weight_decay}
        if plain:
            group["lars_exclude"] = True
        if scale != 1.0:
            group["lr_scale"] = scale
        groups.append(group)
    return groups


def scaled_lr(base_lr: float, global_batch: int, base_batch: int, rule: str) -> float:
    if rule == "linear":
        return base_lr * global_batch / base_batch
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / base_batch)
    return base_lr


def build_optimizer(model: nn.Module, trainer_cfg, lr: float,
                    special: Sequence[tuple[nn.Module, dict]] = ()) -> torch.optim.Optimizer:
    """The configured optimizer over `model`'s parameters, biases and norm layers without decay.

    `special`: (sub-module, settings) pairs (from ``optim_groups()`` hooks) whose parameters get
    groups of their own; settings may give ``weight_decay`` and the keys the trainer reads when it
    sets each step's lr: ``lr_scale`` (times the scheduled lr) and ``static_lr`` (no schedule).
    """
    name = trainer_cfg.optimizer
    weight_decay, exclude = float(trainer_cfg.weight_decay), bool(trainer_cfg.get("exclude_bias_and_norm", True))
    owned = frozenset(id(p) for module, _ in special for p in module.parameters())
    groups = param_groups(model, weight_decay, exclude, skip=owned)
    for module, settings in special:
        for group in param_groups(module, float(settings.get("weight_decay", weight_decay)), exclude):
            if group["params"]:
                groups.append({**group, **{k: v for k, v in settings.items() if k != "weight_decay"}})
    if name == "lars":
        return LARS(groups, lr=lr, momentum=float(trainer_cfg.momentum), eta=float(trainer_cfg.get("lars_eta", 0.02)),
                    clip_lr=bool(trainer_cfg.get("lars_clip_lr", True)))
    for g in groups:
        g.pop("lars_exclude", None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(trainer_cfg.momentum), foreach=True)
    optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    return optimizer(groups, lr=lr, foreach=True)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, warmup_start: float = 0.0,
          final: float = 0.0) -> float:
    """Linear warm-up from `warmup_start` to `peak`, then cosine decay to `final`."""
    if step < warmup_steps:
        return warmup_start + (peak - warmup_start) * step / max(warmup_steps, 1)
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
