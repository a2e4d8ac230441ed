"""MoCo v2+, SCE, BYOL, NNCLR, All4One and their shared pieces (EMA, gathered queue, NN lookup).

Each loss is checked against a slow, direct evaluation of methods.md's formula (plain loops over
anchors in float64), the identities are checked, and 2 gloo processes (with real DDP) on halves
of a batch are checked to give the same per-image losses, queue contents and parameters as one
process on the whole batch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.core.optim import param_groups
from harness.jobs.config import ConfigError, compose, instantiate, validate
from methods.all4one import All4One, feature_decorrelation, off_diagonal, sinusoidal_positions
from methods.byol import BYOL, byol_pairs
from methods.common import Queue, ema_update, infonce_queue_pairs, momentum_tau, nn_infonce_pairs
from methods.mocov2 import MoCoV2
from methods.nnclr import NNCLR
from methods.sce import SCE, sce_pairs
from tests.dist_utils import run_ranks

TOL = 1e-5


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def dot(a, b) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b))


def slow_infonce(anchor, positive, candidates, tau) -> float:
    """−log( exp(a·pos/τ) / Σ_c exp(a·c/τ) ), with `positive` one of `candidates`."""
    return -math.log(math.exp(dot(anchor, positive) / tau) / sum(math.exp(dot(anchor, c) / tau) for c in candidates))


# ---------------------------------------------------------------- formulas


def slow_moco(q, k, queue, tau):
    return [slow_infonce(q[i], k[i], [k[i], *queue], tau) for i in range(len(q))]


def test_moco_infonce_matches_the_formula():
    q, k, queue = unit(6, 8, 0), unit(6, 8, 1), unit(10, 8, 2)
    for tau in (0.1, 0.2, 0.5):
        got = infonce_queue_pairs(q, k, queue, tau)
        torch.testing.assert_close(got.double(), torch.tensor(slow_moco(q, k, queue, tau), dtype=torch.float64),
                                   atol=TOL, rtol=0)


def slow_sce(q, k, queue, tau, tau_m, lam):
    """methods.md §3.1 as eztorch computes it by default (use_keys=False): w_ik = λ·1[k=i] + (1−λ)·s_ik,
    s over {own key, queue} with the own key's target logit 0, L1-renormalised; loss_i = −Σ_k w_ik·log p_ik
    with p the online softmax over {own key, queue}. (use_keys=True: tests/test_faithful.py.)"""
    out = []
    for i in range(len(q)):
        cands = [k[i], *queue]
        t = [math.exp(dot(k[i], c) / tau_m) for c in queue]
        self_term = math.exp(0.0)
        s = [self_term / (self_term + sum(t))] + [x / (self_term + sum(t)) for x in t]
        w = [lam * (j == 0) + (1 - lam) * s[j] for j in range(len(cands))]
        w = [x / sum(w) for x in w]
        e = [math.exp(dot(q[i], c) / tau) for c in cands]
        out.append(-sum(w[j] * math.log(e[j] / sum(e)) for j in range(len(cands))))
    return out


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_sce_matches_the_formula(lam):
    q, k, queue = unit(5, 8, 3), unit(5, 8, 4), unit(9, 8, 5)
    got = sce_pairs(q, k, queue, 0.1, 0.05, lam)
    want = torch.tensor(slow_sce(q, k, queue, 0.1, 0.05, lam), dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, atol=TOL, rtol=0)


def test_sce_with_lambda_one_is_moco_infonce_on_the_same_queue():
    q, k, queue = unit(7, 16, 6), unit(7, 16, 7), unit(20, 16, 8)
    torch.testing.assert_close(sce_pairs(q, k, queue, 0.2, 0.05, 1.0),
                               infonce_queue_pairs(q, k, queue, 0.2), atol=1e-6, rtol=0)


def test_byol_matches_the_formula():
    p1, p2, z1, z2 = (torch.randn(5, 8, generator=torch.Generator().manual_seed(s)) for s in range(4))
    want = [sum(2 - 2 * dot(p, z) / math.sqrt(dot(p, p) * dot(z, z)) for p, z in ((p1[i], z2[i]), (p2[i], z1[i])))
            for i in range(5)]
    torch.testing.assert_close(byol_pairs(p1, p2, z1, z2).double(), torch.tensor(want, dtype=torch.float64),
                               atol=TOL, rtol=0)


def slow_nn_infonce(pos, p, tau):
    p = [x / math.sqrt(dot(x, x)) for x in p]
    pos = [x / math.sqrt(dot(x, x)) for x in pos]
    return [slow_infonce(pos[i], p[i], p, tau) for i in range(len(p))]


def test_nnclr_loss_matches_the_formula_and_extra_positives_average():
    pos1, pos2 = unit(6, 8, 9), unit(6, 8, 10)
    p2 = torch.randn(6, 8, generator=torch.Generator().manual_seed(11))
    got = nn_infonce_pairs(pos1, p2, 0.2)
    torch.testing.assert_close(got.double(), torch.tensor(slow_nn_infonce(pos1, p2, 0.2), dtype=torch.float64),
                               atol=TOL, rtol=0)
    # An extra positive beside the neighbour: image i's loss is the mean over its two positives.
    both = nn_infonce_pairs(torch.stack([pos1, pos2], dim=1), p2, 0.2)
    torch.testing.assert_close(both, (nn_infonce_pairs(pos1, p2, 0.2) + nn_infonce_pairs(pos2, p2, 0.2)) / 2)


def test_feature_decorrelation_matches_the_formula():
    m1, m2, z1, z2 = (torch.randn(7, 5, generator=torch.Generator().manual_seed(20 + s)).double() for s in range(4))

    def corr(a, b):
        na = [math.sqrt(sum(float(a[i, c]) ** 2 for i in range(7))) for c in range(5)]
        nb = [math.sqrt(sum(float(b[i, c]) ** 2 for i in range(7))) for c in range(5)]
        return [[sum(float(a[i, r]) / na[r] * float(b[i, c]) / nb[c] for i in range(7)) for c in range(5)]
                for r in range(5)]

    ca, cb = corr(m1, z2), corr(m2, z1)
    on = sum((c[j][j] - 1) ** 2 for c in (ca, cb) for j in range(5)) / 10
    off = sum(c[r][s] ** 2 for c in (ca, cb) for r in range(5) for s in range(5) if r != s) / 40
    want = 10 * (0.5 * math.sqrt(on) + 0.5 * math.sqrt(off))
    assert abs(feature_decorrelation(m1, m2, z1, z2).item() - want) < TOL


def test_off_diagonal_is_the_boolean_mask_selection_in_the_same_order():
    # A view instead of c[~eye] (a host sync on a GPU): the same entries in the same order, any size.
    for n in (1, 2, 3, 8):
        c = torch.randn(n, n, generator=torch.Generator().manual_seed(n))
        assert torch.equal(off_diagonal(c), c[~torch.eye(n, dtype=torch.bool)])


def test_positional_encoding_is_the_sinusoid():
    enc = sinusoidal_positions(5, 6)
    for pos in range(5):
        for i in range(3):
            angle = pos / 10000 ** (2 * i / 6)
            assert abs(enc[pos, 2 * i] - math.sin(angle)) < 1e-6 and abs(enc[pos, 2 * i + 1] - math.cos(angle)) < 1e-6


# ---------------------------------------------------------------- EMA and queue


def test_momentum_schedules():
    assert [momentum_tau(p, 0.99, 1.0, "constant") for p in (0, 0.5, 1)] == [0.99, 0.99, 0.99]
    cosine = [momentum_tau(p, 0.99, 1.0, "cosine") for p in (0, 0.5, 1)]
    assert cosine == pytest.approx([0.99, 0.995, 1.0], abs=1e-12)
    assert momentum_tau(0.5, 0.99, 0.999, "cosine") == pytest.approx(0.9945, abs=1e-12)
    with pytest.raises(ValueError, match="linear"):
        momentum_tau(0.5, 0.99, 1.0, "linear")


def test_ema_update_moves_the_target_by_one_minus_tau():
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.detach().clone() for p in target.parameters()]
    ema_update(online, target, 0.9)
    for t, b, o in zip(target.parameters(), before, online.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o.detach())


def test_queue_is_fifo_with_wraparound_and_saved_in_state_dict():
    queue = Queue(5, 2)
    first = torch.arange(6.0).view(3, 2)
    queue.push(first)
    queue.push(first + 100)  # 3 more: fills rows 3, 4, then wraps to row 0
    assert int(queue.ptr) == 1
    torch.testing.assert_close(queue.keys, torch.tensor([[104.0, 105], [2, 3], [4, 5], [100, 101], [102, 103]]))
    state = queue.state_dict()
    assert set(state) == {"keys", "ptr"}
    again = Queue(5, 2)
    again.load_state_dict(state)
    torch.testing.assert_close(again.keys, queue.keys)
    assert int(again.ptr) == 1
    small = Queue(2, 2)
    small.push(first)  # more keys than room: the newest stay
    torch.testing.assert_close(small.keys, first[1:])


def test_neighbours_are_the_largest_dot_products_nearest_first():
    queue = Queue(30, 4, seed=3)
    z = unit(5, 4, 12)
    got = queue.neighbours(z, 3)
    for i in range(5):
        order = sorted(range(30), key=lambda j: -dot(z[i], queue.keys[j]))[:3]
        torch.testing.assert_close(got[i], queue.keys[order])


def test_all4one_transformer_gets_its_own_lr_scale():
    model = All4One(TinyBackbone(), **SMALL["all4one"])
    groups = param_groups(model, 1e-5)
    scaled = [g for g in groups if g.get("lr_scale") == 0.1]
    ids = {id(p) for g in scaled for p in g["params"]}
    assert ids == {id(p) for p in model.transformer.parameters()}
    assert groups[0]["weight_decay"] == 1e-5 and "lr_scale" not in groups[0]


# ---------------------------------------------------------------- whole methods


class TinyBackbone(nn.Module):
    def __init__(self, feat_dim: int = 12):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, feat_dim))
        self.feat_dim = feat_dim

    def forward(self, x):
        return self.net(x)


SMALL = {
    "mocov2": dict(proj_hidden_dim=16, proj_output_dim=8, queue_size=12),
    "sce": dict(proj_hidden_dim=16, proj_output_dim=8, queue_size=12),
    "sce_use_keys": dict(proj_hidden_dim=16, proj_output_dim=8, queue_size=12, use_keys=True),
    "byol": dict(proj_hidden_dim=16, proj_output_dim=8, pred_hidden_dim=16),
    "nnclr": dict(proj_hidden_dim=16, proj_output_dim=8, pred_hidden_dim=16, queue_size=12),
    "all4one": dict(proj_hidden_dim=16, proj_output_dim=16, pred_hidden_dim=16, queue_size=12, transformer_heads=4),
}
CLASSES = {"mocov2": MoCoV2, "sce": SCE, "sce_use_keys": SCE, "byol": BYOL, "nnclr": NNCLR, "all4one": All4One}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return CLASSES[name](TinyBackbone(), **SMALL[name]).eval()  # eval: BN per image, no dropout


def batch_views(step: int, n: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(n, 3, 4, 4, generator=g) for _ in range(2)]


def test_whole_methods_match_the_formula_on_their_own_embeddings():
    views = batch_views(0)
    with torch.no_grad():
        moco = build("mocov2")
        q1, q2 = (moco.embed(v) for v in views)
        k1, k2 = (moco.keys(v) for v in views)
        want = [(a + b) / 2 for a, b in zip(slow_moco(q1, k2, moco.queue2.keys, 0.2),
                                            slow_moco(q2, k1, moco.queue1.keys, 0.2))]
        torch.testing.assert_close(moco(views).pair.double(), torch.tensor(want, dtype=torch.float64), atol=TOL, rtol=0)

        sce = build("sce")  # weak view 0 → momentum only, strong view 1 → online only
        want = slow_sce(sce.embed(views[1]), sce.keys(views[0]), sce.queue.keys, 0.1, 0.05, 0.5)
        torch.testing.assert_close(sce(views).pair.double(), torch.tensor(want, dtype=torch.float64), atol=TOL, rtol=0)

        byol = build("byol")
        p1, p2 = (byol.predictor(byol.projector(byol.backbone(v))) for v in views)
        z1, z2 = (byol.momentum_encoder(v) for v in views)
        torch.testing.assert_close(byol(views).pair, byol_pairs(p1, p2, z1, z2))

        nnclr = build("nnclr")
        z = [F.normalize(nnclr.projector(nnclr.backbone(v)), dim=1) for v in views]
        p = [nnclr.predictor(nnclr.projector(nnclr.backbone(v))) for v in views]
        keys = nnclr.queue.keys
        nn_ = [torch.stack([keys[max(range(12), key=lambda j: dot(zi, keys[j]))] for zi in zv]) for zv in z]
        want = [(a + b) / 2 for a, b in zip(slow_nn_infonce(nn_[0], p[1], 0.2), slow_nn_infonce(nn_[1], p[0], 0.2))]
        torch.testing.assert_close(nnclr(views).pair.double(), torch.tensor(want, dtype=torch.float64),
                                   atol=TOL, rtol=0)

        a41 = build("all4one")
        z = [a41.projector(a41.backbone(v)) for v in views]
        m = [F.normalize(a41.momentum_encoder(v), dim=1) for v in views]
        keys = a41.queue.keys
        nbrs = [torch.stack([keys[sorted(range(12), key=lambda j: -dot(mi, keys[j]))[:5]] for mi in mv]) for mv in m]
        rich = [a41.transformer(nb + a41.positions)[:, 0] for nb in nbrs]
        strange = [a41.transformer(torch.cat([a41.predictor2(zv)[:, None], nb[:, :4]], 1) + a41.positions)[:, 0]
                   for zv, nb in zip(z, nbrs)]
        p = [a41.predictor(zv) for zv in z]
        neighbour = [(a + b) / 2 for a, b in zip(slow_nn_infonce(nbrs[0][:, 0], p[1], 0.2),
                                                 slow_nn_infonce(nbrs[1][:, 0], p[0], 0.2))]
        centroid = [(a + b) / 2 for a, b in zip(slow_nn_infonce(rich[0], strange[1], 0.1),
                                                slow_nn_infonce(rich[1], strange[0], 0.1))]
        out = a41(views)
        want = [0.5 * c + 0.5 * n for c, n in zip(centroid, neighbour)]
        torch.testing.assert_close(out.pair.double(), torch.tensor(want, dtype=torch.float64), atol=TOL, rtol=0)
        torch.testing.assert_close(out.batch, 0.5 * feature_decorrelation(m[0], m[1], z[0], z[1]))


def test_feats_are_detached_backbone_features():
    views = batch_views(1)
    for name in CLASSES:
        model = build(name)
        out = model(views)
        online_view = views[1] if name.startswith("sce") else views[0]
        assert not out.feats.requires_grad
        torch.testing.assert_close(out.feats, model.backbone(online_view).detach())


def _train_steps(rank: int, world: int, names: list[str], steps: int) -> dict:
    """A few SGD steps of each method on this rank's slice of each global batch, under real DDP."""
    results = {}
    for name in names:
        model = build(name)
        ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        pairs, queues = [], []
        for step in range(steps):
            views = [v.chunk(world)[rank] for v in batch_views(step)]
            out = ddp(views)
            opt.zero_grad()
            out.total().backward()
            opt.step()
            model.after_step((step + 1) / steps)
            pairs.append(out.pair.detach())
            queues.append({k: v.clone() for k, v in model.state_dict().items() if k.startswith("queue")})
        results[name] = dict(pairs=pairs, queues=queues, state=model.state_dict())
    return results


