"""The encoded image store (harness/core/data/encoded.py), views from whole images and multi-crop,
on a generated ImageNet-like tree: random-size JPEGs (200-600 px a side), some grayscale, some
CMYK, one PNG, 10 classes."""

from __future__ import annotations

import io
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from scipy import stats

from harness.core.data import encoded
from harness.core.data.augment import Pipeline, ViewMaker, augment_images, sample_crops
from harness.core.data.datasets import folder_manifest
from harness.errors import ConfigError
from tests.conftest import REPO, harness_env

CLASSES = 10


def _picture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Smooth colour gradients plus a little noise: compresses like a photograph, not like noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c = rng.uniform(0, 1, (3, 3))
    img = np.stack([128 + 100 * np.sin(xx / (20 + 40 * c[i, 0]) + c[i, 1] * 6) * np.cos(yy / (25 + 30 * c[i, 2]))
                    for i in range(3)], axis=2)
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def make_tree(root: Path, train: int = 3, test: int = 1, seed: int = 0) -> Path:
    """train/<class>/*.JPEG and test/<class>/*.JPEG; every 7th image grayscale, every 11th CMYK, one PNG."""
    rng = np.random.default_rng(seed)
    k = 0
    for split, n in (("train", train), ("test", test)):
        for c in range(CLASSES):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = (int(v) for v in rng.integers(200, 601, 2))
                img = Image.fromarray(_picture(rng, w, h))
                if k % 7 == 3:
                    img = img.convert("L")
                elif k % 11 == 5:
                    img = img.convert("CMYK")
                if k == 8:
                    img.save(folder / f"img{i}.png")
                else:
                    img.save(folder / f"img{i}.JPEG", quality=92)
                k += 1
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("imagenet_like"))


def _ds(root: Path, cache: Path, **encode) -> OmegaConf:
    return OmegaConf.create({"name": "imagefolder", "root": str(root), "cache_dir": str(cache), "store": "encoded",
                             "image_size": 64, "eval_resize": 73, "decode_workers": 1,
                             "encode": {"short_side": 256, **encode}})


@pytest.fixture(scope="module")
def store(tree, tmp_path_factory) -> tuple[OmegaConf, Path]:
    ds = _ds(tree, tmp_path_factory.mktemp("cache"))
    return ds, encoded.ensure_store(ds)


def test_the_store_is_built_once_reused_and_keyed_by_the_files(tree, store, tmp_path, capfd):
    ds, index_file = store
    index, data = encoded.open_store(str(index_file))
    assert len(index["labels"]) == CLASSES * 4 and int(index["train"].sum()) == CLASSES * 3
    assert index["classes"] == [f"n{c:08d}" for c in range(CLASSES)]
    assert int(index["hw"].min(dim=1).values.max()) <= 256  # the shorter side is capped
    assert int(index["hw"].max()) > 256  # ... and the longer one keeps the aspect
    assert index["bytes"] == len(data) == int(index["sizes"].sum())
    # every stored image is a JPEG (PNG, grayscale and CMYK were converted)
    for o in index["offsets"].tolist():
        assert bytes(data[o:o + 2]) == b"\xff\xd8"
    # A second job (and a second rank: it calls the same function) reuses the store: nothing is rebuilt.
    before = index_file.stat().st_mtime_ns
    capfd.readouterr()
    assert encoded.ensure_store(ds) == index_file
    assert index_file.stat().st_mtime_ns == before and "encoding" not in capfd.readouterr().err
    # A changed file is other data: another key.
    copy = tmp_path / "copy"
    make_tree(copy)
    assert encoded.store_paths(_ds(copy, tmp_path))[1].name == index_file.name  # a copy is the same data
    first = sorted((copy / "train" / "n00000002").iterdir())[0]
    first.write_bytes(first.read_bytes() + b"\0")
    folder_manifest.cache_clear()
    assert encoded.store_paths(_ds(copy, tmp_path))[1].name != index_file.name


