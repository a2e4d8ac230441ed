"""A `Training` of every method on a few random images with the ConvNet, for step-level tests on CPU,
and a counter of the calls that would make a GPU step wait for the host or copy host values to it."""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections import Counter
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  imported before any patching: a dispatch mode imports it lazily otherwise
from torch.utils._python_dispatch import TorchDispatchMode

from harness.core.data.datasets import ImageData
from harness.core.distributed import DistInfo
from harness.core.trainer import Training
from harness.jobs.config import build_addons, compose, instantiate

# Overrides that shrink each method to a 32-image batch: W-MSE's sub-batch must exceed its output
# dimension and divide the batch; a 65,536-key queue would hold only its random initial keys.
METHODS: dict[str, tuple[str, ...]] = {
    "simclr": (),
    "simsiam": (),
    "wmse": ("method.proj_output_dim=16", "method.whitening_size=32"),
    "vicreg": (),
    "mocov2": ("method.queue_size=64",),
    "sce": ("method.queue_size=64",),
    "byol": (),
    "nnclr": ("method.queue_size=64",),
    "all4one": ("method.queue_size=64",),
}
BATCH = 32


def tiny_training(method: str, tmp_path: Path, *extra: str, steps: int = 3) -> Training:
    """A Training of `method` on `steps` batches of random 32×32 images, seeded, ready to `train_epoch`."""
    g = torch.Generator().manual_seed(1)
    n = steps * BATCH
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 2
    data = ImageData(images, labels, images[:8], labels[:8], ["a", "b"], "test", train_index=torch.arange(n))
    cfg = compose([f"method={method}", *METHODS[method], "backbone=convnet", "backbone.width=8",
                   f"trainer.batch_size={BATCH}", "trainer.epochs=2", "trainer.warmup_epochs=0",
                   "trainer.device=cpu", "eval.every=0", *extra])
    torch.manual_seed(0)
    model = instantiate(cfg.method, instantiate(cfg.backbone))
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), host="h")
    run = Training(cfg, model, data, info, tmp_path / f"{method}.pt", lambda e, m: None, build_addons(cfg))
    run.resume()
    return run


def flat_grad(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def _step_lines() -> tuple[object, int, int]:
    """Training.train_epoch's code and the line span of its step body before the logging point."""
    lines, first = inspect.getsourcelines(Training.train_epoch)
    start = next(i for i, text in enumerate(lines) if text.lstrip().startswith("for step"))
    logging = next(i for i, text in enumerate(lines) if "# the only host syncs in the loop" in text)
    return Training.train_epoch.__code__, first + start, first + logging


# What on a GPU waits for the device (a value read back, a data-dependent shape) or copies Python
# values to it (a tensor built from them). On CPU none of these costs anything, so they are counted.
# `.item()` and float()/bool()/int() of a tensor do not reach a dispatch mode: they are patched too.
PATCHED = [(torch.Tensor, "item"), (torch.Tensor, "cpu"), (torch.Tensor, "tolist"), (torch.Tensor, "numpy"),
           (torch.Tensor, "__bool__"), (torch.Tensor, "__float__"), (torch.Tensor, "__int__"),
           (torch.Tensor, "new_tensor"), (torch, "tensor"), (torch, "as_tensor"), (torch, "Generator")]
SYNCING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive")
# Functions with a CPU-only branch that syncs on purpose, and why it does not run on a GPU.
CPU_ONLY_BRANCHES = {
    # Hue for just the chosen images on CPU (work is the limit there); on a GPU torch.where for all.
    "jittered",
    # Grayscale, blur and solarize for just the drawn images on CPU, for the same reason; photometric's
    # GPU branch computes all and keeps the drawn ones.
    "on_drawn_on_cpu",
}


def is_mask_indexing(func, args) -> bool:
    """`x[mask]` or `x[mask] = y`: on CPU the mask's nonzero runs inside the kernel, unseen by a dispatch
    mode, while on a GPU it waits for the device to say how many entries the mask selects (gpu_check
    found one in All4One's feature term that this counter had missed)."""
    if func.__name__.split(".")[0] not in ("index", "index_put", "index_put_", "_index_put_impl_"):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ())


class HostSyncCounter(TorchDispatchMode):
    """Counts, by name, the entry points above called from the body of a training step (not from its
    logging point, nor from anything before or after the loop), and the aten ops that sync."""

    def __init__(self):
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.code, self.start, self.end = _step_lines()

    def in_step(self) -> bool:
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_name in CPU_ONLY_BRANCHES:
                return False
            if frame.f_code is self.code:
                return self.start <= frame.f_lineno < self.end
            frame = frame.f_back
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in SYNCING_OPS and self.in_step():
            self.calls[f"aten.{func.__name__}"] += 1
        elif is_mask_indexing(func, args) and self.in_step():
            self.calls[f"aten.{func.__name__} with a boolean mask"] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def patched(self):
        originals = [(owner, name, getattr(owner, name)) for owner, name in PATCHED]

        def counting(name, original):
            def call(*args, **kwargs):
                if self.in_step():
                    self.calls[name] += 1
                return original(*args, **kwargs)
            return call

        try:
            for owner, name, original in originals:
                setattr(owner, name, counting(name, original))
            with self:
                yield self
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)
