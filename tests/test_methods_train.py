"""Every method learns: 3 epochs with the ConvNet on a few thousand real CIFAR-10 images, run as a
user runs it, without NaN, with a falling loss and a k-NN accuracy above the same network's at
random initialisation.

To add a method to the check, add its name to METHODS (and, if the small budget needs it, its
overrides to BUDGET_OVERRIDES).

The budget is tiny (45 steps), so the test uses Adam at lr 1e-3 for every method: with the papers'
LARS/SGD settings and warm-up, 45 steps of a ConvNet do not move k-NN off the random-init baseline
(random-init ConvNet features are already a strong k-NN baseline, about 30% here). The methods'
own optimizer settings are checked in test_methods_a.py's YAML test; the README's k-NN table gives
the numbers with both.
"""

import pytest
import torch

from harness.store import Store
from tests.conftest import requires_cifar, run_harness

pytestmark = [requires_cifar, pytest.mark.slow]

METHODS = ["simclr", "simsiam", "wmse", "vicreg"]
BUDGET = ("backbone=convnet", "dataset.train_size=4000", "dataset.test_size=1000", "trainer.batch_size=256",
          "trainer.epochs=3", "trainer.warmup_epochs=0", "trainer.optimizer=adam", "trainer.lr=1e-3",
          "eval.every=0", "trainer.num_threads=2", "hydra.run.dir=${store.path}.hydra")
# Measured here (4000/1000 images, random init 30.1): SimSiam at Adam 1e-3 31.1, 3e-3 26.0, 5e-4 34.6;
# VICReg at Adam 1e-3 28.8, 3e-4 40.3. Lower lrs suit the non-contrastive losses' 45-step budget.
BUDGET_OVERRIDES: dict[str, tuple[str, ...]] = {"simsiam": ("trainer.lr=5e-4",), "vicreg": ("trainer.lr=3e-4",)}
PRIMARY = "knn:cosine:k=200:T=0.1"


def random_init_knn(overrides: tuple[str, ...]) -> float:
    """k-NN top-1 of the run's network before training: same seed, same initialisation, same images."""
    from harness.config import compose, instantiate
    from harness.data.augment import ViewMaker
    from harness.data.datasets import load_dataset
    from harness.evaluate import knn_evaluate

    cfg = compose(list(overrides))
    data = load_dataset(cfg.dataset)
    torch.manual_seed(int(cfg.seed) * 7919)  # as harness.run seeds rank 0 before building the model
    model = instantiate(cfg.method, instantiate(cfg.backbone))
    plain = ViewMaker(cfg.augment, cfg.dataset.mean, cfg.dataset.std, torch.device("cpu"), seed=0).plain
    evals = knn_evaluate(model.backbone, data.train_x, data.train_y, {"test": (data.test_x, data.test_y)}, plain,
                         [(200, 0.1)], data.num_classes)
    return evals["test"][PRIMARY][0]


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_three_epochs_and_beats_random_init(method, tmp_path, cifar10_cached):
    overrides = (f"method={method}", *BUDGET, *BUDGET_OVERRIDES.get(method, ()))
    db = tmp_path / "r.duckdb"
    run_harness(*overrides, f"store.path={db}", timeout=1800)  # generous: a shared CPU can be slow
    store = Store(db)
    assert [r["status"] for r in store.query("SELECT status FROM runs")] == ["completed"]
    losses = [r["value"] for r in store.query("SELECT value FROM metrics WHERE name = 'loss' ORDER BY epoch")]
    trained = store.query(f"SELECT top1 FROM evals WHERE protocol = '{PRIMARY}' AND split = 'test'")[0]["top1"]
    baseline = random_init_knn(overrides)
    print(f"{method}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, k-NN random init {baseline:.1f} -> {trained:.1f}")
    assert len(losses) == 3 and all(v == v for v in losses)  # no NaN (a diverged run would not complete)
    assert losses[-1] < losses[0]
    assert trained > baseline + 1.0
