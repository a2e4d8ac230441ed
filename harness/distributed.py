"""Process-group setup for 1..N processes, from torchrun's or submitit's environment.

The same training code runs as a single process, under torchrun, or as the tasks of a Slurm job
launched by submitit. Gloo on CPU, NCCL on GPU. Collectives used by methods (gathering
embeddings with or without gradients) are here so that each is written once.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    host: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _resolvable(name: str) -> bool:
    try:
        socket.gethostbyname(name)
        return True
    except OSError:
        return False


def _port_from_job(job_id: str) -> int:
    # A port derived from the job id, so the ranks of one job agree without talking and two
    # jobs sharing a node rarely collide.
    digits = "".join(ch for ch in job_id if ch.isdigit()) or "0"
    return 20000 + int(digits[-6:]) % 20000


def _export_slurm_env() -> None:
    """Set RANK/WORLD_SIZE/MASTER_* from a Slurm task's environment (as submitit gives it)."""
    import submitit

    env = submitit.helpers.TorchDistributedEnvironment()
    env.export(overwrite=True)
    job_id = os.environ.get("SLURM_ARRAY_JOB_ID", "") + os.environ.get("SLURM_ARRAY_TASK_ID", "")
    os.environ["MASTER_PORT"] = str(_port_from_job(job_id or os.environ.get("SLURM_JOB_ID", "0")))
    if not _resolvable(os.environ["MASTER_ADDR"]):
        # Virtual nodes of a one-machine test cluster have names that do not resolve.
        os.environ["MASTER_ADDR"] = "127.0.0.1"


def setup(device: str = "auto") -> DistInfo:
    """Initialise torch.distributed if this process is one of several; return who we are."""
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        _export_slurm_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    info = DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev, host=host)
    if world > 1 and not dist.is_initialized():
        info.backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(info.backend, rank=rank, world_size=world)
    elif dist.is_initialized():
        info.backend = dist.get_backend()
    return info


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def gather(x: torch.Tensor, grad: bool = True) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0, in rank order.

    With `grad`, gradients flow back to each rank's own part (for negatives gathered across
    ranks); without, the result is a plain detached copy (for queues and statistics).
    """
    if world_size() == 1:
        return x
    if grad:
        return _GatherWithGrad.apply(x)
    return _all_gather(x.detach())


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    Each rank's loss uses every rank's embeddings, so the gradient of rank r's slice is the sum
    over ranks; DDP then averages parameter gradients, which gives the gradient of the mean
    loss over the global batch, the same as one process on the whole batch.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.n = x.shape[0]
        return _all_gather(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _summed(grad)[rank() * ctx.n:(rank() + 1) * ctx.n]


def _summed(x: torch.Tensor) -> torch.Tensor:
    """A copy of `x` summed over ranks (all_reduce works in place; the input stays as it was)."""
    x = x.detach().contiguous().clone()
    dist.all_reduce(x)
    return x


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks (no gradient): for logging and global statistics."""
    if world_size() == 1:
        return x
    return _summed(x) / world_size()


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(sum) whose backward sums every rank's gradient, as `_GatherWithGrad` does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _summed(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _summed(grad)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are the global batch's (every rank's slice), with gradients.

    torch's SyncBatchNorm does the same with fused CUDA kernels but refuses CPU tensors; this one is
    per-channel sums and one all-reduce per layer, on any device and backend, so the gloo tests run
    the very code a GPU job runs. In eval mode, or with one rank, it is plain BatchNorm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects N×C[×...] input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = xf.new_tensor([x.numel() / channels])
        total = _SumOverRanks.apply(torch.cat([xf.sum(dims), xf.square().sum(dims), count]))
        n = total[-1]
        mean = total[:channels] / n
        var = (total[channels:2 * channels] / n - mean.square()).clamp_min(0)  # fp32 sums: activations are O(1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def global_batchnorm(module: nn.Module) -> int:
    """Make every BatchNorm in `module` a GlobalBatchNorm, in place; returns how many were replaced.

    The new layers take over the old ones' parameter and buffer objects, so optimizers, EMA pairs
    and checkpoints that refer to them are unaffected.
    """
    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            for key in ("weight", "bias"):
                setattr(new, key, getattr(child, key))
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                new._buffers[key] = child._buffers.get(key)
            new.train(child.training)
            setattr(module, name, new)
            replaced += 1
        else:
            replaced += global_batchnorm(child)
    return replaced


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_hosts(host: str) -> list[str]:
    if world_size() == 1:
        return [host]
    hosts: list[str] = [""] * world_size()
    dist.all_gather_object(hosts, host)
    return hosts


def expected_world_size() -> int:
    """The number of processes `setup` will find, read from the environment before it runs (for
    run keys): torchrun's WORLD_SIZE, else SLURM_NTASKS (a Slurm step, e.g. a submitit job), else 1."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return max(int(os.environ.get("SLURM_NTASKS", "1")), 1)