def same(got: torch.Tensor, want: torch.Tensor, what: str, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    try:
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}") from None


def test_two_gloo_processes_on_halves_equal_one_process_on_the_whole_batch():
    names = list(CLASSES)
    whole = _train_steps(0, 1, names, 3)
    ranks = run_ranks(_train_steps, 2, names, 3)
    for name in names:
        for step in range(3):
            same(torch.cat([r[name]["pairs"][step] for r in ranks]), whole[name]["pairs"][step], f"{name} {step} loss")
            for r in ranks:  # every rank holds the queue one process builds (12 slots, 8 keys a step: wraps)
                for key, value in whole[name]["queues"][step].items():
                    same(r[name]["queues"][step][key], value, f"{name} step {step} {key}", atol=1e-6, rtol=1e-5)
        ptrs = [v for k, v in whole[name]["queues"][-1].items() if k.endswith("ptr")]
        assert all(int(p) == 24 % 12 for p in ptrs) and (name == "byol" or ptrs)
        for key, value in whole[name]["state"].items():  # parameters, EMA copies and queues after 3 steps
            same(ranks[1][name]["state"][key], value, f"{name} {key}")


# ---------------------------------------------------------------- configs

DEFAULTS = {
    "mocov2": dict(augment="symmetric_weak", optimizer="sgd", lr=0.3, weight_decay=1e-4,
                   method=dict(temperature=0.2, proj_hidden_dim=2048, proj_output_dim=256, queue_size=32768,
                               momentum_base=0.99, momentum_final=0.999, momentum_schedule="cosine")),
    "sce": dict(augment="weak_strong", optimizer="sgd", lr=0.06, weight_decay=5e-4, warmup_epochs=5,
                method=dict(temperature=0.1, temperature_m=0.05, lam=0.5, proj_hidden_dim=512, proj_output_dim=128,
                            pred_hidden_dim=None, queue_size=4096, momentum_base=0.99, momentum_schedule="constant",
                            symmetric=False, use_keys=False)),
    "byol": dict(augment="asymmetric", optimizer="lars", lr=1.0, weight_decay=1e-5,
                 method=dict(proj_hidden_dim=4096, proj_output_dim=256, pred_hidden_dim=4096, momentum_base=0.99,
                             momentum_final=1.0, momentum_schedule="cosine")),
    "nnclr": dict(augment="asymmetric", optimizer="lars", lr=0.4, weight_decay=1e-5,
                  method=dict(temperature=0.2, proj_hidden_dim=2048, proj_output_dim=256, pred_hidden_dim=4096,
                              queue_size=65536)),
    "all4one": dict(augment="asymmetric", optimizer="lars", lr=1.0, weight_decay=1e-5,
                    method=dict(temperature=0.2, temperature_centroid=0.1, proj_hidden_dim=2048, proj_output_dim=256,
                                pred_hidden_dim=4096, queue_size=98304, num_neighbours=5, transformer_layers=3,
                                transformer_heads=8, transformer_dropout=0.1, transformer_lr_scale=0.1,
                                momentum_base=0.99, momentum_final=1.0, momentum_schedule="cosine",
                                weights=[0.5, 0.5, 0.5], positional_encoding="solo")),
}


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_method_yaml_has_the_documented_defaults(name):
    cfg = compose([f"method={name}"])
    want = DEFAULTS[name]
    assert cfg.method.name == name and cfg.augment.name == want["augment"]
    assert cfg.trainer.optimizer == want["optimizer"]
    assert cfg.trainer.lr == pytest.approx(want["lr"])
    assert cfg.trainer.weight_decay == pytest.approx(want["weight_decay"])
    if "warmup_epochs" in want:
        assert cfg.trainer.warmup_epochs == want["warmup_epochs"]
    for key, value in want["method"].items():
        assert cfg.method[key] == value, key
    # Every key is a constructor argument, and overrides reach the model.
    model = instantiate(compose([f"method={name}", "backbone=convnet"] + (
        ["method.queue_size=64"] if "queue_size" in want["method"] else [])).method, TinyBackbone())
    if "queue_size" in want["method"]:
        assert max(len(m.keys) for m in model.modules() if isinstance(m, Queue)) == 64


