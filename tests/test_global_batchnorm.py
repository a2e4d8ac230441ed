"""trainer.sync_bn: BatchNorm over the global batch, so splitting a batch over ranks changes nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.core.distributed import GlobalBatchNorm, global_batchnorm
from tests.dist_utils import run_ranks

BATCH = 16


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
                          nn.BatchNorm1d(5))
    with torch.no_grad():  # not the identity init, so the affine parameters matter
        for bn in (model[1], model[5]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, 8, 8, generator=g) * 2 + 0.5, torch.randn(BATCH, 5, generator=g)


def step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One training forward and backward of a per-image loss averaged over `x`; returns the output."""
    out = model(x)
    ((out - target).square().sum(1)).mean().backward()
    return out.detach()


def ranks_step(rank: int, world: int, sync: bool) -> dict:
    from tests.tiny_training import HostSyncCounter

    class Everywhere(HostSyncCounter):
        def in_step(self) -> bool:
            return True

    model = small_model()
    replaced = global_batchnorm(model) if sync else 0
    x, target = inputs()
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    probe = small_model()
    global_batchnorm(probe)
    counter = Everywhere()
    with counter.patched():  # a layer's forward and backward: nothing read back, nothing built from host values
        probe[:2](x[part]).square().mean().backward()
    ddp = nn.parallel.DistributedDataParallel(model)
    out = step(ddp, x[part], target[part])
    return {"out": out, "replaced": replaced, "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
            "buffers": {k: b.clone() for k, b in model.named_buffers()}, "host_calls": dict(counter.calls)}


def test_two_ranks_with_sync_bn_equal_one_process_on_the_whole_batch():
    reference = small_model()
    x, target = inputs()
    out = step(reference, x, target)
    # torch's SyncBatchNorm (what a CUDA job under NCCL uses) in one process on the whole batch: the same
    # outputs, gradients and statistics as the plain layers, hence as GlobalBatchNorm's two ranks below.
    # Its synchronised path needs CUDA and NCCL: test_syncbatchnorm_and_globalbatchnorm_agree_on_two_gpus.
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(small_model())
    torch.testing.assert_close(step(synced, x, target), out)
    for (name, p), q in zip(reference.named_parameters(), synced.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    for (name, b), c in zip(reference.named_buffers(), synced.buffers()):
        torch.testing.assert_close(c, b, msg=name)
    ranks = run_ranks(ranks_step, 2, True)
    assert [r["replaced"] for r in ranks] == [2, 2]
    assert [r["host_calls"] for r in ranks] == [{}, {}]
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out, atol=1e-5, rtol=1e-4)
    for name, p in reference.named_parameters():  # DDP's average of the ranks' gradients
        torch.testing.assert_close(ranks[0]["grads"][name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    for name, b in reference.named_buffers():  # running statistics of the global batch, on every rank
        for r in ranks:
            torch.testing.assert_close(r["buffers"][name], b, atol=1e-5, rtol=1e-4, msg=name)
    # Without it each rank normalises by its own half: different outputs, the reason the option exists.
    per_rank = run_ranks(ranks_step, 2, False)
    assert (torch.cat([r["out"] for r in per_rank]) - out).abs().max() > 1e-2


def test_conversion_keeps_parameters_and_one_rank_is_plain_batchnorm():
    model = small_model()
    weight, running_mean = model[1].weight, model[1].running_mean
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the conversion, as a resumed job may
    assert global_batchnorm(model) == 2 and global_batchnorm(model) == 0
    assert isinstance(model[1], GlobalBatchNorm) and model[1].weight is weight
    assert model[1].running_mean is running_mean
    assert optimizer.param_groups[0]["params"][2] is model[1].weight
    x, target = inputs()
    plain = small_model()
    torch.testing.assert_close(step(model, x, target), step(plain, x, target))
    model.eval()
    plain.eval()
    torch.testing.assert_close(model(x), plain(x))


def gpu_ranks_step(rank: int, world: int, kind: str) -> dict:
    torch.cuda.set_device(rank)
    model = small_model()
    if kind == "sync":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        global_batchnorm(model)
    model.cuda()
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[rank])
    x, target = inputs()
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    out = step(ddp, x[part].cuda(), target[part].cuda())
    return {"out": out.cpu(), "grads": {k: p.grad.cpu() for k, p in model.named_parameters()},
            "buffers": {k: b.cpu() for k, b in model.named_buffers()}}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm's synchronised path needs two CUDA "
                    "devices under NCCL (it refuses CPU tensors, and NCCL refuses two ranks on one GPU)")
def test_syncbatchnorm_and_globalbatchnorm_agree_on_two_gpus():
    from tests.dist_utils import run_ranks_nccl

    sync, ours = run_ranks_nccl(gpu_ranks_step, 2, "sync"), run_ranks_nccl(gpu_ranks_step, 2, "global")
    for a, b in zip(sync, ours):
        torch.testing.assert_close(a["out"], b["out"], atol=1e-5, rtol=1e-4)
        for key in ("grads", "buffers"):
            for name in a[key]:
                torch.testing.assert_close(a[key][name], b[key][name], atol=1e-5, rtol=1e-4, msg=name)
