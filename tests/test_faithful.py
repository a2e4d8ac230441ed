"""The defaults reproduce the reference implementations (issue 15): All4One's positional encoding as
solo-learn adds it, SCE's soft target for both of eztorch's ``use_keys`` modes, and k-NN top-5 when
k < 5.

Each reference here is our own slow, direct evaluation of the behaviour as described in
methods.md / the issue (explicit loops over tokens, features, rows and neighbours), not the
reference projects' code.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.core.evaluate import knn_classify, knn_protocol
from harness.jobs.config import ConfigError, compose, validate
from methods.all4one import All4One, solo_positions
from methods.sce import sce_pairs, sce_target_and_logits

# ---------------------------------------------------------------- All4One's positional encoding


def reference_solo_encoding(tokens: int, dim: int) -> torch.Tensor:
    """solo-learn's Summer(PositionalEncodingPermute1D(5)) on an (n, tokens, dim) sequence, as described:
    the feature index x is the position and token j the channel; channels round up to an even count
    C; token j gets sin(x·ω) for even j, cos(x·ω) for odd j, ω = 1 / 10000^(2·⌊j/2⌋ / C)."""
    channels = 2 * math.ceil(tokens / 2)
    enc = torch.zeros(tokens, dim, dtype=torch.float64)
    for j in range(tokens):
        omega = 1.0 / 10000 ** (2 * (j // 2) / channels)
        for x in range(dim):
            enc[j, x] = math.sin(x * omega) if j % 2 == 0 else math.cos(x * omega)
    return enc


def test_solo_encoding_is_the_permuted_one_feature_index_as_position():
    want = reference_solo_encoding(5, 256)
    got = solo_positions(5, 256).double()
    # float32 angles up to 255 rad: a few ulps of 255 in the sine's argument
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    x = torch.arange(256, dtype=torch.float64)
    torch.testing.assert_close(got[0], torch.sin(x), atol=1e-4, rtol=0)  # token 0: sin(x)
    torch.testing.assert_close(got[1], torch.cos(x), atol=1e-4, rtol=0)  # token 1: cos(x)
    omegas = [1.0, 1e4 ** (-1 / 3), 1e4 ** (-2 / 3)]
    torch.testing.assert_close(got[4], torch.sin(x * omegas[2]), atol=1e-5, rtol=0)
    assert abs(got[4, 10].item() - 10 * 0.002154) < 1e-5  # sin(x·1e4^(−2/3)) ≈ 0.00215·x for small x


class TinyBackbone(nn.Module):
    def __init__(self, feat_dim: int = 12):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, feat_dim))
        self.feat_dim = feat_dim

    def forward(self, x):
        return self.net(x)


def small_all4one(positional_encoding: str) -> All4One:
    torch.manual_seed(0)
    model = All4One(TinyBackbone(), proj_hidden_dim=16, proj_output_dim=16, pred_hidden_dim=16, queue_size=12,
                    transformer_heads=4, positional_encoding=positional_encoding)
    return model.eval()  # eval: BN per image, no dropout, so both evaluations see the same network


def row_infonce(anchors: torch.Tensor, preds: torch.Tensor, tau: float) -> list[torch.Tensor]:
    """Per row i: −log(exp(cos(a_i, p_i)/τ) / Σ_j exp(cos(a_i, p_j)/τ)), one row at a time."""
    out = []
    for i in range(len(anchors)):
        a = anchors[i] / anchors[i].norm()
        sims = torch.stack([(a * (p / p.norm())).sum() / tau for p in preds])
        out.append(-(sims[i] - torch.log(torch.exp(sims).sum())))
    return out


def reference_all4one_loss(model: All4One, views: list[torch.Tensor], enc: torch.Tensor) -> torch.Tensor:
    """All4One's total loss (methods.md §2.6, solo-learn's training step) written out directly, using
    `enc` as the encoding added to every 5-token sequence."""
    z = [model.projector(model.backbone(v)) for v in views]
    p = [model.predictor(zv) for zv in z]
    p_second = [model.predictor2(zv) for zv in z]
    with torch.no_grad():
        m = [F.normalize(model.momentum_encoder(v), dim=1) for v in views]
    keys = model.queue.keys
    nbrs = []
    for mv in m:  # 5 nearest support-set entries by dot product, nearest first
        rows = []
        for mi in mv:
            order = sorted(range(len(keys)), key=lambda j: -float((mi * keys[j]).sum()))[:5]
            rows.append(keys[order])
        nbrs.append(torch.stack(rows))
    rich = [model.transformer(nb + enc)[:, 0] for nb in nbrs]
    strange = [model.transformer(torch.cat([q[:, None], nb[:, :4]], dim=1) + enc)[:, 0]
               for q, nb in zip(p_second, nbrs)]
    neighbour = [(a + b) / 2 for a, b in zip(row_infonce(nbrs[0][:, 0], p[1], 0.2),
                                             row_infonce(nbrs[1][:, 0], p[0], 0.2))]
    centroid = [(a + b) / 2 for a, b in zip(row_infonce(rich[0], strange[1], 0.1),
                                            row_infonce(rich[1], strange[0], 0.1))]

    def corr(a, b):  # entry (r, c): Σ_i a_ir·b_ic over batch-normalised columns
        return (a / a.norm(dim=0)).T @ (b / b.norm(dim=0))

    c_a, c_b = corr(m[0], z[1]), corr(m[1], z[0])
    d = c_a.shape[0]
    on = sum((c[j, j] - 1) ** 2 for c in (c_a, c_b) for j in range(d)) / (2 * d)
    off = sum(c[r, s] ** 2 for c in (c_a, c_b) for r in range(d) for s in range(d) if r != s) / (2 * d * (d - 1))
    feature = 10 * (0.5 * on.sqrt() + 0.5 * off.sqrt())
    pair = torch.stack([0.5 * c + 0.5 * n for c, n in zip(centroid, neighbour)])
    return pair.mean() + 0.5 * feature


def loss_and_grads(model: nn.Module, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_all4one_default_loss_and_gradients_match_solo_learns_encoding():
    g = torch.Generator().manual_seed(7)
    views = [torch.randn(6, 3, 4, 4, generator=g) for _ in range(2)]
    enc = reference_solo_encoding(5, 16).float()
    model = small_all4one("solo")
    got_loss, got_grads = loss_and_grads(model, lambda: model(views).total())
    want_loss, want_grads = loss_and_grads(model, lambda: reference_all4one_loss(model, views, enc))
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    assert set(got_grads) == set(want_grads)
    assert {n.split(".")[0] for n in want_grads} >= {"backbone", "projector", "predictor", "predictor2", "transformer"}
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    # The textbook encoding (the option) is a different loss on the same network and inputs.
    textbook = small_all4one("textbook")
    textbook.load_state_dict(model.state_dict())
    other_loss, other_grads = loss_and_grads(textbook, lambda: textbook(views).total())
    assert abs(other_loss - want_loss) > 1e-3
    assert not torch.allclose(other_grads["predictor2.0.weight"], want_grads["predictor2.0.weight"], atol=1e-5)


def test_all4one_positional_encoding_is_validated_by_name():
    assert compose(["method=all4one"]).method.positional_encoding == "solo"
    validate(compose(["method=all4one", "method.positional_encoding=textbook"]))
    with pytest.raises(ConfigError, match=r"method\.positional_encoding = 'vaswani'.*one of solo, textbook"):
        validate(compose(["method=all4one", "method.positional_encoding=vaswani"]))


# ---------------------------------------------------------------- SCE's target, both use_keys modes


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1).double()


def dot(a, b) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b))


def reference_sce_row(q_i, k_i, own: int, candidates, tau, tau_m, lam, own_target_logit):
    """One anchor: its target w over `candidates` (own key at index `own`) and its loss. The own key's
    target logit is `own_target_logit` (0 or −inf); the others are k_i·c/τ_m."""
    target_logits = [own_target_logit if j == own else dot(k_i, c) / tau_m for j, c in enumerate(candidates)]
    e = [0.0 if t == -math.inf else math.exp(t) for t in target_logits]
    s = [x / sum(e) for x in e]
    w = [lam * (j == own) + (1 - lam) * s[j] for j in range(len(candidates))]
    w = [x / sum(w) for x in w]
    online = [dot(q_i, c) / tau for c in candidates]
    log_norm = math.log(sum(math.exp(x) for x in online))
    return w, -sum(w[j] * (online[j] - log_norm) for j in range(len(candidates)))


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_sce_use_keys_false_keeps_target_mass_on_the_own_key(lam):
    """eztorch's default: candidates {own key, queue}, own key's target logit 0 (not −inf)."""
    q, k, queue = unit(5, 8, 1), unit(5, 8, 2), unit(9, 8, 3)
    target, _ = sce_target_and_logits(q, k, queue, 0.1, 0.05, lam, use_keys=False)
    loss = sce_pairs(q, k, queue, 0.1, 0.05, lam, use_keys=False).double()
    for i in range(5):
        w, row_loss = reference_sce_row(q[i], k[i], 0, [k[i], *queue], 0.1, 0.05, lam, 0.0)
        torch.testing.assert_close(target[i], torch.tensor(w, dtype=target.dtype), atol=1e-6, rtol=1e-6)
        assert abs(loss[i].item() - row_loss) < 1e-5
        own_mass = lam + (1 - lam) / (1 + sum(math.exp(dot(k[i], c) / 0.05) for c in queue))
        assert abs(target[i, 0].item() - own_mass) < 1e-6
        if lam < 1:
            assert target[i, 0].item() > lam  # the own key keeps relational mass


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_sce_use_keys_true_excludes_the_own_key_and_adds_batch_keys(lam):
    """eztorch's use_keys=True: candidates {all keys of the global batch, queue}, own key logit −inf.
    Rows 4..7 of an 8-image global batch stand for rank 1 of 2 (offset 4)."""
    q_all, k_all, queue = unit(8, 8, 4), unit(8, 8, 5), unit(9, 8, 6)
    candidates = [*k_all, *queue]
    for rows, offset in ((range(8), 0), (range(4, 8), 4)):
        q, k = q_all[list(rows)], k_all[list(rows)]
        target, _ = sce_target_and_logits(q, k, queue, 0.1, 0.05, lam, True, k_all, offset)
        loss = sce_pairs(q, k, queue, 0.1, 0.05, lam, True, k_all, offset).double()
        assert target.shape == (len(rows), 8 + 9)
        for r, i in enumerate(rows):
            w, row_loss = reference_sce_row(q_all[i], k_all[i], i, candidates, 0.1, 0.05, lam, -math.inf)
            torch.testing.assert_close(target[r], torch.tensor(w, dtype=target.dtype), atol=1e-6, rtol=1e-6)
            assert abs(loss[r].item() - row_loss) < 1e-5
            assert abs(target[r, i].item() - lam) < 1e-6  # the own key gets λ and nothing relational
    # The two modes are different losses on the same inputs.
    assert not torch.allclose(sce_pairs(q_all, k_all, queue, 0.1, 0.05, 0.5, False),
                              sce_pairs(q_all, k_all, queue, 0.1, 0.05, 0.5, True), atol=1e-3)


def test_sce_use_keys_defaults_to_eztorchs_and_is_validated_by_name():
    assert compose(["method=sce"]).method.use_keys is False
    validate(compose(["method=sce", "method.use_keys=true"]))
    with pytest.raises(ConfigError, match=r"method\.use_keys = 'exclude'.*true or false"):
        validate(compose(["method=sce", "method.use_keys=exclude"]))


# ---------------------------------------------------------------- k-NN top-5 when k < 5


def reference_knn(train, train_y, test, test_y, k, T):
    """Per test row: the k most similar train rows vote exp(sim/T) for their class. Top-1: the class
    with the most weight. Top-5: the true class is a hit if it got a vote and fewer than min(5, k)
    voted classes have more weight."""
    top1 = top5 = 0
    for x, truth in zip(test, test_y):
        sims = [dot(x, t) for t in train]
        order = sorted(range(len(train)), key=lambda j: -sims[j])[:k]
        weight = {}
        for j in order:
            c = int(train_y[j])
            weight[c] = weight.get(c, 0.0) + math.exp(sims[j] / T)
        best = max(weight, key=weight.get)
        top1 += best == int(truth)
        if int(truth) in weight:
            top5 += sum(w > weight[int(truth)] for w in weight.values()) < min(5, k)
    return 100 * top1 / len(test), 100 * top5 / len(test)


def tied_case():
    """Each test point t owns two feature axes and three train points: class a at similarity 0.9 and
    classes b and c tied at 0.5 (train points of other test points are orthogonal to it). Truths cycle
    through a, b, unvoted classes, so at k=1 and k=3 most truths got no vote."""
    num_tests, classes = 6, 7
    dim = 2 * num_tests
    train, train_y, test, test_y = [], [], [], []
    for t in range(num_tests):
        a, b, c = t % classes, (t + 1) % classes, (t + 2) % classes
        query = torch.zeros(dim)
        query[2 * t] = 1.0
        for sim, label in ((0.9, a), (0.5, b), (0.5, c)):
            point = torch.zeros(dim)
            point[2 * t], point[2 * t + 1] = sim, math.sqrt(1 - sim * sim)
            train.append(point)
            train_y.append(label)
        test.append(query)
        test_y.append([a, b, (t + 3) % classes, (t + 4) % classes, (t + 5) % classes, (t + 6) % classes][t])
    return torch.stack(train), torch.tensor(train_y), torch.stack(test), torch.tensor(test_y), classes


@pytest.mark.parametrize("k, want", [(1, (100 / 6, 100 / 6)), (3, (100 / 6, 200 / 6))])
def test_knn_top5_at_small_k_never_counts_classes_without_votes(k, want):
    train, train_y, test, test_y, classes = tied_case()
    got = knn_classify(train, train_y, test, test_y, [(k, 0.07)], classes)[knn_protocol(k, 0.07)]
    assert got == pytest.approx(want)  # truth a: hit at 1 and 5; truth b (tied 2nd): top-5 hit at k=3 only
    assert got == pytest.approx(reference_knn(train.double(), train_y, test.double(), test_y, k, 0.07))


@pytest.mark.parametrize("k", [1, 3, 10, 40])
def test_knn_matches_the_direct_vote_on_random_features(k):
    g = torch.Generator().manual_seed(3)
    train = F.normalize(torch.randn(40, 6, generator=g), dim=1)
    test = F.normalize(torch.randn(25, 6, generator=g), dim=1)
    train_y, test_y = torch.randint(0, 7, (40,), generator=g), torch.randint(0, 7, (25,), generator=g)
    got = knn_classify(train, train_y, test, test_y, [(k, 0.1)], 7, chunk=8)[knn_protocol(k, 0.1)]
    assert got == pytest.approx(reference_knn(train.double(), train_y, test.double(), test_y, k, 0.1))
