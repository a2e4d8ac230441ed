"""Data at ImageNet scale: faithful decoding, a memory-mapped cache built once, host vs device
residency, and the memory budget checked before anything runs.

Every folder here is generated under tmp_path (small, so the tests take seconds).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from harness.core.data.datasets import ensure_cache, folder_manifest, load_full
from harness.core.distributed import DistInfo
from harness.core.trainer import fit
from harness.errors import ConfigError
from harness.jobs.config import build_addons, compose, instantiate, validate
from tests.conftest import harness_env

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def folder_cfg(tmp_path, root, **fields):
    base = {"name": "imagefolder", "root": str(root), "archive": None, "download": False,
            "cache_dir": str(tmp_path / "cache"), "image_size": 16, "train_size": None, "test_size": None,
            "val_size": 0, "subset_seed": 0}
    return OmegaConf.create({**base, **fields})


def stripes(width: int, height: int, across: bool) -> Image.Image:
    """Three bands red | green | blue: the middle one is exactly what a centre crop of the shorter
    side keeps (left/right bands when `across`, top/bottom bands otherwise)."""
    img = np.zeros((height, width, 3), dtype=np.uint8)
    long = width if across else height
    band = (long - min(width, height)) // 2
    for colour, (lo, hi) in zip((RED, GREEN, BLUE), ((0, band), (band, long - band), (long - band, long))):
        if across:
            img[:, lo:hi] = colour
        else:
            img[lo:hi, :] = colour
    return Image.fromarray(img)


def test_non_square_images_keep_their_aspect_and_grayscale_becomes_rgb(tmp_path):
    root = tmp_path / "tree"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
    stripes(96, 48, across=True).save(root / "train" / "a" / "wide.png")  # landscape: 24 | 48 | 24 columns
    stripes(40, 80, across=False).save(root / "train" / "b" / "tall.png")  # portrait: 20 | 40 | 20 rows
    gray = np.tile(np.arange(64, dtype=np.uint8) * 4, (32, 1))  # 64 wide, 32 high, a horizontal ramp
    Image.fromarray(gray, mode="L").save(root / "test" / "a" / "gray.png")
    Image.fromarray(gray, mode="L").convert("P").save(root / "test" / "b" / "palette.png")
    data = load_full(folder_cfg(tmp_path, root))
    assert data.train_x.shape == (2, 3, 16, 16) and data.test_x.shape == (2, 3, 16, 16)
    for img in data.train_x:  # only the green middle survives: a squash would keep red and blue bands
        r, g, b = img.int()
        assert (g[2:-2, 2:-2] > 200).all() and (r[2:-2, 2:-2] < 60).all() and (b[2:-2, 2:-2] < 60).all()
        assert (g > r).all() and (g > b).all()  # even at the crop's edges green dominates
    for img in data.test_x:  # grayscale and palette: three equal channels
        assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
        # The ramp's middle half (columns 16-47 of 64, values 64-188) spread over the 16 columns.
        row = img[0, 8].int()
        assert 55 <= row[0] <= 90 and 160 <= row[-1] <= 200 and (row[1:] >= row[:-1]).all()


def test_native_size_is_kept_when_all_images_share_it(tmp_path, capsys):
    root = tmp_path / "tree"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        stripes(24, 12, across=True).save(root / split / "a" / "x.png")
    data = load_full(folder_cfg(tmp_path, root, image_size=None))
    assert data.train_x.shape == (1, 3, 12, 24)
    assert capsys.readouterr().err.count("keeping the images' native size 24x12") == 1
    Image.new("RGB", (10, 10)).save(root / "test" / "a" / "y.png")
    folder_manifest.cache_clear()  # a changed class folder changes the cache's key
    with pytest.raises(ValueError, match="images of different sizes.*y.png is 10x10.*set dataset.image_size"):
        load_full(folder_cfg(tmp_path, root, image_size=None))


def jpeg_tree(root, per_class: int, classes: int = 4, test_per_class: int = 5) -> None:
    """256x256 JPEGs: a smooth gradient per image (cheap to encode), different in every image."""
    yy, xx = np.mgrid[0:256, 0:256]
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                img = np.stack([(xx + i) % 256, (yy + 7 * c) % 256, (xx + yy + 3 * i) % 256], -1).astype(np.uint8)
                Image.fromarray(img).save(root / split / f"c{c}" / f"{i}.jpg", quality=90)


CHILD = textwrap.dedent("""
    import resource, sys, time
    from omegaconf import OmegaConf
    from harness.core.data.datasets import ensure_cache, load_full
    cfg = OmegaConf.create({cfg!r})
    mode = sys.argv[1]
    if mode == "build":
        print("CACHE", ensure_cache(cfg))
        sys.exit()
    import torch
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    data = load_full(cfg)
    stop = 64 if mode == "batch" else len(data.train_x)
    total = 0
    for i in range(0, stop, 64):  # a batch at a time, as training reads it
        total += int(data.train_x[i:i + 64].clone().view(-1)[::4096].sum())
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    shared = 0
    with open("/proc/self/smaps") as fh:  # the cache file's mapping: pages other processes map too
        inside = False
        for line in fh:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip().endswith(".pt")
            elif inside and line.startswith("Shared_Clean:"):
                shared += int(line.split()[1]) * 1024
    print("GROWN", grown, "SHARED", shared, "SUM", total, flush=True)
    if mode == "hold":
        sys.stdin.readline()  # keep the pages mapped until the test says
