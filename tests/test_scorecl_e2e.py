"""ScoreCL on the real CIFAR-10: the founding observation's sign, the shared score-net artifact
(two real processes), and methods training with weighting=scorecl."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, harness_env, requires_cifar, run_harness
from tests.events import read_until, wait_for

pytestmark = [pytest.mark.slow, requires_cifar]

# Small jobs: the tiny score-net preset, the ConvNet, a few hundred to a few thousand images.
SMALL = ("backbone=convnet", "trainer.warmup_epochs=0", "eval.every=1", "weighting=scorecl_tiny",
         "hydra.run.dir=${store.path}.hydra/${now:%H-%M-%S-%f}")


def _store(path: Path):
    from harness.store import Store

    return Store(str(path))


def test_score_difference_grows_with_augmentation_strength(tmp_path, cifar10_cached):
    """The paper's observation, small: a score net trained here on real images, 3 strength levels."""
    from benchmarks.scorecl_observation import measure, pipelines
    from harness.core import distributed
    from harness.core.data.datasets import load_dataset
    from harness.jobs.config import compose, instantiate

    cfg = compose(["weighting=scorecl_tiny", "dataset.train_size=500", f"store.path={tmp_path}/r.duckdb"])
    data = load_dataset(cfg.dataset)
    addon = instantiate(cfg.weighting, cfg)
    addon.setup(data, distributed.DistInfo())
    axes = pipelines(levels_crop=(0.8, 0.4, 0.1), levels_jitter=(0.2, 0.6, 1.0))
    results = measure(addon._frozen[0], data.test_x[:64], float(cfg.weighting.sigma), axes=axes)
    for axis in ("crop", "jitter"):
        r = results[axis]["vector"]
        assert r["rho"] > 0.2, (axis, r)
        assert r["means"][0] < r["means"][-1], (axis, r)