def test_decoded_pixels_equal_pils_decode_of_the_same_file(tree, store, tmp_path):
    ds, index_file = store
    data = encoded.load_encoded(ds)
    split = data["train_x"]
    images = split.decode(torch.arange(len(split)), torch.device("cpu"))
    index, raw = encoded.open_store(str(index_file))
    files = sorted((tree / "train").glob("*/*"))
    for i, (img, path) in enumerate(zip(images, files)):
        # The stored bytes decode to exactly what PIL makes of them ...
        stored = np.array(Image.open(io.BytesIO(split.blobs([i])[0].tobytes())).convert("RGB"))
        assert torch.equal(img, torch.from_numpy(stored).permute(2, 0, 1))
        # ... and they are the original image within JPEG tolerance (re-encoded at quality 90, resized).
        original = Image.open(path).convert("RGB").resize((img.shape[2], img.shape[1]), Image.BICUBIC)
        diff = np.asarray(original, dtype=np.float64) - stored
        psnr = 10 * math.log10(255 ** 2 / (diff ** 2).mean())
        assert psnr > 32, (path, psnr)
        if Image.open(path).mode == "L":  # grayscale became three equal channels
            assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    # keep_original: a baseline RGB JPEG within the cap is stored as its own bytes (bit-exact decode)
    small = tmp_path / "small"
    for split_name in ("train", "test"):
        folder = small / split_name / "a"
        folder.mkdir(parents=True)
        Image.fromarray(_picture(np.random.default_rng(1), 240, 210)).save(folder / "x.jpg", quality=85)
    ds_keep = _ds(small, tmp_path / "c2", keep_original=True)
    keep = encoded.load_encoded(ds_keep)["train_x"]
    assert keep.blobs([0])[0].tobytes() == (small / "train" / "a" / "x.jpg").read_bytes()
    assert torch.equal(keep.decode([0], torch.device("cpu"))[0],
                       torch.from_numpy(np.array(Image.open(small / "train" / "a" / "x.jpg"))).permute(2, 0, 1))


def _tv_boxes(h: int, w: int, n: int, scale, ratio) -> np.ndarray:
    from harness.core.tv import torchvision

    torch.manual_seed(0)
    img = torch.zeros(3, h, w)
    return np.array([torchvision.transforms.RandomResizedCrop.get_params(img, list(scale), list(ratio))
                     for _ in range(n)], dtype=np.float64)  # top, left, h, w


def test_crops_cover_the_whole_image_and_follow_torchvisions_distribution():
    n, scale, ratio = 4000, (0.08, 1.0), (3 / 4, 4 / 3)
    sizes = [(300, 520), (560, 210)]  # non-square: landscape and portrait
    g = torch.Generator().manual_seed(0)
    for height, width in sizes:
        hh, ww = torch.full((n,), float(height)), torch.full((n,), float(width))
        ours = np.stack([t.numpy() for t in sample_crops(n, hh, ww, scale, ratio, g, torch.device("cpu"))], axis=1)
        theirs = _tv_boxes(height, width, n, scale, ratio)
        # centre-square behaviour (the old cache): crops of the centred min(H, W) square, in image coordinates
        side = min(height, width)
        sq = np.stack([t.numpy() for t in sample_crops(n, side, side, scale, ratio, g, torch.device("cpu"))], axis=1)
        sq[:, 0] += (height - side) // 2
        sq[:, 1] += (width - side) // 2
        for boxes, whole in ((ours, True), (theirs, True), (sq, False)):
            top, left, h, w = boxes.T
            reaches = [top.min() == 0, left.min() == 0, (top + h).max() == height, (left + w).max() == width]
            assert all(reaches) == whole, (height, width, reaches)
        def area(b):
            return b[:, 2] * b[:, 3] / (height * width)  # noqa: B023 - used inside this iteration only

        def centre_x(b):
            return (b[:, 1] + b[:, 3] / 2) / width  # noqa: B023 - used inside this iteration only

        for stat in (area, lambda b: np.log(b[:, 3] / b[:, 2]), centre_x):
            assert stats.ks_2samp(stat(ours), stat(theirs)).pvalue > 1e-3
            assert stats.ks_2samp(stat(sq), stat(theirs)).pvalue < 1e-6  # the old behaviour fails the same test


