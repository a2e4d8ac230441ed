"""Dataset loading from every local source, subsets, hold-outs and the decoded-tensor cache.

The sources are built here from real CIFAR-10 images (torchvision's pickle layout, an image-folder
tree, a tar archive), so each loader is tested on files of the format it reads.
"""

from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from harness.core.data.datasets import balanced_subset, load_dataset, load_full, resolve_source
from harness.errors import ConfigError
from tests.conftest import requires_cifar

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def ds_cfg(tmp_path, **fields):
    base = {"name": "cifar10", "root": None, "archive": None, "download": False, "cache_dir": str(tmp_path / "cache"),
            "train_size": None, "test_size": None, "val_size": 0, "subset_seed": 0}
    return OmegaConf.create({**base, **fields})


@pytest.fixture(scope="module")
def few_real_images(cifar10_cached):
    """30 train and 10 test real CIFAR-10 images (3 and 1 per class), as uint8 tensors."""
    data = cifar10_cached
    train = balanced_subset(data.train_y, 30, seed=0)
    test = balanced_subset(data.test_y, 10, seed=0)
    return data.train_x[train], data.train_y[train], data.test_x[test], data.test_y[test]


def write_torchvision_cifar10(root, train_x, train_y, test_x, test_y) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    chunks = np.array_split(np.arange(len(train_y)), 5)
    for i, chunk in enumerate(chunks, 1):
        entry = {"data": train_x[chunk].reshape(len(chunk), -1).numpy(), "labels": train_y[chunk].tolist()}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(entry))
    (folder / "test_batch").write_bytes(pickle.dumps({"data": test_x.reshape(len(test_x), -1).numpy(),
                                                       "labels": test_y.tolist()}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CLASSES}))


