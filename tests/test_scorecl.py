"""ScoreCL pair weighting: the weight math, the add-on on a real method, DDP, config checks."""

from __future__ import annotations

import math

import pytest
import torch

from harness.core.addons import Batch, combine
from harness.jobs.config import ConfigError, compose, instantiate, validate
from methods.scorecl.addon import normalize_differences, pair_weights, score_difference
from methods.scorecl.score_net import ScoreNet
from tests.dist_utils import run_ranks

D = torch.tensor([0.5, 1.0, 2.0, 4.0, 2.5])


def test_statistics():
    s1 = torch.zeros(2, 1, 2, 2)
    s2 = torch.zeros(2, 1, 2, 2)
    s2[0] = 1.0  # pair 0: every entry differs by 1 → ‖·‖/√D = 1; norms 0 vs 2 → |Δ|/√D = 1
    s1[1, 0, 0, 0], s2[1, 0, 0, 1] = 3.0, 3.0  # pair 1: same norm, different vectors
    torch.testing.assert_close(score_difference(s1, s2, "vector"), torch.tensor([1.0, math.sqrt(18) / 2]))
    torch.testing.assert_close(score_difference(s1, s2, "norm"), torch.tensor([1.0, 0.0]))


def test_each_normalization():
    torch.testing.assert_close(normalize_differences(D, D, "mean"), D / D.mean())
    mm = normalize_differences(D, D, "minmax")
    torch.testing.assert_close(mm, (D - 0.5) / 3.5)
    assert mm.min() == 0 and mm.max() == 1
    z = normalize_differences(D, D, "zsigmoid")
    torch.testing.assert_close(z, torch.sigmoid((D - D.mean()) / D.std(unbiased=False)))
    assert ((z > 0) & (z < 1)).all()
    # Degenerate batches (all differences equal) give the neutral value, never NaN.
    same = torch.full((4,), 2.0)
    assert torch.equal(normalize_differences(same, same, "minmax"), torch.zeros(4))
    assert torch.equal(normalize_differences(same, same, "zsigmoid"), torch.full((4,), 0.5))
    assert torch.equal(normalize_differences(torch.zeros(3), torch.zeros(3), "mean"), torch.zeros(3))


def test_weights_formula_clip_and_renormalize():
    torch.testing.assert_close(pair_weights(D, 0.5, "mean"), 1 + 0.5 * D / D.mean())
    w = pair_weights(D, 2.0, "minmax")
    assert w.min() == 1.0 and w.max() == 3.0
    clipped = pair_weights(D, 2.0, "minmax", clip=(1.2, 2.5))
    torch.testing.assert_close(clipped, w.clamp(1.2, 2.5))
    assert clipped.min() == 1.2 and clipped.max() == 2.5
    renormed = pair_weights(D, 1.0, "zsigmoid", renormalize=True)
    assert abs(renormed.mean().item() - 1.0) < 1e-6
    # Larger differences never get smaller weights.
    order = torch.argsort(D)
    for how in ("mean", "minmax", "zsigmoid"):
        assert (pair_weights(D, 1.0, how)[order].diff() >= 0).all()
    assert torch.equal(pair_weights(D, 0.0, "zsigmoid"), torch.ones(5))


def _addon(alpha: float, overrides=()):
    cfg = compose(["weighting=scorecl_tiny", "backbone=convnet", f"weighting.alpha={alpha}", *overrides])
    addon = instantiate(cfg.weighting, cfg)
    torch.manual_seed(0)
    addon._frozen = [ScoreNet.create(cfg.weighting.score_net, 32).eval().requires_grad_(False)]
    return cfg, addon


def _simclr_step(cfg, addon, seed=0):
    from harness.core.data.augment import ViewMaker

    torch.manual_seed(seed)
    method = instantiate(cfg.method, instantiate(cfg.backbone))
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    views = ViewMaker(cfg.augment, cfg.dataset.mean, cfg.dataset.std, torch.device("cpu"), seed=seed)(images)
    views = [v.requires_grad_() for v in views]
    parts = method(views)
    batch = Batch(images, torch.arange(16), views, parts, method, 0, 0.0)
    return method, views, parts, batch


def test_alpha_zero_reproduces_the_unweighted_loss_exactly():
    cfg, addon = _addon(0.0)
    _, _, parts, batch = _simclr_step(cfg, addon)
    weights, extra, _ = combine(batch, [addon])
    assert extra is None
    assert torch.equal(parts.total(weights), parts.total())
    cfg, addon = _addon(1.0)
    _, _, parts, batch = _simclr_step(cfg, addon)
    weights, _, _ = combine(batch, [addon])
    assert weights.std() > 0 and not torch.equal(parts.total(weights), parts.total())