def test_views_of_whole_images_have_each_recipes_size_and_blur_follows_the_size(store):
    ds, _ = store
    split = encoded.load_encoded(ds)["train_x"]
    images = split.decode(torch.arange(6), torch.device("cpu"))
    assert len({tuple(x.shape) for x in images}) > 1  # different sizes in one batch
    recipe = {"views": ["large", "large", "small", "small", "small"],
              "pipelines": {"large": {"size": 64, "crop": {"scale": [0.14, 1.0]}, "blur": {"p": 1.0}},
                            "small": {"size": 32, "crop": {"scale": [0.05, 0.14]}, "blur": {"p": 0.5}}}}
    maker = ViewMaker(recipe, [0.5] * 3, [0.25] * 3, torch.device("cpu"), seed=0)
    views = maker(images)
    assert [tuple(v.shape) for v in views] == [(6, 3, 64, 64)] * 2 + [(6, 3, 32, 32)] * 3
    assert all(torch.isfinite(v).all() for v in views)
    assert Pipeline.from_config(recipe["pipelines"]["large"]).blur_kernel is None  # unset: follows the size
    from harness.core.data.augment import blur_kernel_for

    assert (blur_kernel_for(224), blur_kernel_for(96), blur_kernel_for(32)) == (23, 9, 3)
    # identity settings return the resized whole image (on the CPU resized in uint8: within a grey level)
    plain = Pipeline(crop_scale=(1.0, 1.0), crop_ratio=(0.1, 10.0), flip=0.0, jitter_p=0.0, grayscale=0.0)
    out = augment_images(images[:1], plain, torch.Generator().manual_seed(0), 48)
    ref = torch.nn.functional.interpolate(images[0][None].float(), size=(48, 48), mode="bilinear", antialias=True)
    assert (out * 255 - ref.clamp(0, 255)).abs().max() <= 1.0 + 1e-3
    assert (out * 255 - ref.clamp(0, 255)).abs().mean() < 0.3


def test_training_batches_and_evaluation_centre_crops(store):
    ds, _ = store
    data = encoded.load_encoded(ds)
    split = data["train_x"]
    assert split.shape == (30, 3, 64, 64) and len(split[3:7]) == 4
    crops = split[3:7].to("cpu")
    assert crops.shape == (4, 3, 64, 64) and crops.dtype == torch.uint8
    batches = split.batches(torch.device("cpu"), 8)
    got = list(batches.epoch(torch.arange(30).flip(0), range(3), lambda s: s * 8, 8))
    assert [s for s, _, _ in got] == [0, 1, 2]
    assert got[1][1].tolist() == list(range(21, 13, -1))
    first = split.decode(torch.tensor([29]), torch.device("cpu"))[0]
    assert torch.equal(got[0][2][0], first)  # prefetched batches are the images asked for, in order
    sub = split.take_rows(torch.tensor([2, 5]))
    assert torch.equal(sub[0:2].to("cpu"), split.take_rows(torch.tensor([2, 5])).to("cpu"))
    # the evaluation view is Resize(eval_resize) + CenterCrop(image_size) of the whole image
    whole = split.decode([2], torch.device("cpu"))[0]
    h, w = whole.shape[-2:]
    scale = 73 / min(h, w)
    nh, nw = max(64, round(h * scale)), max(64, round(w * scale))
    resized = torch.nn.functional.interpolate(whole[None].float(), size=(nh, nw), mode="bilinear", antialias=True)
    top, left = round((nh - 64) / 2), round((nw - 64) / 2)
    expected = resized[0, :, top:top + 64, left:left + 64].round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(sub[0:1].to("cpu")[0], expected)