""").replace("import resource, sys, time", "import re, resource, sys, time")


def child(cfg, mode: str, **popen) -> subprocess.Popen:
    code = CHILD.format(cfg=OmegaConf.to_container(cfg))
    return subprocess.Popen([sys.executable, "-c", code, mode], env=harness_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_cache_built_once_for_concurrent_jobs_and_read_memory_mapped(tmp_path):
    jpeg_tree(tmp_path / "tree", per_class=150)  # 600 training images, 118 MB decoded
    cfg = folder_cfg(tmp_path, tmp_path / "tree", image_size=256)
    jobs = [child(cfg, "build") for _ in range(4)]
    outs = [job.communicate(timeout=600) for job in jobs]
    assert all(job.returncode == 0 for job in jobs), [err[-2000:] for _, err in outs]
    paths = {line for out, _ in outs for line in out.splitlines() if line.startswith("CACHE")}
    assert len(paths) == 1  # every job got the same file
    decoding = [err for _, err in outs if "[data] decoding imagefolder from" in err]
    assert len(decoding) == 1, [err[-500:] for _, err in outs]  # one job decoded, the others waited for it
    cache = ensure_cache(cfg)
    assert list((tmp_path / "cache").glob("*.pt")) == [cache]
    assert not list((tmp_path / "cache").glob("*.decoding"))  # the decode's scratch arrays are gone
    size = cache.stat().st_size
    assert size > 600 * 3 * 256 * 256

    out, err = child(cfg, "batch").communicate(timeout=300)
    grown = int(re.search(r"GROWN (\d+)", out).group(1))
    assert grown < size / 5, (grown, size, err[-1000:])  # one batch of 64 read, not the whole file

    holder = child(cfg, "hold", stdin=subprocess.PIPE)
    first = holder.stdout.readline()
    try:
        out, err = child(cfg, "all").communicate(timeout=300)
        shared = int(re.search(r"SHARED (\d+)", out).group(1))
        assert re.search(r"SUM (\d+)", out).group(1) == re.search(r"SUM (\d+)", first).group(1)
        # The pages both processes touched are one copy: mapped by both, so counted as shared.
        assert shared > 0.9 * 600 * 3 * 256 * 256, (shared, out, err[-1000:])
    finally:
        holder.communicate("\n", timeout=60)


def _train(tmp_path, images: torch.Tensor, labels: torch.Tensor, residency: str):
    from harness.core.data.datasets import ImageData

    data = ImageData(images, labels, images[:8], labels[:8], ["a", "b", "c", "d"], "test",
                     train_index=torch.arange(len(labels)))
    cfg = compose(["backbone=convnet", "trainer.batch_size=16", "trainer.epochs=2", "trainer.warmup_epochs=0",
                   "trainer.device=cpu", f"dataset.residency={residency}", "eval.every=0"])
    torch.manual_seed(0)
    model = instantiate(cfg.method, instantiate(cfg.backbone))
    losses = []
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), host="h")
    result = fit(cfg, model, data, info, tmp_path / f"{residency}.pt", lambda e, m: losses.append(m["loss"]),
                 build_addons(cfg))
    return losses, model.state_dict(), result.residency


def test_host_residency_trains_exactly_as_device_residency(tmp_path):
    jpeg_tree(tmp_path / "tree", per_class=8, classes=4, test_per_class=2)
    full = load_full(folder_cfg(tmp_path, tmp_path / "tree", image_size=32))  # memory-mapped from the cache
    device_losses, device_state, _ = _train(tmp_path, full.train_x.clone(), full.train_y, "device")
    host_losses, host_state, residency = _train(tmp_path, full.train_x, full.train_y, "host")
    assert len(host_losses) == 2 and host_losses == pytest.approx(device_losses, rel=1e-6, abs=1e-7)
    for name, value in device_state.items():
        assert torch.allclose(host_state[name].float(), value.float(), rtol=1e-5, atol=1e-6), name
    assert residency == "host"
    # The helper thread that gathered the host batches ended with its run.
    assert not [t.name for t in threading.enumerate() if t.name.startswith("host-batches")]


def _blank_tree(root: Path, per_class: int) -> Path:
    """An image folder of black 8×8 PNGs: two classes, `per_class` images each in train/ and test/."""
    for split in ("train", "test"):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8)).save(root / split / f"c{c}" / f"{i}.png")
    return root


def test_a_set_that_cannot_fit_is_refused_before_anything_loads(tmp_path):
    root = _blank_tree(tmp_path / "tree", 6)
    with open("/proc/meminfo") as fh:
        available = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    # 4 training images written as a subset: each image_size^2 * 3 bytes, twice what this machine has.
    side = int((available / 2 / 3) ** 0.5) + 1
    cfg = compose(["dataset=imagefolder", f"dataset.root={root}", f"dataset.image_size={side}",
                   "dataset.train_size=4", "trainer.batch_size=2", "trainer.device=cpu",
                   f"store.path={tmp_path}/r.duckdb", f"dataset.cache_dir={tmp_path}/cache"])
    with pytest.raises(ConfigError) as refused:
        validate(cfg)
    text = str(refused.value)
    assert "dataset.train_size" in text and "writes its subsets" in text and "GB available" in text
    assert not (tmp_path / "cache").exists()  # refused before any image was decoded
    validate(compose(["dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=32",
                      "dataset.train_size=4", "trainer.batch_size=2", "trainer.device=cpu",
                      f"store.path={tmp_path}/r.duckdb"]))  # the same at 32 px fits
    with pytest.raises(ConfigError, match=r"dataset.residency = 'nowhere'.*one of auto, device, host"):
        validate(compose(["dataset.residency=nowhere", f"store.path={tmp_path}/r.duckdb"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_set_larger_than_the_gpu_is_refused_with_residency_device(tmp_path):
    free, _ = torch.cuda.mem_get_info()
    side = int((free / 3 / 100) ** 0.5) + 64  # 100 training images exceed the free memory
    root = _blank_tree(tmp_path / "tree", 60)
    base = ["dataset=imagefolder", f"dataset.root={root}", f"dataset.image_size={side}", "trainer.batch_size=2",
            f"store.path={tmp_path}/r.duckdb"]
    with pytest.raises(ConfigError, match=r"dataset.residency = 'device'.*host or auto.*GB on each GPU"):
        validate(compose([*base, "dataset.residency=device"]))
    validate(compose([*base, "dataset.residency=auto"]))  # auto keeps the set on the host


def _grandchildren() -> list[int]:
    """Processes whose parent is a child of this one (the decode workers, forked by the fork server)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    children = {pid for pid, ppid in parents.items() if ppid == os.getpid()}
    return [pid for pid, ppid in parents.items() if ppid in children]


