"""Run keys name the whole experiment, and the same key gives the same run.

- A job that builds an artifact (here ScoreCL's score network) trains exactly as a job that reuses
  it: building runs on an RNG of its own (harness/rng.py) and add-ons are seeded from the run seed.
- An image folder's identity (a manifest of its files) is in the key; where CIFAR is read from is not.
- The world size is in the key exactly when it changes the experiment (trainer.sync_bn=false).
"""

from __future__ import annotations

import pytest

from harness.config import compose, run_key
from tests.conftest import requires_cifar

TRAIN_NAMES = ("loss", "loss_pair", "online_linear_loss", "online_linear_train_acc", "weight_mean", "weight_std",
               "score_diff_mean", "knn_top1", "online_linear_top1")


@requires_cifar
def test_a_run_that_builds_an_artifact_trains_as_one_that_reuses_it(tmp_path, capfd, cifar10_cached):
    """Two runs with one key and seed; the first builds the score net, the second (force=true)
    reuses it: their first epochs are identical, online classifier included."""
    from harness.run import run
    from harness.store import Store

    store = tmp_path / "results.duckdb"
    cfg = compose(["backbone=convnet", "weighting=scorecl_tiny", "eval.online_linear=true", "eval.every=1",
                   "dataset.train_size=256", "dataset.test_size=100", "trainer.batch_size=128",
                   "trainer.epochs=1", "trainer.warmup_epochs=0", "trainer.num_threads=2", "force=true",
                   f"store.path={store}"])
    run(cfg)
    assert "[artifact] building score network" in capfd.readouterr().err
    run(cfg)
    assert "[artifact] building score network" not in capfd.readouterr().err
    runs = Store(str(store)).query("SELECT run_id, run_key FROM runs WHERE status = 'completed' ORDER BY started_at")
    assert len(runs) == 2 and runs[0]["run_key"] == runs[1]["run_key"] == run_key(cfg)

    def first_epoch(run_id: str) -> dict[str, float]:
        rows = Store(str(store)).query("SELECT name, value FROM metrics WHERE run_id = ? AND epoch = 0", [run_id])
        return {r["name"]: r["value"] for r in rows if r["name"] in TRAIN_NAMES}

    built, reused = first_epoch(runs[0]["run_id"]), first_epoch(runs[1]["run_id"])
    assert set(built) == set(TRAIN_NAMES)
    assert built == reused
