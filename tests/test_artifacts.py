"""build_once: one process builds, a concurrent one waits and reuses; keys follow the config."""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from harness.artifacts import MANIFEST, artifact_path, artifacts_root, build_once, config_hash, dataset_identity
from tests.events import wait_for


def _held_build(path: str, log: str, started: str, release: str, stderr: str) -> None:
    """build_once whose build, once started, goes on only when the file `release` exists; the process's
    stderr (where build_once says it waits) goes to the file `stderr`."""
    sys.stderr = open(stderr, "w", buffering=1)

    def build(tmp: Path) -> None:
        Path(started).touch()
        with open(log, "a") as f:
            f.write("built\n")
        while not Path(release).exists():
            time.sleep(0.01)
        (tmp / "value.txt").write_text("42")

    build_once(Path(path), build)


def test_second_process_waits_for_the_first_and_reuses(tmp_path):
    path, log, started, release = tmp_path / "kind" / "abc", tmp_path / "log", tmp_path / "started", tmp_path / "go"
    ctx = mp.get_context("spawn")
    first = ctx.Process(target=_held_build, args=(str(path), str(log), str(started), str(release),
                                                  str(tmp_path / "first.err")))
    first.start()
    wait_for("the first build to start", lambda: started.exists() or not first.is_alive())
    assert first.is_alive() and not (path / MANIFEST).exists()
    second_err = tmp_path / "second.err"
    second = ctx.Process(target=_held_build, args=(str(path), str(log), str(started), str(release), str(second_err)))
    second.start()
    # The first build goes on only once the second has said it waits for it.
    wait_for("the second to wait", lambda: not second.is_alive() or (second_err.exists() and "being built by another "
                                                                      "job; waiting" in second_err.read_text()))
    release.touch()
    first.join(60)
    second.join(60)
    assert first.exitcode == 0 and second.exitcode == 0
    assert log.read_text() == "built\n"  # built exactly once
    assert "[artifact] reusing" in second_err.read_text()
    assert (path / "value.txt").read_text() == "42"
    assert not list(path.parent.glob(".*.tmp"))


