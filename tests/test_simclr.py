import math

import torch
import torch.nn.functional as F

from methods.simclr import nt_xent_pairs
from tests.dist_utils import run_ranks


def slow_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """methods.md §2.1 written out with loops: mean over all 2N views of -log softmax(positive)."""
    z = torch.cat([z1, z2]).double()
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[j]) / tau) for j in range(2 * n) if j != i)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / tau) / denom)
    return total / (2 * n)


def _pairs(n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=1), F.normalize(torch.randn(n, d, generator=g), dim=1))


def test_nt_xent_matches_the_formula():
    z1, z2 = _pairs()
    for tau in (0.1, 0.2, 0.5):
        pair = nt_xent_pairs(z1, z2, tau)
        assert pair.shape == (12,)
        assert abs(pair.mean().item() - slow_nt_xent(z1, z2, tau)) < 1e-5


def test_nt_xent_is_invariant_to_permuting_the_batch():
    z1, z2 = _pairs()
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    a = nt_xent_pairs(z1, z2, 0.2)
    b = nt_xent_pairs(z1[perm], z2[perm], 0.2)
    torch.testing.assert_close(a[perm], b, atol=1e-6, rtol=0)


def _half_loss(rank, world, z1, z2):
    n = len(z1) // world
    part = slice(rank * n, (rank + 1) * n)
    a, b = z1[part].clone().requires_grad_(), z2[part].clone().requires_grad_()
    loss = nt_xent_pairs(a, b, 0.2).mean()
    loss.backward()
    return loss.item(), a.grad, b.grad


def test_two_gloo_processes_on_halves_equal_one_process_on_the_whole_batch():
    z1, z2 = _pairs(16, 8, seed=1)
    results = run_ranks(_half_loss, 2, z1, z2)
    whole = nt_xent_pairs(z1, z2, 0.2).mean().item()
    assert abs(sum(r[0] for r in results) / 2 - whole) < 1e-5
    # Gradients too: the mean of the ranks' losses has the whole batch's gradient (DDP averages).
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    nt_xent_pairs(a, b, 0.2).mean().backward()
    torch.testing.assert_close(torch.cat([results[0][1], results[1][1]]) / 2, a.grad, atol=1e-6, rtol=1e-4)