def _job(store: Path, seed: int, *extra: str) -> subprocess.Popen:
    overrides = [*SMALL, f"store.path={store}", f"seed={seed}", "dataset.train_size=512", "dataset.test_size=100",
                 "trainer.batch_size=256", "trainer.epochs=1", *extra]
    return subprocess.Popen([sys.executable, "-m", "harness", *overrides], cwd=REPO, env=harness_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_jobs_share_one_score_net_and_the_second_waits_for_the_first(tmp_path):
    """Two runs (seeds 0 and 1) with the same score-net config: one trains it, the other, started
    while it is being trained, waits and then reuses it."""
    store = tmp_path / "results.duckdb"
    longer = "weighting.score_net.epochs=4"  # a build of seconds: the freeze below lands inside it
    first = _job(store, 0, longer)
    folder = Path(str(store) + ".artifacts") / "score_net"
    # The first job is training the score net (its temporary folder exists): freeze it there, so that the
    # second starts while the net is being built however fast either job goes, and let it go on only
    # once the second has said it waits.
    wait_for("the first job to build the score net", lambda: first.poll() is not None or list(folder.glob(".*.tmp")),
             every=0.05)
    assert first.poll() is None, first.communicate()
    first.send_signal(signal.SIGSTOP)
    try:
        second = _job(store, 1, longer)
        waiting = read_until(second.stderr, lambda line: "being built by another job; waiting" in line)
    finally:
        first.send_signal(signal.SIGCONT)
    out1, err1 = first.communicate(timeout=1800)
    out2, err2 = second.communicate(timeout=1800)
    err2 = waiting + err2
    assert first.returncode == 0, err1[-3000:]
    assert second.returncode == 0, err2[-3000:]
    assert "[artifact] building score network" in err1
    assert "being built by another job; waiting" in err2, err2[-3000:]
    assert "[artifact] reusing score network" in err2
    assert "building score network" not in err2 and "[score_net] epoch" not in err2
    built = [p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir()]
    assert len(built) == 1 and not list(folder.glob(".*.tmp"))
    runs = _store(store).query("select seed, status from runs order by seed")
    assert [(r["seed"], r["status"]) for r in runs] == [(0, "completed"), (1, "completed")]
    # weighting=scorecl_tiny's YAML says `name: scorecl`: the row also keeps the option chosen, and `show` uses it.
    variants = _store(store).query("select distinct weighting, weighting_variant, positives_variant from runs")
    assert [tuple(r.values()) for r in variants] == [("scorecl", "scorecl_tiny", "none")]
    from leaderboard.show import show

    assert "scorecl_tiny" in show(store, include_all=False)


METHODS = ["simclr", "simsiam", "wmse", "vicreg"]  # the paper's four bases; add any method here


@pytest.fixture(scope="module")
def scorecl_sweep(tmp_path_factory):
    """One sweep over the methods (one process, one score net built once and shared) into one store; each
    test below checks its own method's run. What they check (finite losses, the weights' statistics per
    epoch) does not need learning, so the runs are small: 512 images, 2 steps an epoch, 3 epochs, and
    projectors 512 wide (every one of the four has the key; on a CPU their 1024-2048 widths cost more
    than the ConvNet)."""
    folder = tmp_path_factory.mktemp("scorecl_sweep")
    present = [m for m in METHODS if (REPO / "harness" / "conf" / "method" / f"{m}.yaml").exists()]
    store = folder / "results.duckdb"
    run_harness(*SMALL, f"method={','.join(present)}", f"store.path={store}", f"hydra.sweep.dir={folder}/sweep",
                "dataset.train_size=512", "dataset.test_size=100", "trainer.batch_size=256", "trainer.epochs=3",
                "method.proj_hidden_dim=512", "-m",
                check=False, timeout=3600)  # each test reads its own outcome; 4 methods: 4 × the usual limit
    return _store(store)


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_with_scorecl_weights(method, scorecl_sweep):
    if not (REPO / "harness" / "conf" / "method" / f"{method}.yaml").exists():
        pytest.skip(f"method {method} is not in this checkout yet")
    s = scorecl_sweep
    runs = s.query("select run_id, status from runs where method = ?", [method])
    assert [r["status"] for r in runs] == ["completed"]
    run_id = runs[0]["run_id"]
    rows = s.query("select epoch, name, value from metrics where run_id = ? order by epoch", [run_id])
    metrics = {(r["epoch"], r["name"]): r["value"] for r in rows}
    for epoch in (1, 2, 3):  # epochs count from 1 in every table
        assert math.isfinite(metrics[(epoch, "loss")])
        # mean-normalised weights w = 1 + d / mean(d) average exactly 1 + alpha over each batch
        assert metrics[(epoch, "weight_mean")] == pytest.approx(2.0, abs=1e-4)
        assert metrics[(epoch, "weight_min")] < 2.0 < metrics[(epoch, "weight_max")]
        assert metrics[(epoch, "weight_std")] > 0 and metrics[(epoch, "score_diff_mean")] > 0
    top1 = [r["top1"] for r in s.query("select top1 from evals where run_id = ?", [run_id])]
    assert top1 and all(math.isfinite(t) for t in top1)


def test_joint_mode_trains_the_score_net_with_the_method(tmp_path):
    store = tmp_path / "results.duckdb"
    run_harness(*SMALL, "weighting.mode=joint", f"store.path={store}", "store.keep_checkpoints=all",
                "dataset.train_size=512", "dataset.test_size=100", "trainer.batch_size=128", "trainer.epochs=1")
    s = _store(store)
    dsm = [r["value"] for r in s.query("select value from metrics where name = 'dsm_loss'")]
    assert len(dsm) == 1 and 0 < dsm[0] < 2  # ‖ε̂ − ε‖² per entry: about 1 for a fresh net, falling
    assert not (Path(str(store) + ".artifacts") / "score_net").exists()  # nothing pre-trained
    key = s.query("select run_key from runs")[0]["run_key"]
    state = torch.load(Path(str(store) + ".runs") / key / "checkpoint.pt", weights_only=True)
    assert any(k.startswith("0.net.unet.") for k in state["addons"])  # saved with the model, resumable

