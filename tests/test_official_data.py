"""STL-10 (torchvision's binary release) and Tiny-ImageNet (its official layout), read from files
written here in those formats: counts, labels, splits, the unlabeled split only in pretraining,
resizing, and the one line that names everything an incomplete copy lacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from harness.core.data.datasets import load_dataset, resolve_source, size_errors
from harness.core.data.official import STL_SIZE
from harness.errors import ConfigError

STL_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def stl_cfg(tmp_path, **fields):
    conf = OmegaConf.load("harness/conf/dataset/stl10.yaml")
    conf.merge_with({"root": str(tmp_path / "stl"), "cache_dir": str(tmp_path / "cache"), "decode_workers": 1,
                     **fields})
    return conf


def write_stl10(root, per_class=(3, 2), unlabeled=25):
    """torchvision's stl10_binary/: every image is filled with its label (train, test) or 200 (unlabeled),
    except pixel (row 0, col 1) of channel 0, which is 1: the column-major storage must be undone."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for split, n in (("train", per_class[0]), ("test", per_class[1]), ("unlabeled", unlabeled)):
        labels = np.repeat(np.arange(10), n) if split != "unlabeled" else np.zeros(n, dtype=np.int64)
        images = np.empty((len(labels), 3, STL_SIZE, STL_SIZE), dtype=np.uint8)
        images[:] = (labels if split != "unlabeled" else np.full(n, 200))[:, None, None, None] * 10
        images[:, 0, 0, 1] = 1
        images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")  # column-major per channel, as released
        if split != "unlabeled":
            (labels + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(STL_CLASSES) + "\n")
    return folder


def test_stl10_reads_the_binary_release_and_keeps_unlabeled_images_out_of_the_probes(tmp_path):
    write_stl10(tmp_path / "stl")
    data = load_dataset(stl_cfg(tmp_path))
    assert data.classes == STL_CLASSES
    assert data.train_x.shape == (30, 3, 96, 96) and data.test_x.shape == (20, 3, 96, 96)
    assert torch.equal(data.train_y, torch.arange(10).repeat_interleave(3))
    assert torch.equal(data.test_y, torch.arange(10).repeat_interleave(2))
    # Images carry their label: the labels line up with the pixels, and the transposition is undone.
    assert torch.equal(data.train_x[:, 1, 5, 5].long(), data.train_y * 10)
    assert int(data.train_x[3, 0, 0, 1]) == 1 and int(data.train_x[3, 0, 1, 0]) == 10  # image 3 is of class 1
    # Pretraining: the labelled images first, then the 25 unlabeled; the probes' split has none of them.
    assert data.pretrain_x.shape[0] == 55 and torch.equal(data.pretrain_index, torch.arange(55))
    assert torch.equal(data.pretrain_x[:30], data.train_x)
    assert (data.pretrain_x[30:, 1] == 2000 % 256).all()
    assert not (data.train_x[:, 1] == 2000 % 256).any() and not (data.test_x[:, 1] == 2000 % 256).any()


def test_stl10_subsets_leave_held_out_images_out_of_pretraining_and_resize_to_image_size(tmp_path):
    write_stl10(tmp_path / "stl")
    data = load_dataset(stl_cfg(tmp_path, val_size=10, image_size=64))
    assert data.train_x.shape == (20, 3, 64, 64) and data.val_x.shape == (10, 3, 64, 64)
    assert data.pretrain_x.shape == (45, 3, 64, 64)  # 20 labelled + 25 unlabeled; the 10 held out are not trained on
    assert set(data.pretrain_index[:20].tolist()) == set(data.train_index.tolist())
    assert not set(data.pretrain_index.tolist()) & (set(range(30)) - set(data.train_index.tolist()))
    # A flat image stays flat through the antialiased resize.
    assert torch.equal(data.train_x[:, 2, 30, 30].long(), data.train_y * 10)
    labelled_only = load_dataset(stl_cfg(tmp_path, unlabeled=False))
    assert labelled_only.pretrain_x is None and len(labelled_only.train_x) == 30


def test_stl10_counts_for_size_checks_come_from_the_label_files_and_memory_counts_the_unlabeled(tmp_path):
    from harness.core.data.datasets import split_counts
    from harness.core.data.residency import memory_needs

    write_stl10(tmp_path / "stl")
    errors = size_errors(stl_cfg(tmp_path, train_size=40), batch_size=8)
    assert len(errors) == 1 and "dataset.train_size" in str(errors[0]) and "at most 30" in str(errors[0])
    cfg = OmegaConf.create({"dataset": stl_cfg(tmp_path), "trainer": {"batch_size": 8}})
    needs = memory_needs(cfg, split_counts(cfg.dataset), STL_SIZE * STL_SIZE * 3, [], torch.device("cpu"))
    assert needs.host_shared == (30 + 20 + 25) * STL_SIZE * STL_SIZE * 3  # labelled, test and unlabeled


def test_an_incomplete_stl10_copy_is_one_line_naming_every_missing_file(tmp_path):
    folder = write_stl10(tmp_path / "stl")
    (folder / "unlabeled_X.bin").unlink()
    (folder / "test_y.bin").unlink()
    with open(folder / "train_X.bin", "ab") as fh:
        fh.write(b"\0" * 7)
    with pytest.raises(ConfigError) as e:
        resolve_source(stl_cfg(tmp_path))
    message = str(e.value)
    assert "\n" not in message and message.startswith("invalid config: dataset.root")
    for name in ("test_y.bin", "unlabeled_X.bin", "train_X.bin whole"):
        assert name in message
    with pytest.raises(ConfigError, match="dataset.download=true"):
        resolve_source(stl_cfg(tmp_path, root=None))


WNIDS = ["n01443537", "n01629819", "n01641577", "n01644900"]


