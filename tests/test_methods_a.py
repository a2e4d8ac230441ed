"""SimSiam, W-MSE and VICReg: each loss against a slow, direct evaluation of methods.md's formula,
the identities that must hold, DDP equivalence for the batch statistics, and the YAML defaults."""

import math

import pytest
import torch

from harness.jobs.config import ConfigError, compose, instantiate, validate
from methods.simsiam import simsiam_pairs
from methods.vicreg import vicreg_parts
from methods.wmse import whiten, wmse_pairs
from tests.dist_utils import run_ranks


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _cos(a, b) -> float:
    a, b = a.detach(), b.detach()
    dot = sum(float(x) * float(y) for x, y in zip(a, b))
    return dot / math.sqrt(sum(float(x) ** 2 for x in a) * sum(float(y) ** 2 for y in b))


# ------------------------------------------------------------------------------------- SimSiam
def slow_simsiam(p1, p2, z1, z2) -> float:
    """methods.md §2.2: ½·(−cos(p1, z2)) + ½·(−cos(p2, z1)), averaged over images."""
    return sum(-0.5 * _cos(p1[i], z2[i]) - 0.5 * _cos(p2[i], z1[i]) for i in range(len(p1))) / len(p1)


def test_simsiam_matches_the_formula_and_stops_the_gradient_on_z():
    p1, p2, z1, z2 = (_randn(10, 6, seed=s).requires_grad_() for s in range(4))
    pair = simsiam_pairs(p1, p2, z1, z2)
    assert pair.shape == (10,)
    assert abs(pair.mean().item() - slow_simsiam(p1, p2, z1, z2)) < 1e-5
    pair.mean().backward()
    assert z1.grad is None and z2.grad is None  # the projections are targets only
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0


# -------------------------------------------------------------------------------------- VICReg
def slow_vicreg(z1, z2, sim=25.0, var=25.0, cov=1.0) -> tuple[float, float]:
    """methods.md §2.4 written out with loops: (invariance part, variance + covariance part)."""
    n, d = z1.shape
    mse = sum(float(z1[i, j] - z2[i, j]) ** 2 for i in range(n) for j in range(d)) / (n * d)

    def std_term(z):
        total = 0.0
        for j in range(d):
            mean = sum(float(z[i, j]) for i in range(n)) / n
            variance = sum((float(z[i, j]) - mean) ** 2 for i in range(n)) / (n - 1)
            total += max(0.0, 1 - math.sqrt(variance + 1e-4))
        return total / d

    def cov_term(z):
        means = [sum(float(z[i, j]) for i in range(n)) / n for j in range(d)]
        total = 0.0
        for a in range(d):
            for b in range(d):
                if a != b:
                    c = sum((float(z[i, a]) - means[a]) * (float(z[i, b]) - means[b]) for i in range(n)) / (n - 1)
                    total += c * c
        return total / d

    return sim * mse, var * (std_term(z1) + std_term(z2)) + cov * (cov_term(z1) + cov_term(z2))


def test_vicreg_matches_the_formula():
    # Small scale so some dimensions have std < 1 and the variance hinge is active.
    z1, z2 = _randn(12, 5, seed=1) * 0.7, _randn(12, 5, seed=2) * 1.3
    for weights in ((25.0, 25.0, 1.0), (1.0, 3.0, 0.5)):
        parts = vicreg_parts(z1, z2, *weights)
        invariance, batch = slow_vicreg(z1, z2, *weights)
        assert parts.pair.shape == (12,)
        assert abs(parts.pair.mean().item() - invariance) < 1e-5
        assert abs(parts.batch.item() - batch) < 1e-5
        assert parts.logs["vicreg_variance"] > 0  # the hinge term is exercised


def test_vicreg_invariance_is_zero_for_identical_embeddings():
    z = _randn(8, 4, seed=3)
    parts = vicreg_parts(z, z.clone())
    assert torch.equal(parts.pair, torch.zeros(8, dtype=z.dtype))
    assert parts.batch > 0  # variance/covariance still see the batch


# --------------------------------------------------------------------------------------- W-MSE
def slow_whiten(x):
    """Whitening of one sub-batch with naive code: loop covariance, W = inverse(Cholesky factor)."""
    w, d = x.shape
    mean = [sum(float(x[i, j]) for i in range(w)) / w for j in range(d)]
    cov = torch.zeros(d, d, dtype=torch.float64)
    for a in range(d):
        for b in range(d):
            cov[a, b] = sum((float(x[i, a]) - mean[a]) * (float(x[i, b]) - mean[b]) for i in range(w)) / (w - 1)
    inverse = torch.linalg.inv(torch.linalg.cholesky(cov))
    centred = x - torch.tensor(mean, dtype=torch.float64)
    return torch.stack([inverse @ centred[i] for i in range(w)])


