"""The one progress printer: training, decoding, the probes, and the papers' own training and
generation all report through it, as ``[what] <text> | <rate> <unit>/s | ETA <duration>``.

It imports no torch, so any layer can use it.
"""

from __future__ import annotations

import sys
import time


def duration(seconds: float) -> str:
    """`seconds` as 1h05m or 3m07s."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """A line at most every `every` seconds (and whenever asked for a final one) saying how far a loop
    is, how fast it goes and when it ends.

    `done` counts units of work (steps, images, epochs) out of `total` (None: unknown, no ETA);
    `first` is where this process started (a resumed loop's rate counts only its own work);
    the rate is ``scale`` items per unit (images per step: the batch size), shown as `unit`/s.
    """

    def __init__(self, label: str, total: int | None, first: int = 0, every: float = 10.0, scale: float = 1.0,
                 unit: str = "img", enabled: bool = True):
        self.label, self.total, self.first, self.every = label, total, first, every
        self.scale, self.unit, self.enabled = scale, unit, enabled
        self.start = self.last = time.monotonic()

    def due(self, final: bool = False) -> bool:
        """Whether a line is due now (callers use it to skip work, e.g. reading a loss off the GPU)."""
        return self.enabled and (final or time.monotonic() - self.last >= self.every)

    def report(self, done: int, text: str) -> None:
        """Print the line for `done` units now."""
        now = time.monotonic()
        self.last = now
        elapsed, work = max(now - self.start, 1e-9), max(done - self.first, 0)
        rate = work * self.scale / elapsed
        parts = [f"{self.label} {text}" if text else self.label,
                 f"{rate:,.1f} {self.unit}/s" if rate < 10 else f"{rate:,.0f} {self.unit}/s"]
        if self.total is not None:
            parts.append(f"ETA {duration((self.total - done) * elapsed / max(work, 1))}")
        print(" | ".join(parts), file=sys.stderr, flush=True)

    def update(self, done: int, text: str = "", final: bool = False) -> None:
        """Print the line when one is due."""
        if self.due(final):
            self.report(done, text)