def test_failed_build_leaves_nothing_and_the_next_one_builds(tmp_path):
    path = tmp_path / "kind" / "h"

    def broken(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("killed")

    try:
        build_once(path, broken)
    except RuntimeError:
        pass
    assert not path.exists()
    build_once(path, lambda tmp: (tmp / "ok").write_text("1"), config={"a": 1})
    assert (path / "ok").exists() and not list(path.parent.glob(".*.tmp"))


def test_paths_and_keys():
    cfg = OmegaConf.create({"store": {"path": "/x/results.duckdb"}, "artifacts": {"dir": None},
                            "dataset": {"name": "cifar10", "train_size": 1000, "val_size": 0, "subset_seed": 0,
                                        "root": "/somewhere", "archive": "auto", "mean": [0.5]}})
    assert artifacts_root(cfg) == Path("/x/results.duckdb.artifacts")
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash(OmegaConf.create({"b": [1, 2], "a": 1}))
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    ident = dataset_identity(cfg.dataset)
    assert ident == {"name": "cifar10", "train_size": 1000, "val_size": 0, "subset_seed": 0}
    p = artifact_path(cfg, "score_net", {"net": 1, "data": ident})
    assert p.parent == Path("/x/results.duckdb.artifacts/score_net")
    cfg.artifacts.dir = "/shared/art"
    assert artifact_path(cfg, "score_net", {"net": 1, "data": ident}) == Path("/shared/art/score_net") / p.name


def test_a_build_neither_moves_nor_depends_on_the_callers_rng(tmp_path):
    """What a builder draws comes from the artifact's own seed, and the caller's global RNG is where
    it was: the job that builds trains as the jobs that reuse."""
    import torch

    def build(tmp):
        torch.save(torch.rand(4), tmp / "draw.pt")
        torch.manual_seed(123)  # a builder that reseeds (as the DDPM trainer does) changes nothing outside

    drawn = []
    for caller_seed, folder in ((0, "one"), (1, "two")):
        torch.manual_seed(caller_seed)
        expected_next = torch.rand(3, generator=torch.Generator().manual_seed(caller_seed))
        path = build_once(tmp_path / folder / "0123456789abcdef", build)
        assert torch.equal(torch.rand(3), expected_next)
        drawn.append(torch.load(path / "draw.pt", weights_only=True))
    assert torch.equal(drawn[0], drawn[1])  # same artifact hash, same draws, whichever job built it
    torch.manual_seed(5)
    state = torch.get_rng_state()
    path = build_once(tmp_path / "three" / "fedcba9876543210", build, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.load(path / "draw.pt", weights_only=True),
                       torch.rand(4, generator=torch.Generator().manual_seed(7)))


def test_an_image_folder_artifacts_build_time_goes_to_the_runs_on_those_files(tmp_path):
    """The score net's manifest keys its data by the folder's files (dataset_identity), and a run's stored config
    carries the same manifest (experiment_config): runs on the folder or a copy of it share the build time, a
    run on another folder with the same settings does not."""
    import json
    import shutil

    import numpy as np
    from PIL import Image

    from harness.core.data.datasets import folder_manifest
    from harness.jobs.config import compose, experiment_config
    from harness.store import Store
    from leaderboard import artifacts, data
    from tests.leaderboard_util import add_run

    def tree(root, seed):
        rng = np.random.default_rng(seed)
        for split in ("train", "test"):
            for c in range(2):
                (root / split / f"c{c}").mkdir(parents=True)
                for i in range(3):
                    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                        root / split / f"c{c}" / f"{i}.png")

    tree(tmp_path / "a", 0)
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    tree(tmp_path / "b", 1)
    folder_manifest.cache_clear()
    store = Store(tmp_path / "r.duckdb")
    configs = {name: compose(["backbone=convnet", "weighting=scorecl_tiny", "dataset=imagefolder",
                              f"dataset.root={tmp_path / name}", f"store.path={store.path}"])
               for name in ("a", "copy", "b")}
    for name, cfg in configs.items():
        add_run(store, name, 50.0, dataset="imagefolder", weighting="scorecl",
                row={"config": json.dumps(experiment_config(cfg), sort_keys=True, default=str)})
    # The manifest exactly as the ScoreCL add-on has build_once write it (methods/scorecl/addon.py).
    cfg = configs["a"]
    key = {"score_net": cfg.weighting.score_net, "data": dataset_identity(cfg.dataset)}
    built = build_once(artifact_path(cfg, "score_net", key), lambda folder: (folder / "model.pt").write_bytes(b"x"),
                       config=key, what="score network")
    manifest = json.loads((built / MANIFEST).read_text())
    manifest["build_seconds"] = 3600.0  # an hour, so each user's share is exact
    (built / MANIFEST).write_text(json.dumps(manifest))
    with store.connect() as con:
        data.prepare(con)
        found, per_config = artifacts.shares(con, store.path)
        key_of = dict(con.execute("SELECT run_id, config_key FROM run_ident").fetchall())
    assert [m["runs"] for m in found] == [2]
    # The folder and its copy are one configuration (where files are read from is not part of it): an hour
    # over its two runs, half an hour per run. The other folder's configuration gets nothing.
    assert key_of["a"] == key_of["copy"] != key_of["b"]
    assert per_config == {key_of["a"]: 0.5}


def test_a_synthetic_set_from_a_given_diffusion_model_is_matched_to_its_runs():
    """A synthetic set generated with a hub model (or a local path) is keyed by that model
    (methods/clsp/generate.synthetic_identity), not by a training recipe: its runs still share its time."""
    import json

    from harness.jobs.config import compose, experiment_config
    from leaderboard.artifacts import _within, run_view
    from methods.clsp.generate import synthetic_identity

    for given in ("positives.diffusion.hub_id=google/ddpm-cifar10-32", "positives.diffusion.path=/data/ddpm"):
        cfg = compose(["backbone=convnet", "positives=clsp", given])
        key = json.loads(json.dumps(synthetic_identity(cfg), default=str))
        tree = json.loads(json.dumps(experiment_config(cfg), default=str))
        assert _within(key, run_view("synthetic", tree))
        other = compose(["backbone=convnet", "positives=clsp", given + "-other"])
        assert not _within(key, run_view("synthetic", json.loads(json.dumps(experiment_config(other), default=str))))