def slow_wmse(z1, z2, perms, size) -> float:
    """methods.md §2.3: whiten each view within sub-batches of `size`, mean of 2 − 2·cos, per iteration."""
    total = 0.0
    for perm in perms:
        w1, w2 = torch.empty_like(z1), torch.empty_like(z2)
        for start in range(0, len(perm), size):
            idx = perm[start:start + size]
            w1[idx], w2[idx] = slow_whiten(z1[idx]), slow_whiten(z2[idx])
        total += sum(2 - 2 * _cos(w1[i], w2[i]) for i in range(len(z1))) / len(z1)
    return total / len(perms)


def test_whitening_gives_identity_covariance():
    x = _randn(3, 16, 4, seed=4) @ _randn(4, 4, seed=5)  # correlated dimensions
    white = whiten(x)
    for s in range(3):
        cov = white[s].T @ white[s] / 15
        torch.testing.assert_close(cov, torch.eye(4, dtype=x.dtype), atol=1e-8, rtol=0)
        torch.testing.assert_close(white[s], slow_whiten(x[s]), atol=1e-8, rtol=0)


def test_wmse_matches_the_formula():
    z1, z2 = _randn(16, 3, seed=6), _randn(16, 3, seed=7) + 0.5 * _randn(16, 3, seed=6)
    g = torch.Generator().manual_seed(0)
    for iterations in (1, 2):
        perms = torch.stack([torch.randperm(16, generator=g) for _ in range(iterations)])
        pair = wmse_pairs([z1, z2], perms, whitening_size=8)
        assert pair.shape == (16,)
        assert abs(pair.mean().item() - slow_wmse(z1, z2, perms, 8)) < 1e-5


def test_wmse_stop_gradient_detaches_the_second_view_only_when_asked():
    perms = torch.randperm(16, generator=torch.Generator().manual_seed(1)).view(1, -1)
    for stop, second_gets_grad in ((True, False), (False, True)):
        z1, z2 = _randn(16, 3, seed=8).requires_grad_(), _randn(16, 3, seed=9).requires_grad_()
        wmse_pairs([z1, z2], perms, 8, stop_gradient=stop).mean().backward()
        assert z1.grad.abs().sum() > 0
        assert (z2.grad is not None and z2.grad.abs().sum() > 0) == second_gets_grad


# ------------------------------------------------------------- DDP: halves on 2 ranks = whole batch
def _halves(rank, world, z1, z2, perms):
    """On each rank: its half of the batch through VICReg and W-MSE; (loss, grad z1, grad z2) for each."""
    n = len(z1) // world
    out = []
    for loss_fn in (lambda a, b: vicreg_parts(a, b).total(),
                    lambda a, b: wmse_pairs([a, b], perms, 8, stop_gradient=False).mean()):
        a, b = (z[rank * n:(rank + 1) * n].clone().requires_grad_() for z in (z1, z2))
        loss = loss_fn(a, b)
        loss.backward()
        out.append((loss.item(), a.grad, b.grad))
    return out


