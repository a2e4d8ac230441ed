"""One code path on CPU and GPU (issue 18): no host syncs in a step, bf16 autocast close to fp32 for
every method, trainer.compile equal to eager without recompiling, and the precision setting checked."""

from __future__ import annotations

import pytest
import torch

from harness.errors import ConfigError
from harness.jobs.config import compose, validate
from tests.tiny_training import METHODS, HostSyncCounter, flat_grad, tiny_training


def test_precision_is_checked_before_anything_runs():
    with pytest.raises(ConfigError, match=r"trainer.precision = 'fp16' is not allowed: expected one of auto, fp32, bf16"):
        validate(compose(["trainer.precision=fp16"]))


@pytest.mark.parametrize("method", list(METHODS))
def test_a_step_reads_nothing_back_and_builds_no_tensor_from_host_values(method, tmp_path):
    run = tiny_training(method, tmp_path, steps=2)
    counter = HostSyncCounter()
    with counter.patched():
        sums, *_ = run.train_epoch(0)
    assert dict(counter.calls) == {}, method
    assert torch.isfinite(sums["loss"])


def test_the_counter_sees_a_sync_in_the_step_and_not_at_the_logging_point(tmp_path):
    run = tiny_training("simclr", tmp_path, steps=2)
    original = run.method.forward

    def forward_with_syncs(views):
        views[0].sum().item()
        bool(views[0].sum() > 0)
        torch.tensor([1.0])
        return original(views)

    run.method.forward = forward_with_syncs
    counter = HostSyncCounter()
    with counter.patched():
        run.train_epoch(0)
    # Two steps; the logging point's tolist() at each (step % 20 == 0 and the last) is not counted.
    assert {k: v for k, v in counter.calls.items() if not k.startswith("aten.")} == {"item": 2, "__bool__": 2,
                                                                                     "tensor": 2}
    assert counter.calls["aten._local_scalar_dense.default"] >= 2  # the same reads, seen by the dispatch mode
