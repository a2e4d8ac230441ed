"""trainer.sync_bn: BatchNorm over the global batch, so splitting a batch over ranks changes nothing."""

from __future__ import annotations

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
    model = small_model()
    replaced = global_batchnorm(model) if sync else 0
    ddp = nn.parallel.DistributedDataParallel(model)
    x, target = inputs()
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    out = step(ddp, x[part], target[part])
    return {"out": out, "replaced": replaced, "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
            "buffers": {k: b.clone() for k, b in model.named_buffers()}}


def test_two_ranks_with_sync_bn_equal_one_process_on_the_whole_batch():
    reference = small_model()
    x, target = inputs()
    out = step(reference, x, target)
    ranks = run_ranks(ranks_step, 2, True)
    assert [r["replaced"] for r in ranks] == [2, 2]
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
