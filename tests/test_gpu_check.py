"""benchmarks/gpu_check.py --dry-run: every part of the first GPU session's check runs on CPU (the same
trainer, methods, sync-mode switching and report, minus the CUDA calls), so it is ready when a GPU is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_every_part(tmp_path):
    out = tmp_path / "check.md"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for part in ("(a, c) every method", "(b) SimCLR", "(d) SimCLR", "(e) ImageNet-like input",
                 "(e) short SimCLR run on the encoded", "All methods ran without a host sync"):
        assert part in text, part
    for method in ("simclr", "simsiam", "wmse", "vicreg", "byol", "mocov2", "sce", "nnclr", "all4one"):
        assert f"\n{method} " in text, method
    assert text.count("compiled ") == 2 and text.count("bf16 ") >= 2  # both modes, both precisions
