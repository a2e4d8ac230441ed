"""Run keys name the whole experiment, and the same key gives the same run.

- A job that builds an artifact (here ScoreCL's score network) trains exactly as a job that reuses
  it: building runs on an RNG of its own (harness/core/rng.py) and add-ons are seeded from the run seed.
- An image folder's identity (a manifest of its files) is in the key; where CIFAR is read from is not.
- The world size is in the key exactly when it changes the experiment (trainer.sync_bn=false).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.artifacts import dataset_identity
from harness.core.data.datasets import folder_manifest
from harness.jobs.config import compose, run_key
from tests.conftest import THREADS, requires_cifar

TRAIN_NAMES = ("loss", "loss_pair", "online_linear_loss", "online_linear_train_acc", "weight_mean", "weight_std",
               "score_diff_mean", "knn_top1", "online_linear_top1")


@requires_cifar
def test_a_run_that_builds_an_artifact_trains_as_one_that_reuses_it(tmp_path, capfd, cifar10_cached):
    """Two runs with one key and seed; the first builds the score net, the second (force=true)
    reuses it: their first epochs are identical, online classifier included."""
    from harness.jobs.run import run
    from harness.store import Store

    store = tmp_path / "results.duckdb"
    cfg = compose(["backbone=convnet", "weighting=scorecl_tiny", "eval.online_linear=true", "eval.every=1",
                   "dataset.train_size=256", "dataset.test_size=100", "trainer.batch_size=128",
                   "trainer.epochs=1", "trainer.warmup_epochs=0", f"trainer.num_threads={THREADS}", "force=true",
                   f"store.path={store}"])
    run(cfg)
    assert "[artifact] building score network" in capfd.readouterr().err
    run(cfg)
    assert "[artifact] building score network" not in capfd.readouterr().err
    runs = Store(str(store)).query("SELECT run_id, run_key FROM runs WHERE status = 'completed' ORDER BY started_at")
    assert len(runs) == 2 and runs[0]["run_key"] == runs[1]["run_key"] == run_key(cfg)

    def first_epoch(run_id: str) -> dict[str, float]:
        rows = Store(str(store)).query("SELECT name, value FROM metrics WHERE run_id = ? AND epoch = 1", [run_id])
        return {r["name"]: r["value"] for r in rows if r["name"] in TRAIN_NAMES}

    built, reused = first_epoch(runs[0]["run_id"]), first_epoch(runs[1]["run_id"])
    assert set(built) == set(TRAIN_NAMES)
    assert built == reused


def image_folder(root: Path, seed: int, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 8) -> Path:
    """A small train/<class>/*.png, test/<class>/*.png tree of random 32×32 images."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", 2)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i:03d}.png")
    return root


def folder_cfg(root: Path, *more: str):
    return compose(["dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=32", *more])


def test_an_image_folder_is_named_by_its_files_not_by_where_it_is(tmp_path):
    a, b = image_folder(tmp_path / "a", seed=0), image_folder(tmp_path / "b", seed=1)
    key_a, key_b = run_key(folder_cfg(a)), run_key(folder_cfg(b))
    assert key_a != key_b
    assert dataset_identity(folder_cfg(a).dataset) != dataset_identity(folder_cfg(b).dataset)
    # A copy elsewhere (new modification times: shutil.copy, not copy2) is the same data.
    moved = shutil.copytree(a, tmp_path / "elsewhere" / "a-copy", copy_function=shutil.copy)
    assert run_key(folder_cfg(moved)) == key_a
    assert dataset_identity(folder_cfg(moved).dataset) == dataset_identity(folder_cfg(a).dataset)
    # Files the loader does not read (outside train/ and test/ class folders, not images) do not count.
    (moved / "README.txt").write_text("notes")
    (moved / "train" / "cat" / "labels.csv").write_text("x")
    folder_manifest.cache_clear()
    assert run_key(folder_cfg(moved)) == key_a
    # A changed image file is other data.
    changed = moved / "train" / "dog" / "003.png"
    before = changed.stat().st_size
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(changed)
    assert changed.stat().st_size != before
    folder_manifest.cache_clear()
    assert run_key(folder_cfg(moved)) != key_a
    # So is an image added, or one renamed.
    folder_manifest.cache_clear()
    shutil.copy(a / "train" / "cat" / "000.png", a / "train" / "cat" / "100.png")
    assert run_key(folder_cfg(a)) != key_a
    folder_manifest.cache_clear()
    (a / "train" / "cat" / "100.png").rename(a / "train" / "dog" / "100.png")
    assert run_key(folder_cfg(a)) not in (key_a, key_b)


def test_two_image_folders_are_two_runs_and_both_stay_on_the_page(tmp_path):
    """The same config on two folders: the second is trained (not skipped as done) and the
    leaderboard's data keeps both results apart."""
    from harness.jobs.run import run
    from harness.store import Store
    from leaderboard import data

    store = tmp_path / "results.duckdb"
    tiny = ["backbone=convnet", "trainer.batch_size=8", "trainer.epochs=1", "trainer.warmup_epochs=0",
            f"trainer.num_threads={THREADS}", "eval.knn=[{k: 5, T: 0.1}]", f"store.path={store}",
            f"dataset.cache_dir={tmp_path / 'cache'}"]
    for name, seed in (("a", 0), ("b", 1)):
        run(folder_cfg(image_folder(tmp_path / name, seed=seed), *tiny))
    runs = Store(str(store)).query("SELECT run_key, status FROM runs ORDER BY started_at")
    assert [r["status"] for r in runs] == ["completed", "completed"]
    assert runs[0]["run_key"] != runs[1]["run_key"]
    with Store(str(store)).connect() as con:
        data.prepare(con)
        configs = [c for c in data.configurations(con) if c["dataset"] == "imagefolder"]
    assert len({c["config_key"] for c in configs}) == 2
    assert all(c["n"] == 1 for c in configs)


def test_where_cifar10_is_read_from_is_not_part_of_the_key():
    archive = compose(["dataset.archive=/data/cifar10-jpeg.tar.xz", "dataset.download=false"])
    torchvision_files = compose(["dataset.root=/data/torchvision", "dataset.archive=null", "dataset.download=false"])
    downloaded = compose(["dataset.cache_dir=/tmp/elsewhere"])
    assert run_key(archive) == run_key(torchvision_files) == run_key(downloaded)
    assert run_key(compose(["dataset.train_size=1000"])) != run_key(archive)  # which images still counts


WORLD_ENV = ("WORLD_SIZE", "SLURM_NTASKS")


@pytest.mark.parametrize("variable", WORLD_ENV)
def test_the_world_size_is_in_the_key_exactly_when_batchnorm_is_per_rank(monkeypatch, variable):
    synced_cfg, per_rank_cfg = compose(["trainer.sync_bn=true"]), compose(["trainer.sync_bn=false"])

    def key(processes: int | None, cfg) -> str:
        for name in (*WORLD_ENV, "SLURM_STEP_ID"):
            monkeypatch.delenv(name, raising=False)
        if processes is not None:
            monkeypatch.setenv(variable, str(processes))
            if variable == "SLURM_NTASKS":
                monkeypatch.setenv("SLURM_STEP_ID", "0")  # a task of an srun step, as in a submitit job
        return run_key(cfg)

    synced = {key(n, synced_cfg) for n in (None, 1, 2, 8)}
    assert len(synced) == 1
    per_rank = [key(n, per_rank_cfg) for n in (None, 1, 2, 8)]
    assert per_rank[0] == per_rank[1]  # one process either way
    assert len(set(per_rank[1:])) == 3
    # Passed in (as the Slurm launcher does for a job it submitted), it wins over the environment.
    monkeypatch.setenv(variable, "2")
    assert run_key(per_rank_cfg, world_size=8) == per_rank[3]
    assert run_key(synced_cfg, world_size=8) in synced


def test_cifar_keys_with_synchronised_batchnorm_keep_their_old_form(monkeypatch):
    """Neither addition touches a CIFAR run with sync_bn=true: its key is the plain config's hash."""
    import hashlib
    import json

    from harness.jobs.config import NOT_IN_RUN_KEY, _drop, to_container

    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = compose(["trainer.sync_bn=true"])
    tree = to_container(cfg)
    for dotted in NOT_IN_RUN_KEY:
        _drop(tree, dotted)
    old = hashlib.sha256(json.dumps(tree, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()
    assert run_key(cfg) == old[:16]


@pytest.mark.parametrize("group,field", [("weighting=scorecl", "weighting.score_net.image_size"),
                                         ("positives=clsp", "positives.diffusion.image_size")])
def test_an_add_on_image_size_left_null_keeps_the_keys_runs_had_before_the_option(group, field):
    """The option came after runs were recorded: while null (the decoded images' own size, what the code
    did before) neither the run key nor the artifact key holds it; set, both change."""
    import hashlib
    import json

    from harness.artifacts import config_hash
    from harness.jobs.config import NOT_IN_RUN_KEY, _drop, to_container
    from methods.clsp.diffusion import model_identity
    from methods.scorecl.addon import score_net_identity

    cfg = compose([group])
    tree = to_container(cfg)
    for dotted in (*NOT_IN_RUN_KEY, field):
        _drop(tree, dotted)
    old = hashlib.sha256(json.dumps(tree, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()
    assert run_key(cfg, 1) == old[:16]
    sized = compose([group, f"{field}=32"])
    assert run_key(sized, 1) != run_key(cfg, 1)
    artifact = score_net_identity if group.startswith("weighting") else model_identity
    assert "image_size" not in json.dumps(artifact(cfg))
    assert config_hash(artifact(sized)) != config_hash(artifact(cfg))
