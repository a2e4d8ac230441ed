"""Process-group setup for 1..N processes, from torchrun's or Slurm's environment.

The same training code runs as a single process, under torchrun, or as the tasks of an srun step
(a Slurm job launched by submitit runs in one). From Slurm: the master is the step's first node,
at its name when that resolves, else at the NodeAddr Slurm has for it (never a guess); the port
comes from the numeric job id (`port_for_job`). A process that sees SLURM_NTASKS>1 but is not a
task of a step (a plain `python -m harness` in an `sbatch --ntasks=4` script) runs alone and says why.

Gloo on CPU, NCCL on GPU. Collectives used by methods (gathering
embeddings with or without gradients) are here so that each is written once.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
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


class SetupError(RuntimeError):
    """The process group cannot be set up from this environment (said in one line)."""


# Ports below Linux's ephemeral range (32768-60999), where the kernel does not hand out the local
# ports of outgoing connections. A prime span: tasks of one array get consecutive ports.
PORT_BASE, PORT_SPAN = 20000, 12763


def port_for_job(job_id: int, task_id: int = 0) -> int:
    """The master port of a Slurm job (array job id and task id for an array task).

    Every rank computes it alone. The tasks of one array get distinct ports (for arrays of fewer
    than PORT_SPAN tasks); the job id is multiplied by a constant before the task id is added, so
    job 4242 task 17 and job 42421 task 7 differ, and jobs with near ids are spread apart.
    """
    return PORT_BASE + (job_id * 7919 + task_id) % PORT_SPAN


def slurm_port() -> int:
    """`port_for_job` of this Slurm job (its array job and task ids when it is an array task)."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job:
        return port_for_job(int(array_job), int(os.environ.get("SLURM_ARRAY_TASK_ID", "0")))
    return port_for_job(int(os.environ["SLURM_JOB_ID"]))


def node_addr_from_scontrol(text: str) -> str | None:
    """The NodeAddr field of `scontrol show node NAME`'s output, or None."""
    match = re.search(r"\bNodeAddr=(\S+)", text)
    return match.group(1) if match and match.group(1) not in ("(null)", "") else None


def _resolves(name: str) -> bool:
    try:
        socket.getaddrinfo(name, None)
        return True
    except OSError:
        return False


def master_address(host: str) -> str:
    """An address the other ranks can reach `host` at: its name when it resolves, else Slurm's NodeAddr."""
    if _resolves(host):
        return host
    why = "scontrol is not on PATH"
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "node", host], capture_output=True, text=True, timeout=30)
            addr = node_addr_from_scontrol(out.stdout)
            if addr and _resolves(addr):
                return addr
            why = f"it has NodeAddr={addr}, which does not resolve either" if addr else \
                f"`scontrol show node {host}` gives no NodeAddr ({(out.stderr or out.stdout).strip()[:200]})"
        except (OSError, subprocess.SubprocessError) as e:
            why = f"`scontrol show node {host}` failed ({e})"
    raise SetupError(f"cannot find an address for the master node {host!r}: its name does not resolve and {why}")


def launched_by_slurm() -> bool:
    """Whether this process is one task of an srun step (a submitit job's tasks are one too).

    A batch script's own process has SLURM_NTASKS but no SLURM_STEP_ID: it is not one of the tasks.
    """
    return "SLURM_STEP_ID" in os.environ


def slurm_env() -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* for this task of an srun step, from what Slurm gives it."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    class StepEnvironment(SlurmJobEnvironment):
        # Submitit's reader of SLURM_* variables, for the step's nodes and tasks (the same as the
        # job's in a submitit job; an srun step may use part of an allocation).
        _env = {**SlurmJobEnvironment._env, "nodes": "SLURM_STEP_NODELIST", "num_tasks": "SLURM_STEP_NUM_TASKS",
                "num_nodes": "SLURM_STEP_NUM_NODES"}

    step = StepEnvironment()
    return {"RANK": str(step.global_rank), "WORLD_SIZE": str(step.num_tasks), "LOCAL_RANK": str(step.local_rank),
            "LOCAL_WORLD_SIZE": str(step.num_tasks // step.num_nodes),
            "MASTER_ADDR": master_address(step.hostnames[0]), "MASTER_PORT": str(slurm_port())}


def setup(device: str = "auto") -> DistInfo:
    """Initialise torch.distributed if this process is one of several; return who we are."""
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if "WORLD_SIZE" not in os.environ and slurm_tasks > 1:
        if launched_by_slurm():
            os.environ.update(slurm_env())
        else:
            # e.g. `python -m harness` in an `sbatch --ntasks=4` script: one process runs, no rank
            # would ever join the others, so do not wait for them.
            print(f"[harness] SLURM_NTASKS={slurm_tasks} but this process is not a task of an srun step "
                  "(no SLURM_STEP_ID): running as one process; use `srun python -m harness ...` to run "
                  f"{slurm_tasks} ranks", file=sys.stderr, flush=True)
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


def max_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of a tensor over ranks (no gradient): flags any rank raised."""
    if world_size() == 1:
        return x
    x = x.detach().contiguous().clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
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
        xf = x.float()  # x itself when it is float32 already; activations are O(1), so fp32 sums suffice
        # This rank's count joins the sums as one more column: ranks may hold different counts. new_full
        # is a fill kernel on the device, not a copy from the host (new_tensor([...]) would block).
        count = xf.new_full((1,), x.numel() // channels)
        total = _SumOverRanks.apply(torch.cat([xf.sum(dims), xf.square().sum(dims), count]))
        n = total[-1]
        mean = total[:channels] / n
        var = (total[channels:2 * channels] / n - mean.square()).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative average: weight 1/t, computed on the device
                    momentum = self.num_batches_tracked.reciprocal().to(self.running_mean.dtype)
                else:
                    momentum = self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        # y = x·scale + shift with per-channel fp32 scale and shift: backward keeps only x (in fp32) and
        # the per-channel vectors, not the centred and normalised copies of the input.
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        shape = [1, channels] + [1] * (x.dim() - 2)
        return torch.addcmul(shift.view(shape), xf, scale.view(shape)).to(x.dtype)


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
    run keys): torchrun's WORLD_SIZE, else SLURM_NTASKS inside an srun step (a submitit job is one),
    else 1, the same rule `setup` follows."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if launched_by_slurm():
        return max(int(os.environ.get("SLURM_NTASKS", "1")), 1)
    return 1
