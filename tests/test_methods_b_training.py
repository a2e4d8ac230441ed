"""Each momentum/queue method learns: 3 epochs with the ConvNet on real CIFAR-10 images, run as a user
runs it, end without NaN, with a falling loss and a k-NN accuracy above the random-init backbone's.

The optimizer is overridden to Adam lr 1e-3 for this check: with a ConvNet and ~50 steps the papers'
SGD/LARS settings (tuned for ResNet-18 and 1000 epochs) barely move the backbone. Queues are shrunk
to fit the tiny run (a 65,536-entry support set over 2,000 images would hold only random init).
"""

from __future__ import annotations

import math

import pytest
import torch

from harness.config import compose, instantiate
from harness.data.augment import ViewMaker
from harness.data.datasets import load_dataset
from harness.evaluate import knn_evaluate, knn_protocol
from harness.store import Store
from tests.conftest import requires_cifar, run_harness

pytestmark = [requires_cifar, pytest.mark.slow]

DATA = ("backbone=convnet", "dataset.train_size=2000", "dataset.test_size=1000")
TRAIN = ("trainer.batch_size=128", "trainer.epochs=3", "trainer.warmup_epochs=0", "trainer.optimizer=adam",
         "trainer.lr=1e-3", "trainer.weight_decay=1e-5", "eval.every=0", "trainer.num_threads=2")
QUEUE = {"mocov2": 512, "sce": 512, "nnclr": 512, "all4one": 512}
PROTOCOL = knn_protocol(200, 0.1)


@pytest.fixture(scope="module")
def random_init_knn(cifar10_cached) -> float:
    """k-NN top-1 of the backbone every run starts from (the harness seeds with seed·7919 before building it)."""
    cfg = compose(list(DATA))
    data = load_dataset(cfg.dataset)
    torch.manual_seed(0)
    backbone = instantiate(cfg.backbone)
    plain = ViewMaker(cfg.augment, cfg.dataset.mean, cfg.dataset.std, torch.device("cpu"), seed=0).plain
    result = knn_evaluate(backbone, data.train_x, data.train_y, {"test": (data.test_x, data.test_y)}, plain,
                          [(200, 0.1)], data.num_classes)
    return result["test"][PROTOCOL][0]


@pytest.mark.parametrize("name", ["mocov2", "sce", "byol", "nnclr", "all4one"])
def test_momentum_and_queue_method_learns_in_three_epochs(name, tmp_path, random_init_knn):
    db = tmp_path / "r.duckdb"
    queue = [f"method.queue_size={QUEUE[name]}"] if name in QUEUE else []
    run_harness(f"method={name}", *DATA, *TRAIN, *queue, f"store.path={db}",
                f"hydra.run.dir={tmp_path}/hydra", timeout=900)
    store = Store(db)
    assert [r["status"] for r in store.query("SELECT status FROM runs")] == ["completed"]
    losses = [r["value"] for r in store.query("SELECT value FROM metrics WHERE name = 'loss' ORDER BY epoch")]
    knn = store.query(f"SELECT top1 FROM evals WHERE protocol = '{PROTOCOL}' AND split = 'test'")[0]["top1"]
    print(f"\n{name}: loss {' → '.join(f'{v:.3f}' for v in losses)} | k-NN {knn:.2f} vs random init "
          f"{random_init_knn:.2f}")
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    # A queue starts as random unit vectors (easy negatives, random neighbours), so the first epoch's
    # mean loss of a queue method is artificially low; its first epoch with real keys is the second.
    assert losses[-1] < (losses[1] if name in QUEUE else losses[0])
    assert knn > random_init_knn
