"""Results a researcher takes elsewhere (issue 20, points 1-3):

- ``python -m harness.export``: the exported ResNet-18 weights load into a fresh torchvision
  ResNet-18 with the documented CIFAR stem and give the harness backbone's features exactly; the
  small convnet exports as our own module's state dict.
- Transfer: a run pretrained on a CIFAR-10 subset is probed on a generated image folder, during the
  run (eval.transfer) and afterwards (python -m harness.evaluate); the rows land in evals with the
  set's name, the page shows them, and the model card lists them.
- Image folders: a 28 px grayscale folder trains with dataset.mean/std=auto (computed once, cached
  beside the decoded file, the RGB conversion said once); a wrong-length mean is refused in one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.jobs.config import compose, run_key
from tests.conftest import REPO, THREADS, harness_env, requires_cifar


def image_folder(root: Path, size: int = 32, mode: str = "RGB", classes: int = 3, train: int = 12,
                 test: int = 4, seed: int = 0) -> Path:
    """train/<class>/*.png and test/<class>/*.png of random images; each class has its own brightness,
    so the probes have something to find."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                base = 40 + 80 * c
                shape = (size, size) if mode == "L" else (size, size, 3)
                pixels = np.clip(rng.normal(base, 30, shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode=mode).save(folder / f"{i}.png")
    return root


def tiny(store: Path, cache: Path, *extra: str) -> list[str]:
    return ["trainer.epochs=1", "trainer.warmup_epochs=0", f"trainer.num_threads={THREADS}", "eval.every=0",
            f"store.path={store}", f"dataset.cache_dir={cache}", *extra]


def test_exported_resnet18_loads_into_torchvision_with_the_cifar_stem_and_gives_the_same_features(tmp_path):
    from harness.core.tv import torchvision
    from harness.export import main as export_main
    from harness.jobs.run import run
    from harness.jobs.saved import load_backbone, run_config

    # Two steps of 8 images at 16 px: a trained ResNet-18 in seconds (the CIFAR stem runs at any size).
    folder = image_folder(tmp_path / "images", size=16, classes=2, train=8, test=1)
    store = tmp_path / "results.duckdb"
    cfg = compose(["backbone=resnet18", "dataset=imagefolder", f"dataset.root={folder}", "dataset.image_size=16",
                   "trainer.batch_size=8", *tiny(store, tmp_path / "cache")])
    run(cfg)
    key = run_key(cfg)
    out = tmp_path / "export"
    assert export_main([key, "--out", str(out), "--db", str(store)]) == 0

    # As the generated README says: torchvision's resnet18, conv1 3x3 stride 1, no max-pool, fc = Identity.
    readme = (out / "README.md").read_text()
    assert "net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False); net.maxpool = nn.Identity()" in readme
    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    net.fc = torch.nn.Identity()
    net.load_state_dict(torch.load(out / "backbone.pt", weights_only=True))  # strict: every key matches
    ours = load_backbone(tmp_path / "results.duckdb.runs" / key, run_config(tmp_path / "results.duckdb.runs" / key))
    x = torch.randn(4, 3, 16, 16)
    net.eval()
    ours.eval()
    with torch.no_grad():
        theirs, mine = net(x), ours(x)
    assert theirs.shape == (4, 512)
    assert torch.equal(theirs, mine)
    # Trained (one step moved BatchNorm's running statistics), not a fresh model's weights.
    assert not torch.equal(net.bn1.running_mean, torch.zeros(64))

    card = json.loads((out / "model_card.json").read_text())
    assert card["run_key"] == key and card["backbone"]["torchvision_model"] == "resnet18"
    assert {r["protocol"] for r in card["results"]} >= {"knn:cosine:k=200:T=0.1", "knn:cosine:k=20:T=0.07"}
    assert card["code"]["git_commit"] and card["config"]["trainer"]["epochs"] == 1
    assert "knn:cosine:k=200:T=0.1" in (out / "MODEL_CARD.md").read_text()


@requires_cifar
def test_transfer_from_a_cifar10_subset_to_an_image_folder_is_stored_shown_and_exported(tmp_path, cifar10_cached,
                                                                                         capfd):
    from harness.core.backbones import ConvNet
    from harness.evaluate import main as evaluate_main
    from harness.export import main as export_main
    from harness.jobs.run import run
    from harness.store import Store
    from leaderboard.__main__ import main as leaderboard_main

    folder = image_folder(tmp_path / "pets")
    # A second set with a cut-short image: it fails only when decoded, after training.
    broken = image_folder(tmp_path / "broken", classes=2, train=2, test=1)
    image = broken / "train" / "class0" / "0.png"
    image.write_bytes(image.read_bytes()[:40])
    store = tmp_path / "results.duckdb"
    cfg = compose(["backbone=convnet", "dataset.train_size=256", "dataset.test_size=100", "trainer.batch_size=128",
                   "eval.linear.epochs=2", "eval.linear.augment=none",
                   f"eval.transfer=[{{name:imagefolder,root:{folder}}},{{name:imagefolder,root:{broken}}}]",
                   "trainer.epochs=1",
                   "trainer.warmup_epochs=0", f"trainer.num_threads={THREADS}", "eval.every=0", f"store.path={store}"])
    run(cfg)
    key = run_key(cfg)
    assert "[transfer] imagefolder:broken failed (" in capfd.readouterr().err
    assert Store(store).completed(key) is not None  # the failed set cost nothing but its own rows
    rows = Store(store).query("SELECT * FROM evals WHERE split LIKE 'transfer:%' ORDER BY protocol")
    assert {(r["dataset"], r["split"]) for r in rows} == {("imagefolder:pets", "transfer:imagefolder:pets")}
    assert {r["protocol"] for r in rows} == {"knn:cosine:k=200:T=0.1", "knn:cosine:k=20:T=0.07",
                                             "linear:sgd:2ep:augment=none"}
    assert all(0 <= r["top1"] <= 100 and r["run_key"] == key and r["epoch"] == 1 for r in rows)
    # The run's own test rows are still there, apart from the transfer rows.
    assert Store(store).query("SELECT count(*) AS n FROM evals WHERE split = 'test'")[0]["n"] == 2

    # Afterwards, on a finished run: python -m harness.evaluate, under its own label.
    assert evaluate_main([key, "dataset=imagefolder", f"dataset.root={folder}", "dataset.label=pets-again",
                          "eval.linear.epochs=1", "--db", str(store)]) == 0
    again = Store(store).query("SELECT protocol FROM evals WHERE dataset = 'pets-again'")
    assert {r["protocol"] for r in again} == {"knn:cosine:k=200:T=0.1", "knn:cosine:k=20:T=0.07",
                                              "linear:sgd:1ep:augment=none"}

    page = tmp_path / "page.html"
    assert leaderboard_main(["build", "--db", str(store), "--out", str(page)]) == 0
    html = page.read_text()
    section = html[html.index("<h2>Transfer</h2>"):html.index("<h2>Add-on effects")]
    assert section.count('data-transfer="imagefolder:pets"') == 3 and section.count('data-transfer="pets-again"') == 3
    assert "linear:sgd:2ep:augment=none" in section

    # The convnet exports as our own module's state dict; the card carries the transfer results.
    out = tmp_path / "export"
    assert export_main([key, "--out", str(out), "--db", str(store)]) == 0
    net = ConvNet(width=32, feat_dim=256)
    net.load_state_dict(torch.load(out / "backbone.pt", weights_only=True))
    assert "harness.core.backbones.ConvNet" in (out / "README.md").read_text()
    card = json.loads((out / "model_card.json").read_text())
    assert {"imagefolder:pets", "pets-again"} <= {r["dataset"] for r in card["results"]}


def test_a_28px_grayscale_folder_trains_with_auto_mean_and_std(tmp_path, capfd):
    from harness.core.data.normalization import channel_stats, stats_file
    from harness.jobs.run import run
    from harness.store import Store

    folder = image_folder(tmp_path / "digits", size=28, mode="L", classes=2, train=16, test=4)
    store = tmp_path / "results.duckdb"
    cache = tmp_path / "cache"
    cfg = compose(gray_overrides(folder, store, cache))
    run(cfg)
    err = capfd.readouterr().err
    assert err.count("converted to RGB") == 1 and "40 of 40 images are converted to RGB (40 in mode L" in err
    assert "resized" not in err  # 28 px images at image_size 28
    assert "dataset.mean/std = auto" in err and "computed from the 32 training images" in err
    assert Store(store).completed(run_key(cfg)) is not None

    # Cached beside the decoded file, and equal to the statistics of its training split (gray: 3 equal channels).
    [decoded] = cache.glob("imagefolder-*.pt")
    stats = json.loads(stats_file(decoded).read_text())
    mean, std = channel_stats(torch.load(decoded, weights_only=True)["train_x"])
    assert stats["mean"] == mean and stats["std"] == std and len(set(mean)) == 1 and 0.05 < std[0] < 0.5
    # The run key keeps `auto`; a second run reads the cached numbers instead of the images.
    again = compose([*gray_overrides(folder, store, cache), "force=true"])
    assert run_key(again) == run_key(cfg)
    run(again)
    assert "read (cached) for the 32 training images" in capfd.readouterr().err


def gray_overrides(folder: Path, store: Path, cache: Path) -> list[str]:
    return ["backbone=convnet", "dataset=imagefolder", f"dataset.root={folder}", "dataset.image_size=28",
            "dataset.mean=auto", "dataset.std=auto", "trainer.batch_size=16", *tiny(store, cache)]


def test_resizing_is_said_once_with_the_sizes_found(tmp_path):
    from harness.core.data.datasets import IMAGE_SUFFIXES
    from harness.core.data.folder_notes import announce_folder_changes

    folder = image_folder(tmp_path / "digits", size=28, mode="L", classes=2, train=3, test=1)
    lines = announce_folder_changes(folder, 64, IMAGE_SUFFIXES)
    assert lines == ["[data] 8 of 8 images are converted to RGB (8 in mode L; e.g. grayscale L: its value in "
                     "all 3 channels)",
                     "[data] 8 of 8 images are resized to 64x64 px (dataset.image_size=64, bicubic) from 8 at 28x28"]


def test_a_wrong_length_mean_is_refused_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "harness", "backbone=convnet", "dataset.mean=[0.3]",
                           f"store.path={tmp_path / 'results.duckdb'}", f"hydra.run.dir={tmp_path / 'hydra'}"],
                          cwd=REPO, env=harness_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: invalid config: dataset.mean = [0.3] is not allowed: expected auto or a "
                                   "list of 3 numbers, one per RGB channel (grayscale images are converted to RGB)")
    assert not (tmp_path / "results.duckdb.runs").exists()  # refused before anything ran


@pytest.mark.parametrize("override, field", [("dataset.std=[0.2,0.2,0.2,0.2]", "dataset.std = [0.2, 0.2, 0.2, 0.2]"),
                                             ("dataset.std=[0.2,0,0.2]", "dataset.std = [0.2, 0, 0.2]"),
                                             ("eval.transfer=[svhn]", "eval.transfer.0 = 'svhn'"),
                                             ("eval.transfer=[{name:imagefolder}]", "eval.transfer.0.root = None")])
def test_a_bad_std_or_transfer_set_is_one_config_error(tmp_path, override, field):
    from harness.errors import ConfigError
    from harness.jobs.config import validate

    with pytest.raises(ConfigError) as refused:
        validate(compose(["backbone=convnet", override, f"store.path={tmp_path / 'results.duckdb'}"]))
    assert str(refused.value).startswith(f"invalid config: {field} is not allowed: expected ")
    assert "\n" not in str(refused.value)


def test_the_transfer_table_averages_seeds_and_keeps_transfer_rows_out_of_the_rankings(tmp_path):
    from harness.store import Store
    from leaderboard.__main__ import main as leaderboard_main
    from tests.leaderboard_util import add_run

    store = Store(tmp_path / "results.duckdb")
    for seed, own, moved in ((0, 80.0, 40.0), (1, 82.0, 44.0)):
        add_run(store, f"r{seed}", own, seed=seed)
        store.write("evals", [{"run_id": f"r{seed}", "run_key": f"k-r{seed}", "protocol": "knn:cosine:k=200:T=0.1",
                               "split": "transfer:cifar100", "dataset": "cifar100", "top1": moved, "top5": 70.0,
                               "epoch": 10}])
    page = tmp_path / "page.html"
    assert leaderboard_main(["build", "--db", str(store.path), "--out", str(page), "--cdn"]) == 0
    html = page.read_text()
    section = html[html.index("<h2>Transfer</h2>"):html.index("<h2>Add-on effects")]
    assert section.count('data-transfer="cifar100"') == 1  # one configuration, two seeds
    assert "42.00 ± 2.83" in section and ">2<" in section
    rankings = html[html.index("<h2>Rankings</h2>"):html.index("<h2>Transfer</h2>")]
    assert "81.00" in rankings and "42.00" not in rankings


def test_a_store_from_before_the_dataset_column_is_migrated_and_takes_transfer_rows(tmp_path):
    import duckdb

    from harness.store import Store

    store = Store(tmp_path / "results.duckdb")
    store.ingest()
    with duckdb.connect(str(store.path)) as con:  # as an older harness left it
        con.execute("ALTER TABLE evals DROP COLUMN dataset")
        con.execute("UPDATE _schema SET version = 'older'")
    store.write("evals", [{"run_id": "r", "run_key": "k", "protocol": "knn:cosine:k=200:T=0.1",
                           "split": "transfer:pets", "dataset": "pets", "top1": 50.0, "top5": 90.0, "epoch": 1}])
    assert store.query("SELECT dataset, split FROM evals") == [{"dataset": "pets", "split": "transfer:pets"}]