def test_bad_images_are_named_and_refused_or_skipped_and_nothing_half_built(tmp_path, capfd):
    root = make_tree(tmp_path / "tree", train=2, test=1)
    bad = root / "train" / "n00000003" / "img0.JPEG"
    bad.write_bytes(bad.read_bytes()[:2000])  # truncated
    (root / "train" / "n00000004" / "notes.jpg").write_text("not an image")
    cache = tmp_path / "cache"
    with pytest.raises(encoded.BadImages) as refused:
        encoded.ensure_store(_ds(root, cache))
    message = str(refused.value)
    assert str(bad) in message and "and 1 more" in message and "dataset.encode.on_bad=skip" in message
    assert "\n" not in message
    assert not list(cache.glob("*.index.pt")) and not list(cache.glob("*.jpegs"))
    capfd.readouterr()
    index_file = encoded.ensure_store(_ds(root, cache, on_bad="skip"))
    err = capfd.readouterr().err
    assert "1 of 1 shards are already built" in err  # the refused build's work is reused
    assert f"skipped (dataset.encode.on_bad=skip): {bad}" in err and "notes.jpg" in err
    index, _ = encoded.open_store(str(index_file))
    assert len(index["labels"]) == CLASSES * 3 - 1 and len(index["skipped"]) == 2
    # an empty class folder would shift the labels: refused, naming it
    empty = root / "test" / "n00000009"
    for f in empty.iterdir():
        f.unlink()
    folder_manifest.cache_clear()
    with pytest.raises(ConfigError, match=f"{empty} has none"):
        encoded.ensure_store(_ds(root, cache))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a folder whatever its mode")
def test_an_unreadable_folder_is_named(tmp_path):
    root = make_tree(tmp_path / "tree", train=1, test=1)
    locked = root / "train" / "n00000001"
    locked.chmod(0)
    try:
        with pytest.raises(ConfigError, match=f"{locked}: Permission denied"):
            encoded.list_images(root)
    finally:
        locked.chmod(0o755)


def _build(root: Path, cache: Path, *extra: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness.core.data.encoded", str(root), "--out", str(cache),
                             "--short-side", "256", "--workers", "1", "--shard-images", "2", *extra],
                            cwd=REPO, env=harness_env(), stderr=subprocess.PIPE, text=True, **popen)