def test_weak_strong_recipe_matches_methods_md():
    aug = compose(["method=sce"]).augment
    weak, strong = aug.pipelines.weak, aug.pipelines.strong
    assert list(aug.views) == ["weak", "strong"]
    assert list(weak.crop.scale) == [0.2, 1.0] and weak.jitter.p == 0 and weak.grayscale == 0 and weak.blur.p == 0
    assert list(strong.crop.scale) == [0.2, 1.0] and strong.jitter.p == 0.8 and strong.grayscale == 0.2
    assert [strong.jitter[k] for k in ("brightness", "contrast", "saturation", "hue")] == [0.4, 0.4, 0.4, 0.1]
    assert strong.blur.p == 0.5 and list(strong.blur.sigma) == [0.1, 2.0] and weak.flip == strong.flip == 0.5


@pytest.mark.parametrize("override, field", [
    ("method.temperature=0", "method.temperature"),
    ("method.queue_size=0", "method.queue_size"),
    ("method.momentum_schedule=linear", "method.momentum_schedule"),
    ("method.momentum_base=1.5", "method.momentum_base"),
])
def test_bad_method_values_are_rejected_by_name(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(compose(["method=mocov2", override]))


def test_bad_sce_values_are_rejected_by_name():
    with pytest.raises(ConfigError, match=r"method\.lam"):
        validate(compose(["method=sce", "method.lam=2"]))
    with pytest.raises(ConfigError, match=r"method\.use_keys"):
        validate(compose(["method=sce", "method.use_keys=keep"]))