def test_a_decode_worker_killed_mid_decode_fails_the_decode_in_one_line(tmp_path):
    from harness.core.data.datasets import DecodeFailed

    root = tmp_path / "imgs"
    jpeg_tree(root, per_class=50)
    cfg = folder_cfg(tmp_path, root, decode_workers=2)
    outcome: dict[str, BaseException | None] = {}

    def decode() -> None:
        try:
            ensure_cache(cfg)
            outcome["error"] = None
        except BaseException as e:  # noqa: BLE001 - what the decode raised is the result
            outcome["error"] = e

    thread = threading.Thread(target=decode, daemon=True)
    thread.start()
    # The event: a worker exists (it then has 220 images to share with the other); kill it, as the OOM killer
    # would.
    deadline = time.monotonic() + 120
    while not (workers := _grandchildren()) and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert workers, "no decode worker appeared"
    os.kill(workers[0], signal.SIGKILL)
    thread.join(timeout=120)  # a hang guard only: the pool notices the death at once
    assert not thread.is_alive(), "the decode hung after its worker was killed"
    error = outcome["error"]
    assert isinstance(error, DecodeFailed), repr(error)
    assert "\n" not in str(error) and "a decode worker died" in str(error)
    assert not list((tmp_path / "cache").glob("*.pt")) and not list((tmp_path / "cache").glob("*.decoding"))


