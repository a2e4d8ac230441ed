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
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[rank() * ctx.n:(rank() + 1) * ctx.n]


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks (no gradient): for logging and global statistics."""
    if world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_hosts(host: str) -> list[str]:
    if world_size() == 1:
        return [host]
    hosts: list[str] = [""] * world_size()
    dist.all_gather_object(hosts, host)
    return hosts
