"""Linear probes: the offline probe on frozen features (protocol linear:...), the online classifier
add-on (protocol online_linear), their augmentation and their optimizer groups."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from harness.core.data.augment import pad_crop_flip
from harness.core.evaluate import LINEAR_DEFAULTS, linear_lr_factor, linear_probe, linear_protocol
from harness.core.optim import build_optimizer
from harness.jobs.config import ConfigError, compose, validate
from harness.store import Store
from tests.conftest import THREADS, requires_cifar, run_harness


def test_pad_crop_flip_shifts_and_mirrors_each_image_like_random_crop_with_zero_padding():
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    assert torch.equal(pad_crop_flip(x, 0, 0.0, g), x.float() / 255)
    assert torch.equal(pad_crop_flip(x, 0, 1.0, g), x.flip(3).float() / 255)
    out = pad_crop_flip(x, 2, 0.5, g)
    padded = torch.nn.functional.pad(x.float() / 255, (2, 2, 2, 2))
    seen = set()
    for i in range(64):  # each output is one of the 5×5×2 crops of its zero-padded image
        matches = [(t, s, f) for t in range(5) for s in range(5) for f in (False, True)
                   if torch.equal(out[i], (lambda c: c.flip(2) if f else c)(padded[i, :, t:t + 8, s:s + 8]))]
        assert matches, f"image {i} is not a shifted/flipped crop"
        seen.update(matches)
    assert len({m[2] for m in seen}) == 2 and len({m[:2] for m in seen}) > 10  # both flips, many shifts


def test_the_default_protocol_is_named_plainly_and_other_settings_are_named():
    lc = OmegaConf.create({**LINEAR_DEFAULTS, "epochs": 100, "enabled": True})
    assert linear_protocol(lc) == "linear:sgd:100ep"
    assert linear_protocol(compose([]).eval.linear) == "linear:sgd:100ep"  # the YAML defaults are the protocol's
    lc.update(epochs=20, lr=30.0, augment="flip", copies=2)
    assert linear_protocol(lc) == "linear:sgd:20ep:lr=30.0:augment=flip:copies=2"
    lc.update(augment="none")
    assert linear_protocol(lc) == "linear:sgd:20ep:lr=30.0:augment=none"  # copies mean nothing without augment


def test_step_schedule_decays_at_the_milestone_fractions():
    lc = OmegaConf.create({**LINEAR_DEFAULTS, "epochs": 100})
    assert [linear_lr_factor(lc, e) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


class _Flatten(nn.Module):
    """A fixed 'backbone': the flattened image (with one parameter so it has a device)."""

    feat_dim = 3 * 4 * 4

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x.flatten(1) * self.scale


def test_linear_probe_learns_a_linearly_separable_problem():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (600,), generator=g)
    images = torch.randint(0, 80, (600, 3, 4, 4), dtype=torch.uint8, generator=g)
    images[torch.arange(600), labels] += 150  # class = the bright channel: separable under crops and flips
    lc = OmegaConf.create({**LINEAR_DEFAULTS, "epochs": 10, "copies": 2, "batch_size": 64, "lr": 0.5})
    result = linear_probe(_Flatten(), images[:500], labels[:500], {"test": (images[500:], labels[500:])},
                          lambda x: x - 0.5, lc, num_classes=3, verbose=False)
    assert list(result) == ["test"] and list(result["test"]) == ["linear:sgd:10ep:lr=0.5:batch_size=64:copies=2"]
    top1, top5 = result["test"]["linear:sgd:10ep:lr=0.5:batch_size=64:copies=2"]
    assert top1 > 95 and top5 == 100


def test_optimizer_groups_give_a_module_its_own_weight_decay_lr_scale_and_static_lr():
    model = nn.ModuleDict({"body": nn.Linear(4, 4), "head": nn.Linear(4, 2), "probe": nn.Linear(4, 3)})
    cfg = OmegaConf.create({"optimizer": "sgd", "weight_decay": 1e-4, "momentum": 0.9})
    special = [(model["head"], {"static_lr": True}), (model["probe"], {"lr_scale": 0.5, "weight_decay": 0.0})]
    optimizer = build_optimizer(model, cfg, 0.1, special)
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 6  # every parameter exactly once
    body, head, probe = (by_param[id(model[k].weight)] for k in ("body", "head", "probe"))
    assert body["weight_decay"] == 1e-4 and "static_lr" not in body and "lr_scale" not in body
    assert head["static_lr"] and head["weight_decay"] == 1e-4
    assert probe["lr_scale"] == 0.5 and probe["weight_decay"] == 0.0


@requires_cifar
@pytest.mark.slow
def test_linear_probe_and_online_linear_on_a_trained_convnet(tmp_path, cifar10_cached):
    db = tmp_path / "r.duckdb"
    run_harness("store.keep_checkpoints=all",  # the test reads the optimizer state afterwards
                "method=simsiam", "backbone=convnet", "dataset.train_size=2000", "dataset.test_size=500",
                "trainer.batch_size=256", "trainer.epochs=2", "trainer.warmup_epochs=0", "trainer.optimizer=adam",
                "trainer.lr=5e-4", "trainer.classifier_lr=1e-2", "eval.every=0", f"trainer.num_threads={THREADS}",
                "eval.online_linear=true", "eval.linear.enabled=true", "eval.linear.epochs=30",
                "eval.linear.copies=4", f"store.path={db}", "hydra.run.dir=${store.path}.hydra", timeout=1800)
    store = Store(db)
    evals = {r["protocol"]: r["top1"] for r in store.query("SELECT protocol, top1 FROM evals WHERE split = 'test'")}
    print(evals)
    linear, online, knn = evals["linear:sgd:30ep:copies=4"], evals["online_linear"], evals["knn:cosine:k=200:T=0.1"]
    assert linear > 30  # chance is 10%
    assert linear > knn - 3  # a trained linear head is at least about as good as k-NN on the same features
    assert online > 20
    metrics = {r["name"] for r in store.query("SELECT DISTINCT name FROM metrics")}
    assert {"online_linear_loss", "online_linear_train_acc", "online_linear_top1"} <= metrics
    # The optimizer kept the classifier's own lr ratio and the predictor's static lr.
    state = torch.load(next((tmp_path / "r.duckdb.runs").glob("*/checkpoint.pt")), weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert any(g.get("static_lr") and g["lr"] == pytest.approx(5e-4) for g in groups)
    assert any(g.get("lr_scale") == pytest.approx(20.0) and g["weight_decay"] == 0.0 for g in groups)


def test_bad_linear_probe_settings_are_refused_with_the_field_value_and_allowed_values():
    cfg = compose(["eval.linear.enabled=true", "eval.linear.augment=rotate", "eval.linear.epochs=0",
                   "eval.linear.milestones=[0.5,1.5]", "trainer.classifier_lr=-1"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    text = str(e.value)
    for fragment in ("eval.linear.augment = 'rotate'", "one of none, flip, crop_flip", "eval.linear.epochs = 0",
                     "eval.linear.milestones.1 = 1.5", "trainer.classifier_lr = -1"):
        assert fragment in text
