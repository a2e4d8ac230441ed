"""Optimizers (SGD, LARS, Adam, AdamW: torch.optim's steps, without its import of torch._dynamo), the
learning-rate scaling rule and warm-up + cosine.

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


class Optimizer:
    """What the training loops need of an optimizer: `param_groups` (whose `lr` they set every step),
    per-parameter `state`, `zero_grad`, `step`, and a state dict in torch.optim's layout, so that a
    checkpoint written by torch.optim's SGD, Adam or AdamW resumes here and the other way round.

    Not torch.optim.Optimizer: its methods import torch._dynamo on first use (for torch.compile), about
    0.9 s of CPU in every job, rank and Slurm task although nothing here compiles. The steps below
    are torch's own multi-tensor (foreach) steps, op for op; tests/test_optim.py checks that
    parameters and state equal torch.optim's after several steps.
    """

    def __init__(self, params, defaults: dict):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.defaults = defaults
        self.param_groups: list[dict] = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.state: dict[torch.Tensor, dict] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().zero_()

    def state_dict(self) -> dict:
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            ids = [index.setdefault(id(p), len(index)) for p in group["params"]]
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        state = {index[id(p)]: dict(s) for p, s in self.state.items() if id(p) in index}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the saved optimizer state has other parameter groups than this model's")
        self.state = {}
        for group, old in zip(self.param_groups, saved):
            for p, i in zip(group["params"], old["params"]):
                if i in state_dict["state"]:
                    self.state[p] = {k: _placed(k, v, p) for k, v in state_dict["state"][i].items()}
            group.update({k: v for k, v in old.items() if k != "params"})

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every group over its parameters that have a gradient (a frozen or unused one is left
        alone); returns the closure's loss, as torch.optim does."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params, [p.grad for p in params])
        return loss

    def _step_group(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        raise NotImplementedError


def _placed(key: str, value, param: torch.Tensor):
    """A loaded state entry: moments on their parameter's device and dtype; a step count as a number
    (torch.optim keeps it in a CPU tensor; reading that in every step would be a host sync's worth)."""
    if key == "step":
        return float(value)
    if torch.is_tensor(value) and value.is_floating_point():
        return value.to(param.device, param.dtype)
    return value


class SGD(Optimizer):
    """torch.optim.SGD (momentum, dampening, Nesterov, L2 weight decay), as its foreach step computes it."""

    def __init__(self, params, lr: float, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov))

    def _step_group(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        momentum, dampening = group["momentum"], group["dampening"]
        if group["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        if momentum:
            bufs = [self.state.setdefault(p, {}).get("momentum_buffer") for p in params]
            if all(b is not None for b in bufs):
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads, alpha=1 - dampening)
            else:
                for i, (p, g) in enumerate(zip(params, grads)):
                    if bufs[i] is None:  # the first step: the buffer starts as the gradient itself
                        bufs[i] = self.state[p]["momentum_buffer"] = g.detach().clone()
                    else:
                        bufs[i].mul_(momentum).add_(g, alpha=1 - dampening)
            grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
        torch._foreach_add_(params, grads, alpha=-group["lr"])


class Adam(Optimizer):
    """torch.optim.Adam (L2 weight decay added to the gradient) or, with `decoupled=True`,
    torch.optim.AdamW (weights shrunk by lr × weight_decay), as their foreach step computes them."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled: bool = False):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.decoupled = decoupled

    def _step_group(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        (beta1, beta2), lr, weight_decay = group["betas"], group["lr"], group["weight_decay"]
        for p in params:
            if p not in self.state or "step" not in self.state[p]:
                self.state[p] = {"step": 0.0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        states = [self.state[p] for p in params]
        for state in states:
            state["step"] += 1
        counts = [state["step"] for state in states]
        exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        if weight_decay:
            if self.decoupled:
                torch._foreach_mul_(params, 1 - lr * weight_decay)
            else:
                grads = torch._foreach_add(grads, params, alpha=weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        step_sizes = [-(lr / (1 - beta1 ** n)) for n in counts]
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, [(1 - beta2 ** n) ** 0.5 for n in counts])
        torch._foreach_add_(denominators, group["eps"])
        torch._foreach_addcdiv_(params, exp_avgs, denominators, step_sizes)


def AdamW(params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,  # noqa: N802
          weight_decay: float = 1e-2) -> Adam:
    """torch.optim.AdamW, with its default weight decay."""
    return Adam(params, lr, betas, eps, weight_decay, decoupled=True)


class LARS(Optimizer):
    """SGD with momentum whose step per tensor is scaled by a trust ratio ‖w‖ / ‖g + wd·w‖.

    Parameter groups with ``lars_exclude=True`` (biases and norm layers) take plain SGD steps
    without weight decay. ``clip_lr`` caps the trust ratio at 1 (solo-learn's setting).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.02,
                 clip_lr: bool = True, eps: float = 1e-8):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip_lr=clip_lr, eps=eps,
                        lars_exclude=False)
        super().__init__(params, defaults)

    def _step_group(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        for p, d_p in zip(params, grads):
            if not group["lars_exclude"]:
                if group["weight_decay"]:
                    d_p = d_p.add(p, alpha=group["weight_decay"])
                w_norm, g_norm = torch.norm(p), torch.norm(d_p)
                trust = group["eta"] * w_norm / (g_norm + group["eps"])
                if group["clip_lr"]:
                    trust = torch.clamp(trust / group["lr"], max=1.0) if group["lr"] > 0 else trust
                trust = torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
                d_p = d_p.mul(trust)
            buf = self.state.setdefault(p, {}).get("momentum_buffer")
            if buf is None:
                buf = self.state[p]["momentum_buffer"] = torch.clone(d_p).detach()
            else:
                buf.mul_(group["momentum"]).add_(d_p)
            p.add_(buf, alpha=-group["lr"])


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
                    special: Sequence[tuple[nn.Module, dict]] = ()) -> Optimizer:
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
        return SGD(groups, lr=lr, momentum=float(trainer_cfg.momentum))
    return Adam(groups, lr=lr, decoupled=name == "adamw")


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, warmup_start: float = 0.0,
          final: float = 0.0) -> float:
    """Linear warm-up from `warmup_start` to `peak`, then cosine decay to `final`."""
    if step < warmup_steps:
        return warmup_start + (peak - warmup_start) * step / max(warmup_steps, 1)
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