def mapped_file(t: torch.Tensor) -> str | None:
    """The file whose mapping in this process holds `t`'s memory (None: anonymous memory, a copy)."""
    address = t.data_ptr()
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            start, end = (int(v, 16) for v in parts[0].split("-"))
            if start <= address < end:
                return parts[5] if len(parts) > 5 and parts[5].startswith("/") else None
    return None


def test_subsets_are_one_mapped_file_that_every_rank_shares(tmp_path):
    from harness.core.data.datasets import load_dataset

    jpeg_tree(tmp_path / "tree", per_class=8, classes=4, test_per_class=4)
    cfg = folder_cfg(tmp_path, tmp_path / "tree", image_size=16, train_size=8, val_size=4, test_size=8)
    full = load_full(cfg)
    ranks = [load_dataset(cfg) for _ in range(2)]  # what each rank of a job loads
    for split in ("train_x", "val_x", "test_x"):
        files = {mapped_file(getattr(r, split)) for r in ranks}
        assert len(files) == 1 and None not in files, (split, files)  # one file, mapped, not a copy per rank
    assert len(list((tmp_path / "cache").glob("*.train-*.pt"))) == 1
    rank = ranks[0]
    assert torch.equal(rank.train_x, full.train_x[rank.train_index])  # the same images as a copy would hold
    assert len(rank.train_x) == 8 and len(rank.val_x) == 4 and len(rank.test_x) == 8


def test_a_script_without_a_main_guard_decodes_with_workers_that_do_not_run_it_again(tmp_path):
    # Fork-server workers re-run the parent's script before their first task; a script that loads a data
    # set without `if __name__ == "__main__":` then hung (each worker waited for its parent's decode lock).
    # The workers now start with __main__ left out: the script runs once, the tasks run in the workers.
    script = tmp_path / "unguarded.py"
    script.write_text("from harness.core.data.workers import map_in_processes\n"
                      "print('script ran', flush=True)\n"
                      "print(list(map_in_processes(abs, [-1, -2, 3, -4], 2, 'harness.core.data.workers')))\n")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=harness_env(), capture_output=True,
                          text=True, timeout=300)  # a hang guard only
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["script ran", "[1, 2, 3, 4]"]