def test_batch_statistics_on_two_gloo_processes_on_halves_equal_one_process_on_the_whole_batch():
    """VICReg's variance/covariance and W-MSE's whitening use the global batch, gathered with gradients."""
    z1, z2 = _randn(32, 3, seed=12).float(), _randn(32, 3, seed=13).float() + 0.3 * _randn(32, 3, seed=12).float()
    perms = torch.randperm(32, generator=torch.Generator().manual_seed(2)).view(1, -1)
    results = run_ranks(_halves, 2, z1, z2, perms)
    losses = (lambda a, b: vicreg_parts(a, b).total(),
              lambda a, b: wmse_pairs([a, b], perms, 8, stop_gradient=False).mean())
    for which, loss_fn in enumerate(losses):
        ranks = [r[which] for r in results]
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        whole = loss_fn(a, b)
        whole.backward()
        # DDP averages the ranks' gradients: the mean of the ranks' losses must be the whole batch's loss.
        assert abs(sum(r[0] for r in ranks) / 2 - whole.item()) < 1e-5
        torch.testing.assert_close(torch.cat([r[1] for r in ranks]) / 2, a.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(torch.cat([r[2] for r in ranks]) / 2, b.grad, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------- modules and defaults
# methods.md §2.2–2.4 (solo-learn's CIFAR configs): a silent change to a YAML fails here.
DEFAULTS = {
    "simsiam": ({"proj_hidden_dim": 2048, "proj_output_dim": 2048, "pred_hidden_dim": 512,
                 "predictor_static_lr": True},
                {"optimizer": "sgd", "lr": 0.5, "weight_decay": 1e-5}, "symmetric_weak"),
    "wmse": ({"proj_hidden_dim": 1024, "proj_output_dim": 64, "whitening_size": 128, "whitening_iters": 1,
              "stop_gradient": True},
             {"optimizer": "adam", "lr": 2e-3, "weight_decay": 1e-6, "warmup_start_lr": 0.0, "classifier_lr": 3e-3},
             "wmse"),
    "vicreg": ({"proj_hidden_dim": 2048, "proj_output_dim": 2048, "sim_loss_weight": 25.0, "var_loss_weight": 25.0,
                "cov_loss_weight": 1.0},
               {"optimizer": "lars", "lr": 0.3, "weight_decay": 1e-4}, "vicreg"),
}
VIEWS = {  # crop scale, jitter (b, c, s, h), blur p, solarize p (per view)
    "symmetric_weak": [((0.08, 1.0), (0.4, 0.4, 0.4, 0.1), 0.5, 0.0)] * 2,
    "wmse": [((0.2, 1.0), (0.8, 0.8, 0.8, 0.2), 0.0, 0.0)] * 2,
    "vicreg": [((0.2, 1.0), (0.4, 0.4, 0.2, 0.1), 0.0, 0.1)] * 2,
}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_each_method_yaml_has_the_documented_defaults(name):
    method, trainer, augment = DEFAULTS[name]
    cfg = compose([f"method={name}"])
    assert cfg.method.name == name
    assert {k: cfg.method[k] for k in method} == method
    assert {k: cfg.trainer[k] for k in trainer} == trainer
    assert cfg.augment.name == augment
    for view, (scale, jitter, blur, solarize) in zip(cfg.augment.views, VIEWS[augment]):
        p = cfg.augment.pipelines[view]
        assert tuple(p.crop.scale) == scale and p.jitter.p == 0.8 and p.grayscale == 0.2 and p.flip == 0.5
        assert (p.jitter.brightness, p.jitter.contrast, p.jitter.saturation, p.jitter.hue) == jitter
        assert p.blur.p == blur and p.solarize == solarize


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_each_method_returns_per_image_losses_and_detached_features(name):
    small = ["method.proj_hidden_dim=256", "method.proj_output_dim=128"] if name != "wmse" else []  # CPU time
    cfg = compose([f"method={name}", "backbone=convnet", "trainer.batch_size=128", *small])
    validate(cfg)
    torch.manual_seed(0)
    model = instantiate(cfg.method, instantiate(cfg.backbone))
    views = [torch.randn(128, 3, 16, 16) for _ in range(2)]  # 16 px: the ConvNet pools to 1×1 anyway
    parts = model(views)
    assert parts.pair.shape == (128,) and parts.batch.shape == ()
    assert parts.feats.shape == (256, model.backbone.feat_dim) and not parts.feats.requires_grad
    parts.total().backward()
    assert all(p.grad is not None for p in model.backbone.parameters())
    assert model.embed(views[0]).norm(dim=1).sub(1).abs().max() < 1e-5


def test_wmse_whitening_size_that_does_not_divide_the_batch_is_refused_before_running():
    with pytest.raises(ConfigError, match=r"method.whitening_size = 128 .* divisor of trainer.batch_size=200"):
        validate(compose(["method=wmse", "trainer.batch_size=200"]))


def test_wmse_permutations_follow_a_step_counter_that_is_checkpointed():
    """Every rank, and a resumed run, draws the same sub-batches: the counter lives in the checkpoint."""
    cfg = compose(["method=wmse", "backbone=convnet", "method.proj_output_dim=8", "method.whitening_size=16"])
    torch.manual_seed(0)
    model = instantiate(cfg.method, instantiate(cfg.backbone))
    views = [torch.randn(32, 3, 16, 16) for _ in range(2)]
    first, second = model(views).pair, model(views).pair
    assert model.steps == 2 and not torch.equal(first, second)  # a new permutation each step
    resumed = instantiate(cfg.method, instantiate(cfg.backbone))
    resumed.load_state_dict(model.state_dict())
    assert resumed.steps == 2
    torch.testing.assert_close(resumed(views).pair, model(views).pair, atol=1e-6, rtol=0)