def write_tiny(root, train_per_class=6, val_per_class=3):
    """The official tiny-imagenet-200/ layout; each image is one flat colour of its class."""
    folder = root / "tiny-imagenet-200"
    colours = {w: (40 + 60 * i, 250 - 60 * i, 128) for i, w in enumerate(WNIDS)}
    for w in WNIDS:
        images = folder / "train" / w / "images"
        images.mkdir(parents=True)
        for j in range(train_per_class):
            Image.new("RGB", (64, 64), colours[w]).save(images / f"{w}_{j}.JPEG")
        (folder / "train" / w / f"{w}_boxes.txt").write_text("")
    (folder / "val" / "images").mkdir(parents=True)
    lines = []
    for j in range(val_per_class * len(WNIDS)):
        w = WNIDS[(j * 3) % len(WNIDS)]  # interleaved, as in the release
        Image.new("RGB", (64, 64), colours[w]).save(folder / "val" / "images" / f"val_{j}.JPEG")
        lines.append(f"val_{j}.JPEG\t{w}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (folder / "wnids.txt").write_text("\n".join(reversed(WNIDS)) + "\n")
    (folder / "test" / "images").mkdir(parents=True)  # unlabelled: never read
    return folder, colours


def tiny_cfg(tmp_path, **fields):
    conf = OmegaConf.load("harness/conf/dataset/tinyimagenet.yaml")
    conf.merge_with({"root": str(tmp_path / "tiny"), "cache_dir": str(tmp_path / "cache"), "decode_workers": 1,
                     **fields})
    return conf


def test_tinyimagenet_reads_the_official_layout_with_val_as_the_test_split(tmp_path):
    _, colours = write_tiny(tmp_path / "tiny")
    data = load_dataset(tiny_cfg(tmp_path))
    assert data.classes == sorted(WNIDS) and data.pretrain_x is None
    assert data.train_x.shape == (24, 3, 64, 64) and data.test_x.shape == (12, 3, 64, 64)
    assert torch.bincount(data.train_y).tolist() == [6] * 4 and torch.bincount(data.test_y).tolist() == [3] * 4
    for x, y in ((data.train_x, data.train_y), (data.test_x, data.test_y)):
        red = torch.tensor([colours[data.classes[int(c)]][0] for c in y])
        assert (x[:, 0, 32, 32].long() - red).abs().max() <= 3  # JPEG keeps a flat colour within a few levels
    assert load_dataset(tiny_cfg(tmp_path, image_size=32)).train_x.shape == (24, 3, 32, 32)


def test_an_incomplete_tinyimagenet_copy_names_what_is_missing(tmp_path):
    folder, _ = write_tiny(tmp_path / "tiny")
    (folder / "val" / "val_annotations.txt").unlink()
    with pytest.raises(ConfigError) as e:
        resolve_source(tiny_cfg(tmp_path))
    assert "\n" not in str(e.value) and "val/val_annotations.txt" in str(e.value)


def test_training_steps_over_the_pretraining_images_and_the_online_probe_ignores_unlabeled_ones(tmp_path):
    from harness.core.data.datasets import ImageData
    from harness.core.distributed import DistInfo
    from harness.core.trainer import Training
    from harness.jobs.config import build_addons, compose, instantiate

    g = torch.Generator().manual_seed(0)
    pretrain = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(16) % 2
    data = ImageData(pretrain[:16], labels, pretrain[:8], labels[:8], ["a", "b"], "test",
                     train_index=torch.arange(16), pretrain_x=pretrain, pretrain_index=torch.arange(64))
    cfg = compose(["method=simclr", "backbone=convnet", "backbone.width=8", "trainer.batch_size=16",
                   "trainer.epochs=1", "trainer.warmup_epochs=0", "trainer.device=cpu", "eval.every=0",
                   "eval.online_linear=true"])
    backbone = instantiate(cfg.backbone)
    model = instantiate(cfg.method, backbone)
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), host="h")
    run = Training(cfg, model, data, info, tmp_path / "c.pt", lambda e, m: None, build_addons(cfg, backbone.feat_dim))
    assert run.n_train == 64 and run.steps_per_epoch == 4  # 16 labelled + 48 unlabeled images
    online = next(a for a in run.addons if getattr(a, "protocol", "") == "online_linear")
    assert online.labels.tolist() == labels.tolist() + [-1] * 48
    run.resume()
    run.train_epoch(0)
    assert all(torch.isfinite(p).all() for p in online.parameters())


def test_a_run_on_stl10_pretrains_on_train_and_unlabeled_and_probes_the_labelled_split(tmp_path):
    import json

    from harness.jobs.config import compose
    from harness.jobs.run import run
    from harness.store import Store

    write_stl10(tmp_path / "stl")
    store = tmp_path / "results.duckdb"
    cfg = compose(["dataset=stl10", f"dataset.root={tmp_path / 'stl'}", f"dataset.cache_dir={tmp_path / 'cache'}",
                   "dataset.image_size=16", "backbone=convnet", "backbone.width=8", "trainer.epochs=1",
                   "trainer.batch_size=16", "trainer.warmup_epochs=0", "trainer.device=cpu", "trainer.num_threads=1",
                   "eval.every=0", f"store.path={store}"])
    run(cfg)
    stats = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*.stats.json")]
    assert [s["images"] for s in stats] == [55]  # mean/std auto over the pretraining images: 30 labelled + 25
    rows = Store(store).query("SELECT r.status, r.dataset, e.protocol, e.split FROM runs r JOIN evals e USING (run_id)")
    assert {r["status"] for r in rows} == {"completed"} and {r["dataset"] for r in rows} == {"stl10"}
    assert {r["split"] for r in rows} == {"test"} and any(r["protocol"].startswith("knn:") for r in rows)
