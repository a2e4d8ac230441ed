"""Multi-crop: SimCLR's and SCE's losses over large and small views equal a slow direct evaluation
of their references' formulas (solo-learn's simclr_loss_func over every crop; eztorch's SCE
training_step over global and local crops), and a method without multi-crop refuses it in one line."""

from __future__ import annotations

import math

import pytest
import torch

from harness.core.backbones import ConvNet
from harness.core.method import split_views
from methods.sce import SCE
from methods.simclr import SimCLR


def _views(n: int = 6, sizes=(32, 32, 16, 16, 16), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, s, s, generator=g) for s in sizes]


def test_large_and_small_views_are_told_apart():
    large, small = split_views(_views())
    assert [v.shape[-1] for v in large] == [32, 32] and [v.shape[-1] for v in small] == [16, 16, 16]
    assert split_views(_views(sizes=(32, 32)))[1] == []


def _slow_simclr(zs: list[torch.Tensor], t: float) -> torch.Tensor:
    """Per image: the mean over its views of −log(Σ_pos e^{s/t} / Σ_{not self} e^{s/t}), one anchor at a time."""
    v, n = len(zs), len(zs[0])
    out = torch.zeros(n, dtype=torch.float64)
    for a_view in range(v):
        for i in range(n):
            anchor = zs[a_view][i].double()
            pos = tot = 0.0
            for c_view in range(v):
                for j in range(n):
                    if (c_view, j) == (a_view, i):
                        continue
                    e = math.exp(float(anchor @ zs[c_view][j].double()) / t)
                    tot += e
                    pos += e if j == i else 0.0
            out[i] += -math.log(pos / tot) / v
    return out


def test_simclr_multi_crop_loss_equals_a_slow_direct_evaluation():
    torch.manual_seed(0)
    model = SimCLR(ConvNet(width=8, feat_dim=32), temperature=0.2, proj_hidden_dim=32, proj_output_dim=16).eval()
    views = _views()
    parts = model(views)
    with torch.no_grad():
        zs = [model.embed(v) for v in views]
    assert torch.allclose(parts.pair.double(), _slow_simclr(zs, 0.2), atol=1e-5)
    assert parts.feats.shape == (2 * 6, 32)  # the large views' features (the online probe's input)
    # with two views of one size it is the usual NT-Xent, unchanged
    two = model(views[:2])
    assert torch.allclose(two.pair.double(), _slow_simclr(zs[:2], 0.2), atol=1e-5)


def _slow_sce_anchor(q, k, queue, t, tm, lam) -> float:
    """eztorch's use_keys=False SCE loss of one anchor: candidates {own key, queue}."""
    q, k, queue = q.double(), k.double(), queue.double()
    target_logits = [0.0] + [float(k @ c) / tm for c in queue]
    mx = max(target_logits)
    s = [math.exp(x - mx) for x in target_logits]
    s = [x / sum(s) for x in s]
    w = [(1 - lam) * x for x in s]
    w[0] += lam
    w = [x / sum(w) for x in w]
    online = [float(q @ k) / t] + [float(q @ c) / t for c in queue]
    log_z = math.log(sum(math.exp(x) for x in online))
    return -sum(wi * (oi - log_z) for wi, oi in zip(w, online))


@pytest.mark.parametrize("symmetric", [True, False])
def test_sce_multi_crop_loss_equals_a_slow_direct_evaluation(symmetric):
    torch.manual_seed(0)
    model = SCE(ConvNet(width=8, feat_dim=32), temperature=0.1, temperature_m=0.07, lam=0.5, proj_hidden_dim=32,
                proj_output_dim=16, queue_size=20, symmetric=symmetric, shuffle_bn_groups=1).eval()
    views = _views()
    parts = model(views)
    with torch.no_grad():
        queries = [model.embed(v) for v in views]
        keys = [model.keys(v) for v in views[:2]]
    queue = model.queue.keys
    keyed = [0, 1] if symmetric else [0]
    combos = [(i, j) for i in keyed for j in range(len(views)) if j != i]
    assert len(combos) == (8 if symmetric else 4)  # (views − 1) × globals, as eztorch divides by
    slow = torch.tensor([sum(_slow_sce_anchor(queries[j][a], keys[i][a], queue, 0.1, 0.07, 0.5) for i, j in combos)
                         / len(combos) for a in range(6)], dtype=torch.float64)
    assert torch.allclose(parts.pair.double(), slow, atol=1e-5)
    # the keys of every global view (symmetric) or of the first view are enqueued after the step
    model.after_step(0.5)
    staged = torch.cat([keys[i] for i in keyed])
    assert torch.allclose(model.queue.keys[:len(staged)], staged, atol=1e-6)


