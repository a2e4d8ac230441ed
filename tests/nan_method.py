"""A SimCLR whose loss is NaN on rank 1 only, at one training step: the real fault of a one-rank divergence.

Selected with `method._target_=tests.nan_method.NanOnRank1` (tests/ is importable from the repo root).
"""

from __future__ import annotations

from harness.core import distributed
from harness.core.method import LossParts
from methods.simclr import SimCLR


class NanOnRank1(SimCLR):
    def __init__(self, backbone, nan_at_step: int = 0, **kwargs):
        super().__init__(backbone, **kwargs)
        self.nan_at_step = nan_at_step
        self.steps = 0

    def forward(self, views) -> LossParts:
        parts = super().forward(views)
        if self.training:
            if distributed.rank() == 1 and self.steps == self.nan_at_step:
                parts.pair = parts.pair * float("nan")
            self.steps += 1
        return parts
