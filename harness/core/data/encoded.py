"""Image folders kept encoded: one memory-mapped file of JPEG bytes plus an index, decoded per batch.

A decoded 224 px ImageNet-1k is 193 GB and holds only each image's centre square; the reference
recipes (solo-learn, eztorch) crop their views from the whole image. So a large image folder is
stored as JPEG: every image re-encoded once (its shorter side capped at ``dataset.encode.short_side``,
``dataset.encode.quality``; grayscale, palette and CMYK made RGB; PNG and other formats converted), or
kept as its original bytes when it already is a baseline RGB JPEG within the cap
(``dataset.encode.keep_original``). All bytes go into one file (``<name>-<key>.jpegs``) beside an
index (``<name>-<key>.index.pt``: offset, size, height, width and label of every image, the class
names and the train/test split), keyed by the folder manifest and the encode options.

The build is a stage (harness/jobs/stages.py): images are encoded in shards by worker processes,
each shard published atomically into ``<name>-<key>.building/``, so a build killed or stopped by a
full disk keeps its finished shards and the next run resumes; the last step concatenates the shards
and publishes the index last (the index is the "done" marker). Every rank maps the same file: the
page cache holds one copy per node.

Each step decodes only its batch (``decode_batch``): nvJPEG through torchvision.io.decode_jpeg on a
list of tensors on CUDA; libjpeg-turbo through PIL in a thread pool on the CPU (PIL releases the GIL
while decoding; torchvision's CPU decoder is used instead where its image extension loads). The
next batch is decoded on a helper thread while the current step runs (``EncodedBatches``).
"""

from __future__ import annotations

import errno
import hashlib
import io
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from harness.atomic import atomic_file, lock_or_wait
from harness.core.data.workers import DecodeFailed, WorkerDied, image_threads, map_in_processes, set_image_threads
from harness.core.progress import Progress
from harness.errors import ConfigError

# Part of the store's key: a change to how images are encoded must not reuse old stores.
ENCODE_VERSION = "encoded-jpeg-1"
SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")
DEFAULTS = {"quality": 90, "short_side": 288, "keep_original": False, "on_bad": "fail"}
ON_BAD = ("fail", "skip")
SHARD_IMAGES = 256  # images per shard: the unit a killed build loses at most


class BadImages(ValueError):
    """Images that cannot be read, with dataset.encode.on_bad=fail: one line names them."""


# ---------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class EncodeOptions:
    """How each image is stored (``dataset.encode``)."""

    quality: int = DEFAULTS["quality"]
    short_side: int | None = DEFAULTS["short_side"]  # None: never resized
    keep_original: bool = DEFAULTS["keep_original"]
    on_bad: str = DEFAULTS["on_bad"]

    @classmethod
    def from_config(cls, ds) -> EncodeOptions:
        enc = dict(ds.get("encode") or {})
        side = enc.get("short_side", DEFAULTS["short_side"])
        return cls(int(enc.get("quality", DEFAULTS["quality"])), int(side) if side else None,
                   bool(enc.get("keep_original", DEFAULTS["keep_original"])),
                   str(enc.get("on_bad", DEFAULTS["on_bad"])))

    def key(self) -> str:
        # on_bad is left out: a store is the same under both settings, or (fail, with bad files) not
        # published at all, and a rerun with on_bad=skip then resumes from the same shards.
        return f"q{self.quality}:s{self.short_side}:k{int(self.keep_original)}"


def is_encoded(ds) -> bool:
    """Whether dataset config `ds` keeps its images encoded (``dataset.store: encoded``)."""
    return ds.get("store", "decoded") == "encoded"


