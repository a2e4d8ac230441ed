"""How the model runs on its device: precision, memory format, synchronised BatchNorm, compilation.

One code path on CPU and GPU: channels_last and (when asked for) bf16 autocast apply on every
device, so the CPU tests run the numeric path a GPU job runs. Only the BatchNorm synchronisation
differs by backend: torch's SyncBatchNorm (fused kernels) under NCCL on CUDA, our GlobalBatchNorm
(per-channel sums, one all-reduce per layer) under gloo, where SyncBatchNorm refuses to run.
"""

from __future__ import annotations

import torch
from torch import nn

from harness.core import distributed

PRECISIONS = ("auto", "fp32", "bf16")
# Parts of a method compiled by trainer.compile=true, when it has them: the modules every view goes
# through. The method's own loss code (Python counters, generators, gathers with custom autograd)
# and the DDP wrapper stay eager.
COMPILED_PARTS = ("backbone", "projector", "predictor")
# torch.compile's backend; the CPU test sets aot_eager (dynamo's graphs without inductor's C++ build,
# which takes minutes on a shared 2-core CI machine).
COMPILE_BACKEND = "inductor"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of trainer.precision on `device` (None: plain float32).

    `auto` is bf16 on CUDA (its tensor cores) and fp32 on CPU (where bf16 is slower on most chips).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The step's autocast context for trainer.precision (disabled for fp32)."""
    dtype = autocast_dtype(precision, device)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def sync_batchnorm(model: nn.Module, info: distributed.DistInfo) -> tuple[int, str]:
    """Make every BatchNorm in `model` use the global batch's statistics, in place.

    Returns (how many layers, which kind). Both kinds keep the old layers' parameter and buffer
    objects, so anything holding them (EMA pairs, an optimizer) is unaffected.
    """
    if info.device.type == "cuda" and info.backend == "nccl":
        before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if converted is not model:
            raise ValueError("trainer.sync_bn: the model itself is a BatchNorm layer; wrap it in a module")
        return before, "SyncBatchNorm"
    return distributed.global_batchnorm(model), "GlobalBatchNorm"


def compile_parts(method: nn.Module) -> list[str]:
    """Compile the method's backbone and heads in place (`nn.Module.compile`); returns their names.

    In place, so state_dict keys, checkpoints and EMA pairs stay as they were; the DDP wrapper
    and the method's forward stay eager (they hold Python state dynamo would recompile on).
    """
    names = []
    for name in COMPILED_PARTS:
        part = getattr(method, name, None)
        if isinstance(part, nn.Module) and any(True for _ in part.parameters()):
            part.compile(backend=COMPILE_BACKEND)
            names.append(name)
    return names
