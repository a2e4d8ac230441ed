"""Bad input and a hostile environment are refused in one line before any data loads (issue 14, point 6).

Sizes are checked against the images a dataset has: CIFAR's known counts, the decoded-tensor cache
when there is one, else an image folder's listing. The read-only file system is a real read-only
mount (tmpfs), since root ignores a folder's mode bits.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from harness.core.data.datasets import load_dataset, load_full, size_errors, split_counts
from harness.jobs.config import ConfigError, compose, validate
from tests.conftest import REPO, harness_env, run_harness


def refused(*overrides: str) -> str:
    """The one-line message validate gives for `overrides` (it must refuse them)."""
    with pytest.raises(ConfigError) as e:
        validate(compose(list(overrides)))
    assert len(e.value.problems) == 1, str(e.value)
    assert "\n" not in str(e.value)
    return str(e.value)


# The CIFAR-10 counts are its known ones unless a cache says otherwise: use an empty cache folder
# and torchvision's download as the source (nothing is downloaded by validate).
CIFAR10 = ("dataset.archive=null", "dataset.download=true")


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))


def test_a_batch_larger_than_the_training_images_is_refused():
    assert refused(*CIFAR10, "trainer.batch_size=50001") == (
        "invalid config: trainer.batch_size = 50001 is not allowed: expected at most 50000, the training images "
        "(cifar10's known counts)")
    assert "expected at most 1000, the training images (dataset.train_size=1000)" in refused(
        *CIFAR10, "dataset.train_size=1000", "trainer.batch_size=1024")
    assert "at most 45000, the training images (cifar10's known counts after the dataset.val_size=5000 hold-out)" \
        in refused(*CIFAR10, "dataset.val_size=5000", "trainer.batch_size=45056")
    validate(compose([*CIFAR10, "dataset.val_size=5000", "trainer.batch_size=45000"]))  # exactly all is allowed
    assert "at most 500" in refused("dataset=cifar100", "dataset.train_size=500", "trainer.batch_size=512")


def test_subsets_larger_than_a_class_holds_are_refused():
    assert refused(*CIFAR10, "dataset.test_size=10001") == (
        "invalid config: dataset.test_size = 10001 is not allowed: expected at most 10000, a class-balanced subset "
        "of 10 classes of test images, 1000 each, 10000 in all (cifar10's known counts)")
    assert "dataset.val_size = 50000 is not allowed: expected at most 49999, a class-balanced hold-out that leaves " \
           "training images" in refused(*CIFAR10, "dataset.val_size=50000")
    # What the hold-out leaves is what the training subset is drawn from: 4500 a class.
    assert "dataset.train_size = 45001 is not allowed: expected at most 45000" in refused(
        *CIFAR10, "dataset.val_size=5000", "dataset.train_size=45001")
    assert "100 classes of test images, 100 each" in refused("dataset=cifar100", "dataset.test_size=10001")
    assert "dataset.val_size = 50000" in refused("dataset=cifar100", "dataset.val_size=50000")
    validate(compose([*CIFAR10, "dataset.val_size=5000", "dataset.train_size=45000", "dataset.test_size=10000"]))


@pytest.mark.parametrize("value, allowed", [("0", "an integer >= 1"), ("-256", "an integer >= 1")])
def test_base_batch_below_one_is_refused(value, allowed):
    assert refused(f"trainer.base_batch={value}") == \
        f"invalid config: trainer.base_batch = {value} is not allowed: expected {allowed}"


@pytest.mark.parametrize("value, shown, allowed", [("inf", "inf", "a finite number > 0"),
                                                   ("-inf", "-inf", "a finite number > 0"),
                                                   ("nan", "nan", "a finite number > 0"),
                                                   ("-0.1", "-0.1", "a number > 0"), ("0", "0", "a number > 0")])
def test_an_lr_that_is_not_finite_and_positive_is_refused(value, shown, allowed):
    assert refused(f"trainer.lr={value}") == f"invalid config: trainer.lr = {shown} is not allowed: expected {allowed}"


def test_a_negative_summary_wait_is_refused():
    assert refused("store.summary_wait_s=-1") == \
        "invalid config: store.summary_wait_s = -1 is not allowed: expected a number >= 0 or null"
    validate(compose(["store.summary_wait_s=0"]))


def test_a_seed_must_fit_the_stores_32_bit_column():
    assert refused("seed=3000000000") == \
        "invalid config: seed = 3000000000 is not allowed: expected an integer >= 0 and <= 2147483647"
    assert "seed = 2147483648" in refused("seed=2147483648")
    validate(compose(["seed=2147483647"]))


def test_a_store_under_a_file_is_refused(tmp_path):
    (tmp_path / "plain").write_text("a file, not a folder")
    path = tmp_path / "plain" / "sub" / "results.duckdb"
    assert refused(f"store.path={path}") == (f"invalid config: store.path = '{path}' is not allowed: expected a "
                                             f"path whose folders can be created: {tmp_path / 'plain'} is a file")
    assert "store.runs_dir = " in refused(f"store.path={tmp_path}/r.duckdb", f"store.runs_dir={tmp_path}/plain/runs")
    validate(compose([f"store.path={tmp_path}/new/deeper/r.duckdb"]))  # folders that can be created are fine
    assert not (tmp_path / "new").exists()  # and validate creates none


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder on a real read-only mount (tmpfs, else a bind mount remounted read-only)."""
    folder, source = tmp_path / "ro", tmp_path / "ro-source"
    folder.mkdir()
    source.mkdir()
    attempts = [[["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)]],
                [["mount", "--bind", str(source), str(folder)], ["mount", "-o", "remount,ro,bind", str(folder)]]]
    why = []
    for steps in attempts:
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.SubprocessError) as e:
                done = subprocess.CompletedProcess(step, 1, "", str(e))
            if done.returncode != 0:
                why.append(f"{' '.join(step[:3])}: {done.stderr.strip()}")
                subprocess.run(["umount", str(folder)], capture_output=True)
                break
        else:
            break
    else:
        pytest.skip("no read-only mount can be made here (root ignores mode bits, so nothing else shows "
                    "a read-only file system): " + "; ".join(why))
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_a_store_on_a_read_only_file_system_is_refused(read_only_dir):
    path = read_only_dir / "sub" / "results.duckdb"
    assert refused(f"store.path={path}") == (
        f"invalid config: store.path = '{path}' is not allowed: expected a path on a writable file system: "
        f"{read_only_dir} is on a read-only one")


def test_the_command_line_says_one_line_and_exits_2(tmp_path, read_only_dir):
    for overrides, line in [
        ((f"store.path={read_only_dir}/r.duckdb",),
         f"error: invalid config: store.path = '{read_only_dir}/r.duckdb' is not allowed: expected a path on a "
         f"writable file system: {read_only_dir} is on a read-only one"),
        ((f"store.path={tmp_path}/r.duckdb", "method=nosuch"),  # an unknown option of a config group, too
         "error: invalid config: method = 'nosuch' is not allowed: expected one of all4one, byol, mocov2, nnclr, "
         "sce, simclr, simsiam, vicreg, wmse"),
        ((f"store.path={tmp_path}/r.duckdb", "trainer.epoch=3"),  # a mistyped key: the closest one that exists
         "error: invalid config: trainer.epoch=3: trainer.epoch is not a config key; did you mean trainer.epochs?"),
        ((f"store.path={tmp_path}/r.duckdb", "method=mocov2", "method.queue_siz=64"),  # the chosen method's keys
         "error: invalid config: method.queue_siz=64: method.queue_siz is not a config key; did you mean "
         "method.queue_size?"),
        ((f"store.path={tmp_path}/r.duckdb", *CIFAR10, "trainer.batch_size=60000"),
         "error: invalid config: trainer.batch_size = 60000 is not allowed: expected at most 50000, the training "
         "images (cifar10's known counts)"),
    ]:
        proc = run_harness(*overrides, f"hydra.run.dir={tmp_path}/hydra", check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines() == [line]  # no traceback, nothing else
        assert not (tmp_path / "r.duckdb").exists() and not (tmp_path / "r.duckdb.runs").exists()


# ------------------------------------------------------------------ an image folder: listed or cached counts
def image_tree(root, train: list[int], test: list[int], images: bool = False) -> None:
    """train/c<i>/ and test/c<i>/ with the given number of files a class; real PNGs only when `images`."""
    rng = np.random.default_rng(0)
    for split, counts in (("train", train), ("test", test)):
        for c, n in enumerate(counts):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                if images:
                    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
                else:
                    (folder / f"{i}.png").write_bytes(b"never decoded")  # the listing is all that is read


def folder_cfg(tmp_path, root, **sizes):
    base = {"name": "imagefolder", "root": str(root), "archive": None, "download": False,
            "cache_dir": str(tmp_path / "cache"), "image_size": 8, "train_size": None, "test_size": None,
            "val_size": 0, "subset_seed": 0}
    return OmegaConf.create({**base, **sizes})


def test_an_image_folder_is_counted_from_its_listing(tmp_path):
    image_tree(tmp_path / "tree", train=[6, 4, 5], test=[3, 2, 2])
    (tmp_path / "tree" / "train" / "c0" / "notes.txt").write_text("not an image")
    (tmp_path / "tree" / "test" / "empty").mkdir()  # a class folder without images is no class
    counts = split_counts(folder_cfg(tmp_path, tmp_path / "tree"))
    assert (counts.train, counts.test) == ([6, 4, 5], [3, 2, 2]) and "listing" in counts.source
    root = f"dataset.root={tmp_path / 'tree'}"
    message = refused("dataset=imagefolder", root, "trainer.batch_size=16")
    assert "trainer.batch_size = 16 is not allowed: expected at most 15, the training images (the listing of" in message
    assert "dataset.test_size = 7 is not allowed: expected at most 6, a class-balanced subset of 3 classes of test " \
           "images, the smallest with 2, 7 in all" in refused("dataset=imagefolder", root, "trainer.batch_size=8",
                                                              "dataset.test_size=7")
    validate(compose(["dataset=imagefolder", root, "trainer.batch_size=15", "dataset.test_size=6"]))


def test_checked_sizes_are_exactly_those_the_loader_can_draw(tmp_path):
    """Uneven classes: a size is refused exactly when load_dataset's seeded balanced subset fails."""
    image_tree(tmp_path / "tree", train=[3, 5, 8], test=[2, 4, 1], images=True)
    load_full(folder_cfg(tmp_path, tmp_path / "tree"))  # the cache: counts now come from it
    assert "cached dataset" in split_counts(folder_cfg(tmp_path, tmp_path / "tree")).source
    for val_size in (0, 3, 7, 9, 10, 15):
        for train_size in (None, 1, 4, 6, 7, 8, 9):
            for test_size in (None, 3, 4, 5):
                for subset_seed in (0, 1):
                    ds = folder_cfg(tmp_path, tmp_path / "tree", val_size=val_size, train_size=train_size,
                                    test_size=test_size, subset_seed=subset_seed)
                    problems = size_errors(ds, batch_size=2)
                    try:
                        data = load_dataset(ds)
                        loads = len(data.train_y) >= 2
                    except ValueError:
                        loads = False
                    assert (not problems) == loads, (val_size, train_size, test_size, subset_seed, problems)


def test_the_cache_decides_when_it_is_there(tmp_path):
    image_tree(tmp_path / "tree", train=[2, 2], test=[2, 2], images=True)
    load_full(folder_cfg(tmp_path, tmp_path / "tree"))
    # Images added to a class folder later are not in the cache the job will load (its key is the
    # root's), so the check goes by the cache, not by the listing.
    image_tree(tmp_path / "tree", train=[6, 6], test=[2, 2])
    shutil.rmtree(tmp_path / "tree" / "test" / "c1")
    (tmp_path / "tree" / "test" / "c1").mkdir()
    errors = size_errors(folder_cfg(tmp_path, tmp_path / "tree", test_size=4), batch_size=6)
    assert [(f, v) for e in errors for f, v, _ in e.problems] == [("trainer.batch_size", 6)]
    assert "the cached dataset" in errors[0].problems[0][2]


def test_options_of_a_config_dir_are_accepted_and_still_checked(tmp_path):
    """`--config-dir DIR` adds DIR's groups and options: the unknown-option check knows them."""
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "mysimclr.yaml").write_text(
        "# @package _global_\nmethod:\n  _target_: methods.simclr.SimCLR\n  name: mysimclr\n  temperature: 0.3\n"
        "  proj_hidden_dim: 64\n  proj_output_dim: 32\n")
    common = (f"store.path={tmp_path}/r.duckdb", f"hydra.run.dir={tmp_path}/hydra", "dry_run=true")
    proc = run_harness("--config-dir", str(tmp_path / "conf"), "method=mysimclr", "method.temperature=0.5", *common,
                       check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "method.name=mysimclr" in proc.stdout
    proc = run_harness(f"--config-dir={tmp_path / 'conf'}", "method=nosuch", *common, check=False)
    assert proc.returncode == 2 and "all4one, byol, mocov2, mysimclr, nnclr" in proc.stderr, proc.stderr[-3000:]


def test_output_piped_into_head_ends_quietly(tmp_path):
    """A reader that goes away (`| head -1`) ends the command without a BrokenPipeError traceback."""
    from harness.store import Store

    store = Store(tmp_path / "r.duckdb")
    for i in range(400):  # more rows than one pipe buffer holds
        store.write("runs", [{"run_id": f"r{i}", "run_key": f"k{i}", "status": "running", "method": "simclr",
                              "dataset": "cifar10", "seed": i}])
    store.ingest()
    for command in (["leaderboard", "show", "--runs", "--all"], ["harness.store", "du"]):
        proc = subprocess.run(f"{sys.executable} -m {' '.join(command)} --db {store.path} | head -1", shell=True,
                              cwd=REPO, env=harness_env(), capture_output=True, text=True, timeout=120)
        assert proc.stdout.count("\n") == 1 and proc.stderr == "", (command, proc.stderr[-2000:])


def test_the_key_check_reads_a_cached_key_set_and_a_changed_config_file_composes_again(tmp_path, monkeypatch):
    """mistyped_keys keeps the composed keys under the config files' fingerprint: a second command reads
    them, a torn cache file is composed again, and an edited option file is never judged by stale keys."""
    import os
    import time

    from harness.jobs.config import mistyped_keys

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    option = tmp_path / "conf" / "method" / "mine.yaml"
    option.parent.mkdir(parents=True)
    option.write_text("# @package _global_\nmethod:\n  _target_: methods.simclr.SimCLR\n  name: mine\n"
                      "  temperature: 0.3\n  proj_hidden_dim: 64\n  proj_output_dim: 32\n")
    dirs = [tmp_path / "conf"]
    asked = ["method=mine", "method.temperature=0.5", "method.momentum=0.9"]
    refused = ["method.momentum=0.9: method.momentum is not a config key; did you mean method.name?"]
    assert mistyped_keys(asked, dirs) == refused
    cached = list((tmp_path / "cache" / "config-keys").glob("*.json"))
    assert len(cached) == 1
    assert mistyped_keys(asked, dirs) == refused
    cached[0].write_text(cached[0].read_text()[:20])  # torn
    assert mistyped_keys(asked, dirs) == refused
    # The option gains the key: the same command is now accepted (its file's size and time changed).
    option.write_text(option.read_text() + "  momentum: 0.99\n")
    later = time.time() + 5
    os.utime(option, (later, later))
    assert mistyped_keys(asked, dirs) == []
    assert len(list((tmp_path / "cache" / "config-keys").glob("*.json"))) == 2


def test_hydra_is_given_the_mode_from_the_cached_composition_and_a_config_that_sets_it_is_obeyed(tmp_path,
                                                                                               monkeypatch):
    """`python -m harness` hands Hydra the config's hydra.mode from the key check's cached composition
    instead of letting Hydra compose the config once more to read it: an option that sets
    hydra.mode=MULTIRUN still makes a command without -m a sweep; a mode on the command line is Hydra's."""
    from harness.jobs.config import hydra_mode

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    option = tmp_path / "conf" / "method" / "always_swept.yaml"
    option.parent.mkdir(parents=True)
    option.write_text("# @package _global_\ndefaults:\n  - simclr\n  - _self_\nhydra:\n  mode: MULTIRUN\n")
    dirs = [tmp_path / "conf"]
    assert hydra_mode(["method=always_swept"], dirs) == ("MULTIRUN",)
    assert hydra_mode(["method=simclr"], dirs) == (None,)
    assert hydra_mode(["method=simclr", "hydra.mode=MULTIRUN"], dirs) is None
    common = (f"store.path={tmp_path}/r.duckdb", f"hydra.sweep.dir={tmp_path}/s", f"hydra.run.dir={tmp_path}/h",
              "dry_run=true")
    swept = run_harness("--config-dir", str(tmp_path / "conf"), "method=always_swept", *common, check=False)
    assert swept.returncode == 0, swept.stderr[-3000:]
    assert "dry run: the config is valid" not in swept.stdout and "1 point" in swept.stdout + swept.stderr
    single = run_harness("method=simclr", *common, check=False)
    assert single.returncode == 0 and "dry run: the config is valid" in single.stdout, single.stderr[-3000:]