def config_errors(cfg) -> list[ConfigError]:
    """dataset.store, dataset.encode.* and the view sizes, checked before anything runs."""
    ds = cfg.dataset
    store = ds.get("store", "decoded")
    if store not in ("decoded", "encoded"):
        return [ConfigError("dataset.store", store, "decoded or encoded")]
    if store != "encoded":
        return []
    errors = []
    if ds.get("name") != "imagefolder":
        errors.append(ConfigError("dataset.store", store, f"decoded for dataset.name={ds.get('name')} "
                                  "(only image folders are kept encoded)"))
    enc = dict(ds.get("encode") or {})
    unknown = sorted(set(enc) - set(DEFAULTS))
    if unknown:
        errors.append(ConfigError(f"dataset.encode.{unknown[0]}", enc[unknown[0]], f"one of {', '.join(DEFAULTS)}"))
    quality = enc.get("quality", DEFAULTS["quality"])
    if not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 100:
        errors.append(ConfigError("dataset.encode.quality", quality, "an integer from 1 to 100"))
    side = enc.get("short_side", DEFAULTS["short_side"])
    if side is not None and (not isinstance(side, int) or isinstance(side, bool) or side < 32):
        errors.append(ConfigError("dataset.encode.short_side", side, "an integer >= 32, or null (no cap)"))
    if enc.get("on_bad", DEFAULTS["on_bad"]) not in ON_BAD:
        errors.append(ConfigError("dataset.encode.on_bad", enc.get("on_bad"), " or ".join(ON_BAD)))
    size = ds.get("image_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        errors.append(ConfigError("dataset.image_size", size, "an integer >= 8 (the view and evaluation size) "
                                  "with dataset.store=encoded"))
    resize = ds.get("eval_resize")
    if resize is not None and (not isinstance(resize, int) or isinstance(size, int) and resize < size):
        errors.append(ConfigError("dataset.eval_resize", resize, f"an integer >= dataset.image_size ({size}), or null"))
    for field in ("mean", "std"):
        if ds.get(field) == "auto":
            errors.append(ConfigError(f"dataset.{field}", "auto", "3 numbers with dataset.store=encoded (auto is "
                                      "computed from a decoded cache)"))
    if cfg.get("weighting") and cfg.weighting.get("mode") == "joint":
        errors.append(ConfigError("weighting.mode", "joint", "pretrained with dataset.store=encoded (joint mode "
                                  "trains the score network on each step's images, which an encoded store "
                                  "decodes whole, of many sizes)"))
    return errors


# ---------------------------------------------------------------------------------- listing
def list_images(root: Path) -> tuple[list[tuple[str, str, Path]], list[str]]:
    """(split, class, path) of every image of a train/<class>/*, test/<class>/* tree, and the classes.

    A class folder without images, or a folder that cannot be listed, is refused in one line: an
    empty class would shift every label after it between the splits.
    """
    items: list[tuple[str, str, Path]] = []
    classes: set[str] = set()
    for split in ("train", "test"):
        folder = root / split
        try:
            class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
        except OSError as e:
            raise ConfigError("dataset.root", str(root), f"a tree whose folders this user can list: {folder}: "
                              f"{e.strerror or e}") from None
        for cls_dir in class_dirs:
            try:
                files = sorted(f for f in cls_dir.iterdir() if f.suffix.lower() in SUFFIXES)
            except OSError as e:
                raise ConfigError("dataset.root", str(root), f"a tree whose folders this user can list: {cls_dir}: "
                                  f"{e.strerror or e}") from None
            if not files:
                raise ConfigError("dataset.root", str(root), f"image files ({', '.join(SUFFIXES)}) in every class "
                                  f"folder: {cls_dir} has none (remove it or add its images)")
            classes.add(cls_dir.name)
            items += [(split, cls_dir.name, f) for f in files]
    for split in ("train", "test"):
        if not any(s == split for s, _, _ in items):
            raise ConfigError("dataset.root", str(root), f"a {split}/<class>/* folder with images")
    return items, sorted(classes)


# ---------------------------------------------------------------------------------- encoding
def encode_image(data: bytes, opts: EncodeOptions) -> tuple[bytes, int, int]:
    """One image file's bytes as stored: (JPEG bytes, height, width). Raises OSError/ValueError when
    the file is not a readable image (truncated, not an image at all)."""
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    scale = opts.short_side / min(w, h) if opts.short_side and min(w, h) > opts.short_side else 1.0
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    if (opts.keep_original and img.format == "JPEG" and img.mode == "RGB" and scale == 1.0
            and not img.info.get("progressive")):
        img.load()  # a truncated original is refused like any other bad file
        return data, h, w
    if scale < 1.0 and img.format == "JPEG":
        img.draft("RGB", (out_w, out_h))  # libjpeg decodes straight at 1/2, 1/4, 1/8 when that is enough
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    img = img.convert("RGB")  # grayscale, palette, CMYK (Adobe's inverted form too) and alpha: 3 channels
    if img.size != (out_w, out_h):
        img = img.resize((out_w, out_h), Image.BICUBIC, reducing_gap=None)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=opts.quality)
    return buf.getvalue(), out_h, out_w