def test_a_method_without_multi_crop_refuses_it_in_one_line():
    from harness.errors import ConfigError
    from harness.jobs.config import compose, validate

    overrides = ["augment=sce_imagenet_multicrop", "backbone=convnet", "dataset.train_size=100",
                 "dataset.test_size=50", "trainer.batch_size=10"]
    with pytest.raises(ConfigError) as refused:
        validate(compose(["method=simsiam", *overrides]))
    lines = [line for line in str(refused.value).splitlines() if "augment.views" in line]
    assert len(lines) == 1 and "two views of one size for method=simsiam: solo-learn's SimSiam has none" in lines[0]
    # the pair add-ons refuse it too: ScoreCL scores, and CLSP extends, a pair of two views of one size
    with pytest.raises(ConfigError) as refused:
        validate(compose(["method=simclr", "weighting=scorecl_tiny", *overrides]))
    assert "weighting = 'scorecl' is not allowed: expected none with a multi-crop recipe" in str(refused.value)
    try:  # simclr has a multi-crop form: accepted (other fields may still be refused here)
        validate(compose(["method=simclr", *overrides]))
    except ConfigError as e:
        assert "augment.views" not in str(e)


def test_sce_two_view_symmetric_enqueues_the_keys_of_both_views():
    torch.manual_seed(0)
    model = SCE(ConvNet(width=8, feat_dim=32), proj_hidden_dim=32, proj_output_dim=16, queue_size=20,
                symmetric=True, shuffle_bn_groups=1).eval()
    views = _views(sizes=(32, 32))
    model(views)
    model.after_step(0.5)
    with torch.no_grad():
        keys = torch.cat([model.keys(v) for v in views])
    assert torch.allclose(model.queue.keys[:12], keys, atol=1e-6) and int(model.queue.ptr) == 12


def test_byol_multi_crop_loss_equals_a_slow_direct_evaluation():
    from methods.byol import BYOL

    torch.manual_seed(0)
    model = BYOL(ConvNet(width=8, feat_dim=32), proj_hidden_dim=32, proj_output_dim=16, pred_hidden_dim=32).eval()
    views = _views()
    parts = model(views)
    with torch.no_grad():
        preds = [model.predictor(model.projector(model.backbone(v))) for v in views]
        targets = [model.momentum_encoder(v) for v in views[:2]]
    slow = torch.zeros(6, dtype=torch.float64)
    for a in range(6):
        for i in range(2):  # solo-learn: for v1 in the large crops, for v2 in every other crop
            for j in range(5):
                if j != i:
                    p, z = preds[j][a].double(), targets[i][a].double()
                    slow[a] += 2 - 2 * float(p @ z) / (float(p.norm()) * float(z.norm()))
    assert torch.allclose(parts.pair.double(), slow, atol=1e-5)


@pytest.mark.parametrize("method,ref", [("nnclr", "NNCLR"), ("mocov2", "MoCo v2+"), ("vicreg", "VICReg")])
def test_methods_whose_solo_learn_loss_takes_two_large_crops_refuse_multi_crop_saying_why(method, ref):
    # solo-learn's training_step for these unpacks the two large crops' outputs only: small crops would
    # be forwarded and left out of the loss, so there is no reference multi-crop form to reproduce.
    from harness.errors import ConfigError
    from harness.jobs.config import compose, validate

    with pytest.raises(ConfigError) as refused:
        validate(compose([f"method={method}", "augment=sce_imagenet_multicrop", "backbone=convnet",
                          "dataset.train_size=100", "dataset.test_size=50", "trainer.batch_size=10"]))
    lines = [line for line in str(refused.value).splitlines() if "augment.views" in line]
    assert len(lines) == 1, str(refused.value)
    assert f"two views of one size for method={method}: solo-learn's {ref} has none (its loss takes the two " \
           "large crops only)" in lines[0]