def _descendants(pid: int, depth: int) -> list[int]:
    """Processes `depth` generations below `pid` (2: the build's workers, forked by its fork server)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    level = {pid}
    for _ in range(depth):
        level = {child for child, parent in parents.items() if parent in level}
    return sorted(level)


def test_an_encoding_worker_killed_stops_the_build_in_one_line_and_the_rerun_resumes(tree, store, tmp_path):
    cache = tmp_path / "cache"
    data_file, index_file = encoded.store_paths(_ds(tree, cache))
    proc = _build(tree, cache, "--workers", "2")
    # The event: a worker exists. No worker ends before it is told to stop, which happens only after every
    # shard is back, so killing it fails the build wherever it is.
    while not (workers := _descendants(proc.pid, 2)):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.005)
    os.kill(workers[0], signal.SIGKILL)
    err = proc.communicate()[1]
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert last.startswith("error: the encoded store's build of") and "an encoding worker died (killed by SIGKILL" \
        in last and "shards are kept" in last, err
    assert not index_file.exists()
    done = _build(tree, cache, "--workers", "2")
    err = done.communicate()[1]
    assert done.returncode == 0, err
    assert data_file.read_bytes() == encoded.store_paths(store[0])[0].read_bytes()


def test_a_killed_build_and_a_full_disk_resume_and_finish_as_a_fresh_build(tree, store, tmp_path):
    import resource

    cache = tmp_path / "cache"
    ds = _ds(tree, cache)
    data_file, index_file = encoded.store_paths(ds)
    building = Path(str(data_file) + ".building")
    proc = _build(tree, cache)
    while not list(building.glob("shard-*.pt")):  # the first shard is published: kill now
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = len(list(building.glob("shard-*.pt")))
    assert 0 < kept < 20 and not index_file.exists()
    # A file-size limit (as a full disk) stops the concatenation: one line, the shards kept.
    limit = 200_000
    full = _build(tree, cache, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    err = full.communicate()[1]
    assert full.returncode == 1 and "Traceback" not in err, err
    assert f"resuming the encoded store of {tree}: {kept} of 20 shards are already built" in err
    assert "the encoded store's build stopped: file too large writing" in err and "20 of 20 shards are kept" in err
    assert not index_file.exists() and not data_file.exists() and not list(cache.glob(".*.tmp"))
    done = _build(tree, cache)
    err = done.communicate()[1]
    assert done.returncode == 0 and "20 of 20 shards are already built" in err, err
    assert not building.exists()
    # the resumed store is the fresh one, byte for byte
    fresh_data, _ = encoded.store_paths(store[0])
    assert data_file.read_bytes() == fresh_data.read_bytes()
    ours, theirs = torch.load(index_file, weights_only=True), torch.load(store[1], weights_only=True)
    for key in ("offsets", "sizes", "hw", "labels", "train"):
        assert torch.equal(ours[key], theirs[key])


def test_a_full_disk_stops_the_build_in_one_line_and_the_next_run_resumes(tree, store, tmp_path, capfd):
    from tests.fs_utils import _run, small_file_system

    cache = tmp_path / "small"
    with small_file_system(cache, 1024) as mounted:  # the shards fit (about 0.7 MB), their concatenation does not
        if mounted != "tmpfs":
            pytest.skip("no tmpfs can be mounted here (the file-size-limit variant is in the kill test)")
        ds = _ds(tree, cache)
        with pytest.raises(OSError):
            encoded.ensure_store(ds, shard_images=2)
        err = capfd.readouterr().err
        line = next(x for x in err.splitlines() if "build stopped" in x)
        assert "no space left on device writing" in line and "the next run resumes from them" in line
        data_file, index_file = encoded.store_paths(ds)
        assert not index_file.exists() and not data_file.exists() and not list(cache.glob(".*.tmp"))
        assert _run("mount", "-o", "remount,size=8192k", str(cache))  # space freed
        assert encoded.ensure_store(ds, shard_images=2) == index_file
        assert "20 of 20 shards are already built" in capfd.readouterr().err
        assert data_file.read_bytes() == encoded.store_paths(store[0])[0].read_bytes()


def test_two_processes_at_once_build_the_store_once_and_both_read_it(tree, tmp_path):
    cache = tmp_path / "cache"
    procs = [_build(tree, cache, stdout=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1 and Path(paths.pop()).exists()
    errs = "".join(err for _, err in outs)
    assert errs.count("[data] encoding 40 images") == 1  # one builder; the other waited for it or found it built
    assert len(list(cache.glob("*.jpegs"))) == 1


def test_config_errors_for_the_encoded_store_are_one_line_each():
    from harness.jobs.config import compose, validate

    cfg = compose(["dataset=imagefolder", "dataset.root=/nonexistent", "+dataset.store=encoded",
                   "+dataset.encode={quality: 0, short_side: 8, on_bad: maybe}", "+dataset.recorded_as=imagenet22k"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    text = str(e.value)
    for line in ("dataset.encode.quality = 0 is not allowed: expected an integer from 1 to 100",
                 "dataset.encode.short_side = 8 is not allowed", "dataset.encode.on_bad = 'maybe' is not allowed",
                 "dataset.recorded_as = 'imagenet22k' is not allowed: expected one of imagenet1k, imagenet100"):
        assert line in text


def test_a_one_epoch_run_on_the_encoded_tree_records_knn_and_the_imagenet_linear_protocol(tree, tmp_path):
    from harness.store import Store
    from tests.conftest import run_harness

    db = tmp_path / "r.duckdb"
    done = run_harness("dataset=imagenet100", f"dataset.root={tree}", f"dataset.cache_dir={tmp_path / 'cache'}",
                       "dataset.image_size=64", "dataset.eval_resize=73", "dataset.encode.short_side=256",
                       "augment=imagenet_symmetric", "augment.pipelines.base.size=64", "method=simclr",
                       "backbone=convnet", "trainer.epochs=1", "trainer.batch_size=10", "trainer.warmup_epochs=0",
                       "eval.linear.enabled=true", "eval.linear.augment=rrc_flip", "eval.linear.epochs=2",
                       "eval.linear.copies=2", "eval.knn=[{k: 5, T: 0.1}]", f"store.path={db}",
                       "hydra.run.dir=${store.path}.hydra")
    assert "[data] encoded store ready: 40 images" in done.stderr
    rows = Store(db).query("SELECT protocol, split, top1 FROM evals ORDER BY protocol")
    protocols = {r["protocol"] for r in rows}
    assert protocols == {"knn:cosine:k=5:T=0.1", "linear:sgd:2ep:augment=rrc_flip:copies=2"}, rows
    assert all(0 <= r["top1"] <= 100 for r in rows)
    # the preset's runs carry ImageNet-100's own name, which the leaderboard's references use
    assert [r["dataset"] for r in Store(db).query("SELECT dataset FROM runs")] == ["imagenet100"]


def test_the_score_networks_images_are_centre_crops_of_the_encoded_store_at_its_own_size(store):
    from methods.scorecl.addon import score_net_images, score_net_size

    ds, _ = store
    split = encoded.load_encoded(ds)["train_x"]
    net_cfg = OmegaConf.create({"image_size": None, "max_images": 8, "seed": 3})
    x = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    assert (score_net_size(net_cfg, split), score_net_size(net_cfg, x)) == (encoded.ADDON_SIZE_ON_ENCODED, 16)
    images = score_net_images(split, 32, net_cfg, chunk=3)
    # only the seeded max_images subset is decoded, as the evaluation view makes it at 32 px
    chosen = torch.randperm(30, generator=torch.Generator().manual_seed(3))[:8]
    assert torch.equal(images, encoded.centre_crops(split.decode(chosen, torch.device("cpu")), round(32 / 0.875), 32))
    # decoded images are kept at their own size, resized to another
    assert score_net_images(x, 16, net_cfg) is x
    assert score_net_images(x, 8, net_cfg).shape == (5, 3, 8, 8)


def test_scorecl_and_clsp_train_on_the_encoded_tree_with_their_networks_at_their_own_sizes(tree, tmp_path):
    # Both add-ons in one run: ScoreCL's score network at 32 px, CLSP's DDPM and synthetic set at 16 px,
    # the method's views at 64 px (resized for the score, cropped and resized up for the synthetic views).
    from harness.store import Store
    from methods.clsp.diffusion import load_model
    from methods.scorecl.score_net import ScoreNet
    from tests.conftest import run_harness

    db = tmp_path / "r.duckdb"
    common = ("dataset=imagenet100", f"dataset.root={tree}", f"dataset.cache_dir={tmp_path / 'cache'}",
              "dataset.image_size=64", "dataset.eval_resize=73", "dataset.encode.short_side=256",
              "augment=imagenet_symmetric", "augment.pipelines.base.size=64", "method=simclr", "backbone=convnet",
              "weighting=scorecl_tiny", f"store.path={db}", "hydra.run.dir=${store.path}.hydra")
    refused = run_harness(*common, "weighting.mode=joint", check=False)
    assert refused.returncode == 2 and "weighting.mode = 'joint' is not allowed: expected pretrained with " \
        "dataset.store=encoded" in refused.stderr, refused.stderr[-2000:]
    done = run_harness(*common, "weighting.score_net.image_size=32", "positives=clsp_tiny", "positives.ratio=0.5",
                       "positives.diffusion.image_size=16", "positives.diffusion.epochs=1", "trainer.epochs=1",
                       "trainer.batch_size=10", "trainer.warmup_epochs=0", "eval.knn=[{k: 5, T: 0.1}]")
    assert "[scorecl] score network from" in done.stderr and "[clsp] synthetic set" in done.stderr
    artifacts = Path(f"{db}.artifacts")
    (score_net,) = [f for f in (artifacts / "score_net").iterdir() if f.is_dir()]
    assert ScoreNet.load(score_net).unet.config.sample_size == 32
    (ddpm,) = [f for f in (artifacts / "diffusion").iterdir() if f.is_dir() and not f.name.endswith(".partial")]
    assert load_model(str(ddpm))[0].config.sample_size == 16
    (synthetic,) = [f for f in (artifacts / "synthetic").iterdir() if f.is_dir()]
    assert np.load(synthetic / "candidates.npy", mmap_mode="r").shape == (30, 2, 16, 16, 3)
    metrics = {r["name"]: r["value"] for r in Store(db).query("SELECT name, value FROM metrics")}
    # mean-normalised weights average 1 + alpha; the pairs were weighted differently; half got a synthetic one
    assert metrics["weight_mean"] == pytest.approx(2.0, abs=1e-4) and metrics["weight_std"] > 0
    assert metrics["synthetic_share"] == pytest.approx(0.5, abs=0.02) and math.isfinite(metrics["loss_synthetic"])


@pytest.mark.parametrize("sweep", ["sce_imagenet", "sce_imagenet_multicrop"])
def test_the_sce_imagenet_presets_preview_every_point(tree, tmp_path, sweep):
    from tests.conftest import run_harness

    # the generated tree stands in for ImageNet; its 30 training images need a smaller batch than 4096
    done = run_harness(f"sweep={sweep}", "dry_run=true", f"dataset.root={tree}", "trainer.batch_size=8",
                       f"store.path={tmp_path / 'r.duckdb'}", f"hydra.sweep.dir={tmp_path / 's'}", "-m")
    assert "Sweep preview (dry_run=true): 1 point(s), all valid; nothing was run or submitted." in done.stdout
    from harness.jobs.config import compose

    cfg = compose([f"sweep={sweep}", f"dataset.root={tree}"])
    assert (cfg.dataset.store, cfg.backbone.name, cfg.eval.linear.augment) == ("encoded", "resnet50", "rrc_flip")
    assert (cfg.trainer.epochs, len(cfg.augment.views)) == ((100, 2) if sweep == "sce_imagenet" else (200, 6))


def cfg_overrides(tree: Path, cache: Path) -> list[str]:
    return ["dataset=imagenet", f"dataset.root={tree}", f"dataset.cache_dir={cache}", "dataset.train_size=100000"]


def test_the_memory_check_knows_the_encoded_sizes(tree, store, tmp_path):
    from harness.core.data.datasets import SplitCounts
    from harness.core.data.residency import memory_needs
    from harness.jobs.config import compose

    counts = SplitCounts([1300] * 1000, [50] * 1000, "ImageNet-1k's counts")
    cfg = compose(cfg_overrides(tree, tmp_path))
    needs = memory_needs(cfg, counts, encoded.estimated_image_bytes(cfg.dataset), [], torch.device("cpu"))
    # not built (another cache folder): the estimate at 288 px, quality 90 (about 34 KB an image):
    # ImageNet-1k under 60 GB, and a subset is a view of the mapped bytes, not a copy
    assert 30e9 < needs.host_shared < 60e9 and needs.host_private == 0 and needs.device == 0
    ds, index_file = store  # built: the measured size
    index, _ = encoded.open_store(str(index_file))
    assert encoded.estimated_image_bytes(ds) == index["bytes"] // len(index["sizes"])
    # CLSP's candidates are decoded images at the DDPM's side (64 px unless set), mapped beside the store
    from methods.clsp.addon import SyntheticPositives

    image = encoded.estimated_image_bytes(cfg.dataset)
    for size, side in ((None, 64), (32, 32)):
        clsp = compose([*cfg_overrides(tree, tmp_path), "positives=clsp", "positives.ratio=0.5",
                        f"positives.diffusion.image_size={'null' if size is None else size}"])
        with_clsp = memory_needs(clsp, counts, image, [SyntheticPositives], torch.device("cpu"))
        assert with_clsp.host_shared == needs.host_shared  # on the CPU each process loads them
        assert with_clsp.host_private - needs.host_private == 8 * 100_000 * 3 * side * side


def test_subsets_and_a_hold_out_of_an_encoded_set_are_views_of_the_same_bytes(store):
    ds, index_file = store
    sub = OmegaConf.merge(ds, {"val_size": 10, "train_size": 10, "test_size": 5})
    data = encoded.load_dataset(sub)
    assert (len(data.train_x), len(data.val_x), len(data.test_x)) == (10, 10, 5)
    assert all(isinstance(x, encoded.EncodedSplit) for x in (data.train_x, data.val_x, data.test_x))
    assert torch.bincount(data.val_y, minlength=CLASSES).tolist() == [1] * CLASSES  # class-balanced
    assert not set(data.train_index.tolist()) & set(data.val_x.rows.tolist())  # the hold-out is left out
    assert data.train_x.index_file == str(index_file)


def test_residency_of_encoded_bytes_is_chosen_by_their_size_and_every_choice_gives_the_same_batches(store):
    """dataset.residency for an encoded set: auto weighs the JPEG bytes against the free device memory;
    on the CPU every choice decodes the same images (the GPU paths, nvJPEG from pinned buffers filled
    from device or mapped bytes, cannot run here: only their byte bookkeeping is checked below)."""
    from harness.core.data import residency
    from harness.core.data.datasets import SplitCounts
    from harness.jobs.config import compose

    ds, _ = store
    split = encoded.load_encoded(ds)["train_x"]
    jpeg = split.nbytes
    assert jpeg == int(encoded.index_sizes(split).sum())  # what auto weighs: the JPEG bytes, not pixels
    gpu = torch.device("cuda", 0)
    assert residency.choose_for_free("auto", jpeg, 0.5, 2 * jpeg, gpu)[0] == "device"
    host, why = residency.choose_for_free("auto", jpeg, 0.5, 2 * jpeg - 1, gpu)
    assert host == "host" and "exceeds dataset.device_memory_fraction=0.5" in why
    assert residency.choose_for_free("host", jpeg, 0.5, 10 * jpeg, gpu)[0] == "host"
    cfg = OmegaConf.create({"dataset": {"residency": "auto"}, "positives": None, "weighting": None})
    cpu = torch.device("cpu")
    assert residency.resolve(cfg, split, cpu, [], False) == "device"  # the CPU: the mapped bytes are read

    order = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    expected = split.decode(order[:8], cpu)
    for chosen in ("device", "host"):
        source = residency.batch_source(chosen, split, cpu, 8)
        assert source.residency == chosen
        [(_, idx, images)] = list(source.epoch(order, range(1), lambda s: s * 8, 8))
        assert idx.tolist() == order[:8].tolist() and all(torch.equal(a, b) for a, b in zip(images, expected))
    with pytest.raises(ValueError, match="dataset.residency = 'auto' for an encoded set: device or host"):
        split.batches(cpu, 8, "auto")
    # the bytes a step hands to nvJPEG: gathered from the mapped file (host) or from the split's bytes
    # concatenated in split order (device, here on the CPU), each image's exactly
    blobs = [torch.from_numpy(np.array(b)) for b in split.blobs(order[:8])]
    batches = split.batches(cpu, 8, "host")
    assert all(torch.equal(a, b) for a, b in zip(batches._pinned(order[:8]), blobs))
    batches.on_device = batches._copy_to_device()
    assert len(batches.on_device) == jpeg
    gathered = batches._pinned(order[:8])
    assert all(torch.equal(a, b) for a, b in zip(gathered, blobs))
    # and the decoder takes those slices as they are
    assert all(torch.equal(a, b) for a, b in zip(encoded.decode_batch(gathered, cpu), expected))

    # the memory check: device residency puts the training images' JPEG bytes on each GPU, host pins a step's
    counts = SplitCounts([30] * 10, [10] * 10, "test")
    for chosen, on_gpu in (("device", 300 * 1000), ("host", 0), ("auto", 0)):
        cfg = compose(["dataset=imagenet100", f"dataset.root={ds.root}", f"dataset.residency={chosen}",
                       "trainer.batch_size=16"])
        needs = residency.memory_needs(cfg, counts, 1000, [], gpu)
        assert (needs.device, needs.host_private, needs.residency) == (on_gpu, 2 * 16 * 1000,
                                                                       "host" if chosen == "auto" else chosen)
    assert residency.memory_needs(cfg, counts, 1000, [], cpu).device == 0