def _encode_shard(task: tuple[str, list[str], EncodeOptions]) -> None:
    """Encode one shard's files and publish them as one file (bytes, sizes, heights, widths, bad)."""
    out, paths, opts = task
    blobs, sizes, hw, bad = [], [], [], []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                data, h, w = encode_image(fh.read(), opts)
        except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            bad.append(f"{path} ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
            data, h, w = b"", 0, 0
        blobs.append(data)
        sizes.append(len(data))
        hw.append((h, w))
    shard = {"bytes": torch.frombuffer(bytearray(b"".join(blobs)) or bytearray(1), dtype=torch.uint8),
             "sizes": torch.tensor(sizes, dtype=torch.int64), "hw": torch.tensor(hw, dtype=torch.int32).view(-1, 2),
             "bad": bad}
    with atomic_file(out) as f:  # a shard is there whole or not at all: a rerun redoes only missing ones
        torch.save(shard, f)


# ---------------------------------------------------------------------------------- the store
def store_dir(ds) -> Path:
    from harness.core.data.datasets import cache_dir

    return cache_dir(ds)


def store_key(root: Path, opts: EncodeOptions) -> str:
    from harness.core.data.datasets import folder_manifest

    ident = [ENCODE_VERSION, folder_manifest(root), opts.key()]
    return hashlib.sha256("|".join(ident).encode()).hexdigest()[:16]


def store_paths(ds) -> tuple[Path, Path]:
    """(bytes file, index file) of the encoded store of dataset config `ds`."""
    root = Path(str(ds.root)).expanduser()
    stem = store_dir(ds) / f"{ds.name}-encoded-{store_key(root, EncodeOptions.from_config(ds))}"
    return Path(str(stem) + ".jpegs"), Path(str(stem) + ".index.pt")


# JPEG bits per pixel by quality, measured on natural photographs at 256-352 px (README, "Data at
# ImageNet scale"); the memory check's estimate of a store not built yet.
BITS_PER_PIXEL = ((80, 1.5), (90, 2.2), (95, 3.1), (100, 6.0))


def estimated_image_bytes(ds) -> int:
    """Bytes an image takes in the store of `ds`: measured when the store is built, else estimated from
    the encode options for an ImageNet-shaped (4:3) image at the capped size."""
    index_file = store_paths(ds)[1]
    if index_file.exists():
        index, _ = open_store(str(index_file))
        return int(index["bytes"] / max(len(index["sizes"]), 1))
    opts = EncodeOptions.from_config(ds)
    side = opts.short_side or 375  # uncapped: a typical ImageNet image is 500 x 375
    bits = next(b for q, b in BITS_PER_PIXEL if opts.quality <= q)
    return int(bits * side * side * 4 / 3 / 8)


def build_workers(ds, images: int) -> int:
    from harness.core.data.datasets import IMAGES_PER_PROCESS, decode_workers

    workers = decode_workers(ds)
    if not ds.get("decode_workers"):  # a process costs seconds to start (it imports torch)
        workers = min(workers, max(1, images // IMAGES_PER_PROCESS))
    return workers


def ensure_store(ds, lock_timeout_s: float | None = None, shard_images: int = SHARD_IMAGES) -> Path:
    """Build the encoded store of dataset config `ds` unless it is there; return its index file.

    Built once under ``<index>.lock``; other processes wait for it (at most `lock_timeout_s`).
    """
    root = Path(str(ds.root)).expanduser()
    data_file, index_file = store_paths(ds)
    if index_file.exists():
        return index_file
    data_file.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_or_wait(str(index_file) + ".lock", f"[data] another job is encoding {root} into {data_file}; "
                        "waiting for it", lock_timeout_s)
    try:
        if not index_file.exists():
            build_store(root, data_file, index_file, EncodeOptions.from_config(ds), lambda n: build_workers(ds, n),
                        shard_images)
    finally:
        lock.release()
    return index_file


def build_store(root: Path, data_file: Path, index_file: Path, opts: EncodeOptions, workers_for,
                shard_images: int = SHARD_IMAGES) -> None:
    """Encode every image of `root` in shards (resuming from the shards a stopped build left), then
    concatenate them into `data_file` and publish `index_file` last."""
    items, classes = list_images(root)
    label = {c: i for i, c in enumerate(classes)}
    building = Path(str(data_file) + ".building")
    building.mkdir(exist_ok=True)
    for stale in building.glob(".*.tmp"):  # a killed writer's partial shard
        stale.unlink(missing_ok=True)
    shards = [(str(building / f"shard-{i // shard_images:06d}.pt"), [str(p) for _, _, p in items[i:i + shard_images]],
               opts) for i in range(0, len(items), shard_images)]
    todo = [s for s in shards if not Path(s[0]).exists()]
    total = len(items)
    if len(todo) < len(shards):
        print(f"[data] resuming the encoded store of {root}: {len(shards) - len(todo)} of {len(shards)} shards "
              "are already built", file=sys.stderr, flush=True)
    workers = max(1, min(workers_for(total), len(todo)))
    print(f"[data] encoding {total} images of {root} into {data_file} ({len(todo)} shards to build, {workers} "
          f"process{'es' if workers > 1 else ''}; JPEG quality {opts.quality}, shorter side at most "
          f"{opts.short_side or 'unchanged'})", file=sys.stderr, flush=True)
    progress = Progress("[data] encoding:", total, every=3.0)
    done = sum(len(s[1]) for s in shards) - sum(len(s[1]) for s in todo)
    results = (map(_encode_shard, todo) if workers == 1 or len(todo) == 1
               else map_in_processes(_encode_shard, todo, workers, __name__))
    try:
        for shard, _ in zip(todo, results):
            done += len(shard[1])
            progress.update(min(done, total), f"{min(done, total)}/{total} images", final=done >= total)
    except WorkerDied as e:
        kept = sum(1 for s in shards if Path(s[0]).exists())
        raise DecodeFailed(f"the encoded store's build of {root} stopped: an encoding worker died ({e.how}); "
                           f"{kept} of {len(shards)} shards are kept in {building} and the next "
                           "run resumes from them") from e
    except OSError as e:
        _stopped_by_disk(e, building, shards)
        raise
    _assemble(shards, items, classes, label, data_file, index_file, opts, root)
    shutil.rmtree(building, ignore_errors=True)


def _stopped_by_disk(e: OSError, building: Path, shards: list) -> None:
    """Say, in one line, that the disk stopped the build and that the next run resumes it."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        kept = sum(1 for s in shards if Path(s[0]).exists())
        print(f"[data] the encoded store's build stopped: {(e.strerror or str(e)).lower()} writing "
              f"{e.filename or building}; {kept} of {len(shards)} shards are kept in {building} and the next run "
              "resumes from them", file=sys.stderr, flush=True)


def _assemble(shards, items, classes, label, data_file: Path, index_file: Path, opts: EncodeOptions,
              root: Path) -> None:
    """Concatenate the shards into `data_file`, then publish the index (skipping or refusing bad files)."""
    bad: list[str] = []
    for out, _, _ in shards:
        bad += torch.load(out, weights_only=True, mmap=True)["bad"]
    if bad and opts.on_bad == "fail":
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise BadImages(f"dataset.root: {bad[0]}{more} cannot be read as an image; fix or remove "
                        f"{'them' if more else 'it'}, or set dataset.encode.on_bad=skip to leave them out")
    offsets, sizes, hws = [], [], []
    position = 0
    try:
        with atomic_file(data_file) as f:
            for out, _, _ in shards:
                shard = torch.load(out, weights_only=True, mmap=True)
                f.write(shard["bytes"][:int(shard["sizes"].sum())].numpy().tobytes())
                offsets.append(position + torch.cumsum(shard["sizes"], 0) - shard["sizes"])
                position += int(shard["sizes"].sum())
                sizes.append(shard["sizes"])
                hws.append(shard["hw"])
    except OSError as e:
        _stopped_by_disk(e, data_file.parent, shards)
        raise
    offsets_t, sizes_t, hw = torch.cat(offsets), torch.cat(sizes), torch.cat(hws)
    keep = sizes_t > 0
    for name in bad:
        print(f"[data] skipped (dataset.encode.on_bad=skip): {name}", file=sys.stderr, flush=True)
    labels = torch.tensor([label[c] for _, c, _ in items], dtype=torch.int64)
    is_train = torch.tensor([s == "train" for s, _, _ in items])
    index = {"offsets": offsets_t[keep], "sizes": sizes_t[keep], "hw": hw[keep], "labels": labels[keep],
             "train": is_train[keep], "classes": classes, "source": f"encoded:{root}", "bytes": position,
             "skipped": bad, "options": opts.key()}
    with atomic_file(index_file) as f:  # published last: the store is done when its index exists
        torch.save(index, f)
    print(f"[data] encoded store ready: {int(keep.sum())} images, {position / 1e6:,.1f} MB "
          f"({position / max(int(keep.sum()), 1) / 1e3:,.1f} KB an image) in {data_file}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- reading
@lru_cache(maxsize=8)
def open_store(index_file: str) -> tuple[dict, np.memmap]:
    """The index and the memory-mapped bytes of a store (read-only; one copy per node in the page cache)."""
    index = torch.load(index_file, weights_only=True)
    data_file = index_file[: -len(".index.pt")] + ".jpegs"
    data = np.memmap(data_file, dtype=np.uint8, mode="r") if index["bytes"] else np.zeros(1, np.uint8)
    return index, data


_DECODER_CHECKED: list[bool] = []


def _torchvision_decoder() -> bool:
    """Whether torchvision's JPEG decoder (its image extension) loads here; a CPU-only torch beside a
    CUDA torchvision cannot load it, and PIL decodes instead."""
    if not _DECODER_CHECKED:
        try:
            from harness.core.tv import torchvision

            probe = torchvision.io.encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))
            torchvision.io.decode_jpeg(probe)
            _DECODER_CHECKED.append(True)
        except Exception:  # noqa: BLE001 - any failure to load the extension means: use PIL
            _DECODER_CHECKED.append(False)
    return _DECODER_CHECKED[0]


def decode_jpeg_cpu(data: np.ndarray | torch.Tensor) -> torch.Tensor:
    """One JPEG's pixels as a 3×H×W uint8 tensor (a view of H×W×3 memory, as every CPU decoder gives),
    by OpenCV's libjpeg-turbo: the same pixels as PIL's decode (tested), in about half its time (no PIL
    image in between)."""
    import cv2

    rgb = getattr(cv2, "IMREAD_COLOR_RGB", None)
    array = cv2.imdecode(np.asarray(data), rgb if rgb is not None else cv2.IMREAD_COLOR)
    if array is None:
        raise ValueError("not a JPEG that OpenCV can decode")
    if rgb is None:
        array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    return torch.from_numpy(array).permute(2, 0, 1)


def set_decode_threads(n: int) -> None:
    """Decode (and make the CPU's views) with `n` threads (default: one per core this process may use)."""
    set_image_threads(n)


def decode_batch(blobs: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Decode a batch of JPEG byte arrays to 3×H×W uint8 tensors on `device`: nvJPEG in one batched
    call on CUDA, libjpeg-turbo (OpenCV's) from the image threads on the CPU."""
    if device.type == "cuda" and _torchvision_decoder():
        from harness.core.tv import torchvision

        # a tensor is passed as it is (a slice of a pinned buffer); a view of the mapped file is copied
        tensors = [b if isinstance(b, torch.Tensor) else torch.from_numpy(np.array(b)) for b in blobs]
        return torchvision.io.decode_jpeg(tensors, mode=torchvision.io.ImageReadMode.RGB, device=device)
    images = list(image_threads().map(decode_jpeg_cpu, blobs))
    return [x.to(device, non_blocking=True) for x in images] if device.type != "cpu" else images


def centre_crops(images: list[torch.Tensor], resize: int, crop: int) -> torch.Tensor:
    """The evaluation view: shorter side resized to `resize` (bilinear, antialiased), centre `crop`
    square, as uint8 N×3×crop×crop (torchvision's Resize(256) + CenterCrop(224) at 224)."""
    out = []
    for x in images:
        h, w = x.shape[-2:]
        scale = resize / min(h, w)
        nh, nw = max(crop, round(h * scale)), max(crop, round(w * scale))
        y = F.interpolate(x[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
        out.append(y[0, :, top:top + crop, left:left + crop])
    return torch.stack(out).round_().clamp_(0, 255).to(torch.uint8)


class EncodedSplit:
    """One split of an encoded store as the trainer and the probes see it.

    `len()` and `.shape` as a decoded split's; a slice or `take_rows(idx)` is a subset (a view of the
    same mapped bytes); `.to(device)` decodes it to the evaluation view (resize, centre crop), as the
    probes do with each batch; `batches(device, size)` is the training batch source."""

    def __init__(self, index_file: str, rows: torch.Tensor, size: int, eval_resize: int):
        self.index_file, self.rows, self.size, self.eval_resize = index_file, rows, size, eval_resize
        index, _ = open_store(index_file)
        self.hw = index["hw"][rows]
        self.nbytes = int(index["sizes"][rows].sum())

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.rows), 3, self.size, self.size)

    def take_rows(self, idx: torch.Tensor) -> EncodedSplit:
        return EncodedSplit(self.index_file, self.rows[idx], self.size, self.eval_resize)

    def blobs(self, idx) -> list[np.ndarray]:
        """The JPEG bytes of images `idx` (positions in this split), as views of the mapped file."""
        index, data = open_store(self.index_file)
        rows = self.rows[idx]
        offsets, sizes = index["offsets"][rows].tolist(), index["sizes"][rows].tolist()
        return [data[o:o + s] for o, s in zip(offsets, sizes)]

    def decode(self, idx, device: torch.device) -> list[torch.Tensor]:
        """Images `idx` whole, decoded on `device` (3×H×W uint8 each)."""
        return decode_batch(self.blobs(idx), device)

    def __getitem__(self, key: slice) -> EncodedSplit:
        """Images `key` as a split of their own: nothing is decoded until `.to(device)` (the probes
        slice a whole split per rank, then batches of it)."""
        return self.take_rows(torch.arange(len(self.rows))[key])

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:
        """The evaluation view of every image of this split: centre crops, uint8 N×3×size×size."""
        if len(self.rows) == 0:
            return torch.zeros(0, 3, self.size, self.size, dtype=torch.uint8, device=device)
        images = self.decode(torch.arange(len(self.rows)), torch.device(device))
        return centre_crops(images, self.eval_resize, self.size)

    def batches(self, device: torch.device, size: int, residency: str = "host") -> EncodedBatches:
        return EncodedBatches(self, device, residency)

    def augmented(self, pipeline, generator: torch.Generator, seed: int = 0) -> AugmentedSplit:
        """This split as views of `pipeline` (e.g. the linear probe's RandomResizedCrop + flip); crop boxes
        from a CPU generator seeded `seed`, the rest from `generator`."""
        return AugmentedSplit(self, pipeline, generator, torch.Generator().manual_seed(seed))


class AugmentedSplit:
    """An encoded split whose slices are augmented views of the whole images (float N×3×size×size in
    [0, 1], made on the generator's device): what the linear probe's training features are taken of."""

    def __init__(self, split: EncodedSplit, pipeline, generator: torch.Generator, boxes: torch.Generator):
        self.split, self.pipeline, self.generator, self.boxes = split, pipeline, generator, boxes

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: slice) -> AugmentedSplit:
        return AugmentedSplit(self.split[key], self.pipeline, self.generator, self.boxes)

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:
        """Augmented views of every image of this split (float in [0, 1]), on the generator's device."""
        from harness.core.data.augment import augment_images

        if len(self.split) == 0:
            return torch.zeros(0, 3, self.split.size, self.split.size, device=self.generator.device)
        images = self.split.decode(torch.arange(len(self.split)), self.generator.device)
        return augment_images(images, self.pipeline, self.generator, self.split.size, self.boxes)


class EncodedBatches:
    """The training batch source of an encoded split: each step's images decoded whole on the device,
    the next step's bytes gathered and decoded on a helper thread while the current step runs.

    Where the JPEG bytes live (``dataset.residency``, resolved by residency.resolve on the set's JPEG
    bytes): on CUDA, ``device`` copies the split's bytes to the GPU once and ``host`` leaves them in
    the mapped file (the node's page cache); either way each step's bytes are put in a pinned host
    buffer before nvJPEG decodes them, since torchvision's decode_jpeg reads its input from host memory
    whatever the output device (a batch is a few MB: 256 images at ~34 KB). What ``device`` buys is
    independence from the host's page cache (no re-read from disk after an eviction). On the CPU the
    mapped bytes are what is decoded, whatever the choice (the host is the device).
    """

    def __init__(self, split: EncodedSplit, device: torch.device, residency: str = "host"):
        if residency not in ("device", "host"):
            raise ValueError(f"dataset.residency = {residency!r} for an encoded set: device or host (auto is "
                             "resolved before the batches are made)")
        self.split, self.device, self.residency = split, device, residency
        self.cuda = device.type == "cuda"
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="encoded-batches")
        sizes = index_sizes(split)
        # where each image's bytes start in the split's own concatenation (device residency)
        self.starts = torch.cumsum(sizes, 0) - sizes
        self.sizes = sizes
        self.on_device = self._copy_to_device() if self.cuda and residency == "device" else None
        # the device-to-host copies of a step's bytes run on a stream of their own: the step's work does not wait
        self.stream = torch.cuda.Stream(device) if self.on_device is not None else None
        self.held: list[torch.Tensor] = []  # the last pinned buffers, kept while their decodes may run

    def close(self) -> None:
        """Stop the prefetch thread with the run (it ends, or fails): a batch it still decodes is dropped."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.held.clear()

    def _copy_to_device(self) -> torch.Tensor:
        """The split's JPEG bytes, concatenated in split order, in one uint8 tensor on the device
        (copied in chunks: never the whole set in host memory at once)."""
        out = torch.empty(int(self.sizes.sum()), dtype=torch.uint8, device=self.device)
        chunk = 4096
        for first in range(0, len(self.split), chunk):
            idx = torch.arange(first, min(first + chunk, len(self.split)))
            host = torch.from_numpy(np.concatenate(self.split.blobs(idx)))
            start = int(self.starts[first])
            out[start:start + len(host)].copy_(host)
        return out

    def _pinned(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """The JPEG bytes of images `idx` (positions in the split) as slices of one pinned host buffer."""
        sizes = self.sizes[idx]
        ends = torch.cumsum(sizes, 0)
        # pinned on CUDA (nvJPEG's copies of it are then asynchronous); the same bookkeeping runs on the CPU
        buffer = torch.empty(int(ends[-1]) if len(idx) else 0, dtype=torch.uint8, pin_memory=self.cuda)
        bounds = list(zip((ends - sizes).tolist(), ends.tolist()))
        if self.on_device is not None:
            with torch.cuda.stream(self.stream):  # None (a no-op) where the bytes were put on the CPU
                for (a, b), start in zip(bounds, self.starts[idx].tolist()):
                    buffer[a:b].copy_(self.on_device[start:start + b - a], non_blocking=self.cuda)
            if self.stream is not None:
                self.stream.synchronize()
        else:
            view = buffer.numpy()
            for (a, b), blob in zip(bounds, self.split.blobs(idx)):
                view[a:b] = blob
        # a decode of this buffer may still read it after the call returns: keep the last two alive
        self.held = [*self.held[-1:], buffer]
        return [buffer[a:b] for a, b in bounds]

    def load(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Images `idx` (positions in the split) decoded whole on the device."""
        if not self.cuda:
            return self.split.decode(idx, self.device)
        return decode_batch(self._pinned(idx), self.device)

    def epoch(self, order: torch.Tensor, steps: range, start, size: int):
        """(step, indices into the training set on the device, list of decoded images) for each step."""
        order = order.cpu()
        steps = list(steps)

        def load(step: int) -> list[torch.Tensor]:
            return self.load(order[start(step):][:size])

        pending = self.pool.submit(load, steps[0]) if steps else None
        for i, step in enumerate(steps):
            images = pending.result()
            if i + 1 < len(steps):
                pending = self.pool.submit(load, steps[i + 1])
            yield step, order[start(step):][:size].to(self.device, non_blocking=True), images


# The side of the images an add-on's own network works at (ScoreCL's score network, CLSP's DDPM and
# its synthetic set) on an encoded store, when its config leaves it null: an encoded store's images
# have many sizes, and at the views' 224 px ImageNet-100 alone would be 19 GB of decoded images.
ADDON_SIZE_ON_ENCODED = 64


def addon_image_size(configured, images) -> int:
    """The side an add-on's network works at: its configured size, else the decoded images' own, else
    (an encoded split) ADDON_SIZE_ON_ENCODED."""
    if configured is not None:
        return int(configured)
    return ADDON_SIZE_ON_ENCODED if isinstance(images, EncodedSplit) else int(images.shape[-1])


def resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 N×3×H×W resized to size×size (bilinear, antialiased), uint8."""
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).round_().clamp_(0, 255).to(torch.uint8)


def at_size(images, size: int, chunk: int = 512):
    """Training images as an add-on's network sees them, size×size uint8: a decoded tensor as it is when
    the size is its own, else resized; an encoded split as the same images whose `.to(device)` (and
    slices') decode centre crops at `size` (shorter side to size/0.875, the evaluation view's ratio)."""
    if isinstance(images, EncodedSplit):
        return EncodedSplit(images.index_file, images.rows, size, round(size / 0.875))
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return torch.cat([resize_uint8(images[i:i + chunk], size) for i in range(0, len(images), chunk)])


def take(images, rows) -> torch.Tensor:
    """Images `rows` (positions) of a decoded tensor or an encoded split, as a uint8 tensor on the CPU."""
    rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
    return images.take_rows(rows).to("cpu") if isinstance(images, EncodedSplit) else images[rows]


def index_sizes(split: EncodedSplit) -> torch.Tensor:
    """The JPEG size in bytes of every image of `split`, in split order (int64)."""
    index, _ = open_store(split.index_file)
    return index["sizes"][split.rows].to(torch.int64)


def load_encoded(ds, lock_timeout_s: float | None = None) -> dict:
    """The ImageData fields of an encoded image folder (building its store first if needed)."""
    index_file = str(ensure_store(ds, lock_timeout_s))
    index, _ = open_store(index_file)
    size = int(ds.image_size)
    resize = int(ds.get("eval_resize") or round(size / 0.875))  # 224 -> 256, the standard ratio
    train = torch.nonzero(index["train"]).flatten()
    test = torch.nonzero(~index["train"]).flatten()
    return {"train_x": EncodedSplit(index_file, train, size, resize), "train_y": index["labels"][train],
            "test_x": EncodedSplit(index_file, test, size, resize), "test_y": index["labels"][test],
            "classes": list(index["classes"]), "source": index["source"]}


def load_dataset(ds, lock_timeout_s: float | None = None):
    """What datasets.load_dataset gives, for any dataset config: an encoded image folder from its store
    (subsets are views of the same mapped bytes), anything else decoded as before."""
    from harness.core.data import datasets

    if not is_encoded(ds):
        return datasets.load_dataset(ds)
    return datasets.with_subsets(datasets.ImageData(**load_encoded(ds, lock_timeout_s)), ds)


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.core.data.encoded ROOT --out DIR [--quality Q] [--short-side S] [--workers N]``:
    build a store outside a job (what the dataset stage does)."""
    import argparse

    from omegaconf import OmegaConf

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("root")
    parser.add_argument("--out", required=True)
    parser.add_argument("--quality", type=int, default=DEFAULTS["quality"])
    parser.add_argument("--short-side", type=int, default=DEFAULTS["short_side"])
    parser.add_argument("--on-bad", default=DEFAULTS["on_bad"], choices=ON_BAD)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--shard-images", type=int, default=SHARD_IMAGES)
    args = parser.parse_args(argv)
    ds = OmegaConf.create({"name": "imagefolder", "root": args.root, "cache_dir": args.out, "store": "encoded",
                           "decode_workers": args.workers, "encode": {"quality": args.quality,
                                                                      "short_side": args.short_side,
                                                                      "on_bad": args.on_bad}})
    try:
        print(ensure_store(ds, shard_images=args.shard_images))
    except (ConfigError, BadImages, DecodeFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return 1  # said in one line by the build
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
