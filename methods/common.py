"""Pieces the momentum and queue methods share (MoCo v2+, SCE, BYOL, NNCLR, All4One), written once.

- a momentum (EMA) copy of a module and its update, with a constant or cosine schedule;
- a FIFO queue (memory bank / NNCLR support set) filled with the keys of EVERY rank in rank order,
  so it is identical on all ranks and equal to the queue one process would build on the whole batch
  (solo-learn's NNCLR kept a per-GPU support set; ours does not);
- nearest-neighbour lookup in that queue;
- the two InfoNCE forms these methods use, per anchor: a query against its key and the queue
  (MoCo), and a support-set neighbour against the predictions of the global batch (NNCLR), the
  latter with negatives gathered from all ranks.
"""

from __future__ import annotations

import copy
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from harness.core import distributed
from harness.core.ema import ema_update

SCHEDULES = ("constant", "cosine")


def full_precision(loss_fn):
    """Run a loss in float32 with autocast off: logits at τ = 0.05 lose too much in bfloat16."""

    @functools.wraps(loss_fn)
    def wrapper(*args, **kwargs):
        args = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return loss_fn(*args, **kwargs)

    return wrapper


def momentum_tau(progress: float, base: float, final: float, schedule: str) -> float:
    """The EMA coefficient at `progress` (fraction of training done, 0..1).

    `cosine` rises from `base` at 0 to `final` at 1 as ``final − (final − base)·(cos(π·progress) + 1)/2``
    (solo-learn's and BYOL's rule); `constant` stays at `base`.
    """
    if schedule == "constant":
        return base
    if schedule == "cosine":
        progress = min(max(progress, 0.0), 1.0)
        return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2
    raise ValueError(f"momentum schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of `module` that only ever moves by EMA updates."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def update_momentum_encoder(method: nn.Module, progress: float) -> None:
    """EMA of the method's backbone + projector into its `momentum_encoder`, at its `momentum` schedule."""
    ema_update(nn.ModuleList([method.backbone, method.projector]), method.momentum_encoder,
               momentum_tau(progress, *method.momentum))


class Queue(nn.Module):
    """A FIFO of L2-normalised keys; `push` adds the keys of every rank, in rank order.

    Starts as random unit vectors (as solo-learn and MoCo do) drawn from a fixed seed, so every rank
    starts from the same queue without communicating. The keys and the write pointer are buffers:
    they are saved in checkpoints.
    """

    def __init__(self, size: int, dim: int, seed: int = 0):
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=g), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.staged: torch.Tensor | None = None

    def stage(self, keys: torch.Tensor) -> None:
        """Keep this step's keys until the optimizer has stepped: the loss must see the old queue."""
        self.staged = keys.detach()

    def push_staged(self) -> None:
        """Enqueue the staged keys, if any (from the method's after_step hook; all ranks call it)."""
        if self.staged is not None:
            self.push(self.staged)
            self.staged = None

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Enqueue this rank's `keys` together with every other rank's (all ranks must call it)."""
        keys = distributed.gather(keys.detach(), grad=False).to(self.keys.dtype)
        size = len(self.keys)
        if len(keys) >= size:  # a queue smaller than the global batch keeps the newest keys
            self.keys.copy_(keys[-size:])
            self.ptr.zero_()
            return
        # Index arithmetic on the device: no host sync per step.
        index = (self.ptr + torch.arange(len(keys), device=keys.device)) % size
        self.keys.index_copy_(0, index, keys)
        self.ptr.copy_((self.ptr + len(keys)) % size)

    @torch.no_grad()
    def neighbours(self, z: torch.Tensor, k: int = 1) -> torch.Tensor:
        """The `k` queue entries with the largest dot product with each row of `z`: (n, k, d), nearest first."""
        # In float32 with autocast off: in bf16 near-ties among the queue's keys pick other neighbours.
        with torch.autocast(z.device.type, enabled=False):
            index = (z.to(self.keys.dtype) @ self.keys.T).topk(k, dim=1).indices
        return self.keys[index]


def keep_queues_out_of_ddp_broadcast(method: nn.Module) -> None:
    """DDP re-broadcasts every buffer from rank 0 before each forward. Queues are already identical on
    all ranks (filled with gathered keys), so broadcasting them (64 MB for NNCLR's 65,536×256) is pure
    waste: mark them as buffers DDP leaves alone. Call at the end of a method's __init__."""
    queues = [prefix for prefix, m in method.named_modules() if isinstance(m, Queue)]
    method._ddp_params_and_buffers_to_ignore = [f"{prefix}.{buf}" for prefix in queues for buf in ("keys", "ptr")]


@full_precision
def infonce_queue_pairs(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE per anchor: −log softmax of q_i·k_i among [q_i·k_i, q_i·queue_j for all j].

    q, k: (n, d) L2-normalised queries and their keys (same image); queue: (K, d) past keys.
    Purely local apart from the queue, so N ranks give the same per-anchor values as one process.
    """
    positive = (q * k).sum(dim=1, keepdim=True)
    logits = torch.cat([positive, q @ queue.T.to(q.dtype)], dim=1) / temperature
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


@full_precision
def prediction_infonce(anchors: torch.Tensor, targets: torch.Tensor, p: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """Per anchor row: InfoNCE picking out this rank's prediction ``p[targets[row]]`` among the
    predictions of the whole global batch (gathered from all ranks, with gradient). Both sides are
    L2-normalised here. anchors: (m, d); targets: (m,) positions in this rank's batch; p: (n, d)."""
    candidates = distributed.gather(F.normalize(p.float(), dim=-1))
    logits = F.normalize(anchors.float(), dim=-1) @ candidates.T / temperature
    target = targets + distributed.rank() * len(p)
    return torch.logsumexp(logits, dim=1) - logits[torch.arange(len(anchors), device=p.device), target]


def nn_infonce_pairs(positives: torch.Tensor, p: torch.Tensor, temperature: float) -> torch.Tensor:
    """NNCLR's InfoNCE per anchor image, with the predictions of the whole global batch as candidates.

    positives: (n, d), or (n, P, d) when other positives stand beside the support-set neighbour (e.g. a
    synthetic positive): row i's positives each pick out p_i, and image i's loss is the mean over its
    P rows. p: this rank's (n, d) predictions.
    """
    if positives.dim() == 2:
        positives = positives.unsqueeze(1)
    n, num_pos, dim = positives.shape
    targets = torch.arange(n, device=p.device).repeat_interleave(num_pos)
    per_row = prediction_infonce(positives.reshape(n * num_pos, dim), targets, p, temperature)
    return per_row.view(n, num_pos).mean(dim=1)


def synthetic_positive_pairs(z_syn: torch.Tensor, selected: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor,
                             temperature: float) -> torch.Tensor:
    """CLSP's ``extra_positive`` term for NNCLR-style losses, per synthetic embedding.

    The synthetic embedding of image i stands beside both views' neighbours, so like them it picks
    out the other view's prediction: ½·[InfoNCE(z_syn → p2_i) + InfoNCE(z_syn → p1_i)], i = selected.
    """
    return (prediction_infonce(z_syn, selected, p2, temperature)
            + prediction_infonce(z_syn, selected, p1, temperature)) / 2


def forward_in_shuffled_groups(module: nn.Module, x: torch.Tensor, groups: int) -> torch.Tensor:
    """`module(x)` with the batch shuffled and split into `groups` parts for BatchNorm, then put back in order.

    MoCo's shuffle-BN, simulated on one device as SCE does on CIFAR: a key's BN statistics then come
    from other images than its query's, so the encoder cannot find the positive through the batch
    statistics. `groups` is capped so that every part keeps at least 2 images.
    """
    groups = max(1, min(groups, len(x) // 2))
    if groups == 1 or not module.training:
        return module(x)
    order = torch.randperm(len(x), device=x.device)
    out = torch.cat([module(part) for part in x[order].chunk(groups)])
    return out[torch.argsort(order)]