def png_bytes(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")  # lossless
    return buf.getvalue()


def image_tree_files(train_x, train_y, test_x, test_y):
    for split, xs, ys in (("train", train_x, train_y), ("test", test_x, test_y)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            yield f"{split}/{CLASSES[int(y)]}/{i:04d}.png", png_bytes(x)


def same_images(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as multisets of images (loaders may order images within a class differently)."""
    key = lambda x: sorted(bytes(img.numpy().tobytes()) for img in x)
    return key(a) == key(b)


@requires_cifar
def test_torchvision_pickles_load_exactly(tmp_path, few_real_images):
    write_torchvision_cifar10(tmp_path / "tv", *few_real_images)
    cfg = ds_cfg(tmp_path, root=str(tmp_path / "tv"))
    assert resolve_source(cfg)[0] == "torchvision"
    data = load_full(cfg)
    train_x, train_y, test_x, test_y = few_real_images
    assert torch.equal(data.train_x, train_x) and torch.equal(data.train_y, train_y)
    assert torch.equal(data.test_x, test_x) and torch.equal(data.test_y, test_y)
    assert data.classes == CLASSES


@requires_cifar
@pytest.mark.parametrize("layout", ["folder", "archive"])
def test_image_trees_and_archives_load_with_alphabetical_labels(tmp_path, few_real_images, layout):
    train_x, train_y, test_x, test_y = few_real_images
    if layout == "folder":
        for name, blob in image_tree_files(*few_real_images):
            (tmp_path / "tree" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "tree" / name).write_bytes(blob)
        cfg = ds_cfg(tmp_path, name="imagefolder", root=str(tmp_path / "tree"), num_classes=10)
    else:
        with tarfile.open(tmp_path / "imgs.tar.xz", "w:xz") as tar:
            for name, blob in image_tree_files(*few_real_images):
                info = tarfile.TarInfo(f"cifar10-jpeg/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        cfg = ds_cfg(tmp_path, archive=str(tmp_path / "imgs.tar.xz"))
    assert resolve_source(cfg)[0] == layout
    data = load_full(cfg)
    assert data.classes == CLASSES
    for c in range(10):  # every class holds exactly its own images, whatever the file order
        assert same_images(data.train_x[data.train_y == c], train_x[train_y == c])
        assert same_images(data.test_x[data.test_y == c], test_x[test_y == c])


@requires_cifar
def test_the_cache_is_written_once_and_then_read(tmp_path, few_real_images):
    write_torchvision_cifar10(tmp_path / "tv", *few_real_images)
    cfg = ds_cfg(tmp_path, root=str(tmp_path / "tv"))
    first = load_full(cfg)
    cached = list((tmp_path / "cache").glob("cifar10-*.pt"))
    assert len(cached) == 1
    for f in (tmp_path / "tv" / "cifar-10-batches-py").iterdir():
        f.unlink()  # the sources are gone: only the cache can answer now
    (tmp_path / "tv" / "cifar-10-batches-py" / "placeholder").write_text("")
    assert torch.equal(load_full(cfg).train_x, first.train_x)


def test_sources_are_tried_in_the_documented_order(tmp_path, monkeypatch):
    (tmp_path / "tree" / "train").mkdir(parents=True)
    (tmp_path / "tree" / "test").mkdir()
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"")
    assert resolve_source(ds_cfg(tmp_path, root=str(tmp_path / "tree"), archive=str(archive)))[0] == "folder"
    assert resolve_source(ds_cfg(tmp_path, archive=str(archive)))[0] == "archive"
    monkeypatch.setenv("HARNESS_CIFAR10_ARCHIVE", str(archive))
    assert resolve_source(ds_cfg(tmp_path, archive="auto")) == ("archive", archive)
    assert resolve_source(ds_cfg(tmp_path, archive=None, download=True))[0] == "download"
    with pytest.raises(ConfigError, match="dataset.root"):
        resolve_source(ds_cfg(tmp_path, archive=None, download=False))
    with pytest.raises(ConfigError, match=r"dataset.root = .*nope.* an existing directory"):
        resolve_source(ds_cfg(tmp_path, root=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="dataset.archive"):
        resolve_source(ds_cfg(tmp_path, archive=str(tmp_path / "missing.tar.xz")))


def test_balanced_subsets_are_balanced_seeded_and_disjoint_from_exclusions():
    labels = torch.arange(10).repeat_interleave(50)
    sub = balanced_subset(labels, 95, seed=3)
    counts = torch.bincount(labels[sub], minlength=10)
    assert len(sub) == 95 and counts.max() - counts.min() <= 1 and len(set(sub.tolist())) == 95
    assert torch.equal(sub, balanced_subset(labels, 95, seed=3))
    assert not torch.equal(sub, balanced_subset(labels, 95, seed=4))
    other = balanced_subset(labels, 100, seed=0, exclude=sub)
    assert not set(other.tolist()) & set(sub.tolist())
    with pytest.raises(ValueError, match="fewer than"):
        balanced_subset(labels, 600, seed=0)


@requires_cifar
def test_subsets_and_the_validation_hold_out_of_the_real_data(tmp_path, cifar10_cached):
    cfg = ds_cfg(tmp_path, archive="auto", cache_dir=None, train_size=2000, test_size=500, val_size=1000)
    data = load_dataset(cfg)
    assert data.train_x.shape == (2000, 3, 32, 32) and data.test_x.shape == (500, 3, 32, 32)
    assert data.val_x.shape == (1000, 3, 32, 32)
    for y in (data.train_y, data.test_y, data.val_y):
        counts = torch.bincount(y, minlength=10)
        assert counts.min() == counts.max()
    full = cifar10_cached
    assert torch.equal(full.train_x[data.train_index], data.train_x)
    val_positions = {bytes(x.numpy().tobytes()) for x in data.val_x}
    assert not any(bytes(x.numpy().tobytes()) in val_positions for x in data.train_x[:500])
    # The subset is a property of the data config, not of the run seed.
    assert torch.equal(load_dataset(cfg).train_index, data.train_index)