def test_weights_carry_no_gradient():
    cfg, addon = _addon(1.0, ["weighting.mode=joint"])
    addon.net = addon._frozen.pop().requires_grad_(True)  # joint: the score net itself is being trained
    method, views, parts, batch = _simclr_step(cfg, addon)
    out = addon.step(batch)
    assert out.weights.grad_fn is None and not out.weights.requires_grad
    assert out.loss is not None and out.loss.requires_grad  # joint mode's DSM term does train the net
    # The weighted loss's gradient is that of constants times the per-pair loss: nothing flows
    # into the views (or the encoder) through the weights.
    grads = torch.autograd.grad(parts.total(out.weights), views)
    const = out.weights.clone()
    _, views2, parts2, _ = _simclr_step(cfg, addon)
    expected = torch.autograd.grad((const * parts2.pair).mean() + parts2.batch, views2)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e)


def _ranked_weights(rank, world, d, how):
    n = len(d) // world
    w = pair_weights(d[rank * n:(rank + 1) * n], 1.5, how, renormalize=how == "zsigmoid")
    cfg, addon = _addon(1.5)
    addon._accumulate(w, d[rank * n:(rank + 1) * n])
    return w, addon.epoch_metrics()


@pytest.mark.slow
def test_normalisation_uses_the_global_batch_in_ddp():
    d = torch.rand(12, generator=torch.Generator().manual_seed(0)) * 3
    for how in ("mean", "minmax", "zsigmoid"):
        results = run_ranks(_ranked_weights, 2, d, how)
        whole = pair_weights(d, 1.5, how, renormalize=how == "zsigmoid")
        torch.testing.assert_close(torch.cat([r[0] for r in results]), whole)
        metrics = results[0][1]
        assert results[1][1] == metrics  # every rank reports the same reduced numbers
        assert abs(metrics["weight_mean"] - whole.mean().item()) < 1e-5
        assert abs(metrics["weight_std"] - whole.std(unbiased=False).item()) < 1e-5
        assert metrics["weight_min"] == pytest.approx(whole.min().item())
        assert metrics["weight_max"] == pytest.approx(whole.max().item())
        assert metrics["score_diff_mean"] == pytest.approx(d.mean().item())


def test_config_fields_are_validated():
    with pytest.raises(ConfigError) as e:
        validate(compose(["weighting=scorecl", "weighting.alpha=-1", "weighting.statistic=cosine",
                          "weighting.normalize=softmax", "weighting.clip=[3,1]", "weighting.mode=later",
                          "weighting.score_net.num_sigmas=0"]))
    fields = {f for f, _, _ in e.value.problems}
    assert fields == {"weighting.alpha", "weighting.statistic", "weighting.normalize", "weighting.clip",
                      "weighting.mode", "weighting.score_net.num_sigmas"}
    assert "zsigmoid" in str(e.value) and "pretrained, joint" in str(e.value)
    with pytest.raises(ConfigError, match="weighting.sigma"):
        validate(compose(["weighting=scorecl", "weighting.sigma=2.0"]))
    validate(compose(["weighting=scorecl", "weighting.clip=[0.5,3]", "weighting.score_net.num_sigmas=1",
                      "weighting.score_net.sigma_min=0.05"]))


def test_sweep_preset_covers_the_papers_grid():
    from omegaconf import OmegaConf

    from tests.conftest import REPO

    params = OmegaConf.load(REPO / "sweeps" / "scorecl_all.yaml").hydra.sweeper.params
    grid = {k: str(v).split(",") for k, v in params.items()}
    assert grid == {"method": ["simclr", "simsiam", "wmse", "vicreg"], "weighting": ["none", "scorecl"],
                    "dataset": ["cifar10", "cifar100"], "seed": ["0", "1", "2"]}
    cfg = compose(["sweep=scorecl_all", "weighting=scorecl", "seed=2"])
    validate(cfg)
    assert cfg.trainer.epochs == 1000 and cfg.backbone.name == "resnet18" and cfg.weighting.mode == "pretrained"


def _joint_step_grads(rank, world):
    from harness.core import distributed
    from harness.core.data.augment import ViewMaker
    from harness.core.data.datasets import ImageData

    cfg, addon = _addon(1.0, ["weighting.mode=joint"])
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own images
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    data = ImageData(images, torch.zeros(8, dtype=torch.long), images, torch.zeros(8, dtype=torch.long), ["a"], "t")
    addon.setup(data, distributed.DistInfo(rank=rank, world_size=world))
    views = ViewMaker(cfg.augment, cfg.dataset.mean, cfg.dataset.std, torch.device("cpu"), seed=rank)(images)
    out = addon.step(Batch(images, torch.arange(8), views, None, None, 0, 0.0))
    out.loss.backward()
    return out.loss.item(), [p.grad.clone() for p in addon.net.parameters()]


@pytest.mark.slow
def test_joint_score_net_gradients_are_averaged_over_ranks():
    """The trainer's DDP wraps only the method; the joint score net must still stay in sync."""
    (loss0, grads0), (loss1, grads1) = run_ranks(_joint_step_grads, 2)
    assert loss0 != loss1  # different images on each rank...
    for a, b in zip(grads0, grads1, strict=True):
        torch.testing.assert_close(a, b)  # ...yet the same (averaged) gradient
