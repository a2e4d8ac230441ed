"""A seeded block on torch's global RNG that leaves the caller's RNG as it was.

A job's training draws from the global RNG (dropout, SCE's shuffle-BN permutation, a module's
initialisation), so anything that runs inside a job but is not part of its training (building an
artifact another job may build instead, an add-on's setup) must neither depend on nor move that
RNG: otherwise the same run key gives a different run depending on which job built the artifact.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run the block with the global RNG seeded with `seed`; afterwards it is back where it was.

    Covers the CPU generator and, when CUDA is in use in this process, the current device's (the
    only one a job draws from). CUDA is never initialised here just to save its state.
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed) % 2**63)
        yield
