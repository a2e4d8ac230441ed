"""The first GPU session's one command (issue 18): about 9 minutes on one H200, results into RESULTS.md.

    python benchmarks/gpu_check.py [--budget-s 540] [--peak-tflops 989]    # on a GPU
    python benchmarks/gpu_check.py --dry-run --out /tmp/check.md            # CPU: the same code paths

(a) every method 20 steps, ResNet-18 on CIFAR-10, under torch.cuda.set_sync_debug_mode("error") in
    the step body (off at the trainer's logging points): any host sync fails the check;
(b) SimCLR ResNet-18 batch 512: seconds per epoch and MFU, eager vs compiled, fp32 vs bf16;
(c) peak GPU memory per method (from the runs of a);
(d) with the time left (at most 5 minutes), SimCLR ResNet-18 for as many epochs as fit, its k-NN
    curve beside lightly's published 200-epoch point (84.8 at batch 512, docs/references.md);
(e) ImageNet-like input (issue 25): generated JPEGs of 200-600 px in the encoded store, decoded per
    batch with nvJPEG and made into two 224 px views (augment=imagenet_symmetric) on the GPU, images/s
    beside SimCLR ResNet-50's bf16 training rate (goal: input at least twice as fast), then a short
    SimCLR ResNet-50 run on them (decode, crops of whole images, k-NN on centre crops).

The CIFAR-10 archive, in this order: $HARNESS_CIFAR10_ARCHIVE; ../shared/data/cifar10-jpeg.tar.xz
(the harness's default); ./shared/data/cifar10-jpeg.tar.xz. The device tool copies the working tree
and a shared/ folder inside it, so before `run` either copy the archive to <worktree>/shared/data/
(18 MB, untracked) or carry it and set HARNESS_CIFAR10_ARCHIVE. Without any, the check runs on
random images and says so loudly: timings and syncs still count, the k-NN curve does not.

--dry-run runs every part on the CPU with the ConvNet, a few random images and 1 step (compile
with the aot_eager backend): the same trainer, methods, sync-mode switching and report, minus the
CUDA calls. CI runs it (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import machine, versions  # noqa: E402
from harness.atomic import write_text_atomic  # noqa: E402
from harness.core import device_path, trainer  # noqa: E402
from harness.core.data.datasets import ImageData  # noqa: E402
from harness.core.distributed import DistInfo  # noqa: E402
from harness.jobs.config import build_addons, compose, instantiate  # noqa: E402
from leaderboard.text import format_table  # noqa: E402

METHODS: dict[str, tuple[str, ...]] = {  # small queues: 20 steps would not fill the papers' sizes
    "simclr": (), "simsiam": (), "wmse": (), "vicreg": (), "byol": (),
    "mocov2": ("method.queue_size=4096",), "sce": ("method.queue_size=4096",),
    "nnclr": ("method.queue_size=4096",), "all4one": ("method.queue_size=4096",),
}
DRY_METHODS = {"wmse": ("method.proj_output_dim=8", "method.whitening_size=16"),
               **{m: ("method.queue_size=64",) for m in ("mocov2", "sce", "nnclr", "all4one")}}
LIGHTLY_SIMCLR_200EP_BS512 = 84.8  # k-NN top-1 (k=200, T=0.1), best epoch on the test set


def find_archive() -> Path | None:
    here = Path(__file__).resolve().parents[1]
    candidates = [os.environ.get("HARNESS_CIFAR10_ARCHIVE"), here.parent / "shared/data/cifar10-jpeg.tar.xz",
                  here / "shared/data/cifar10-jpeg.tar.xz"]
    return next((Path(c) for c in candidates if c and Path(c).exists()), None)


class Check:
    """What every part shares: the device, the data, the time budget and the report's sections."""

    def __init__(self, args):
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.deadline = time.monotonic() + args.budget_s
        self.peak_flops = args.peak_tflops * 1e12
        self.sections: list[str] = []
        self.notes: list[str] = []
        self.failures: list[str] = []
        self.methods = args.methods.split(",") if args.methods else list(METHODS)
        self.data = self.load_data()

    def load_data(self) -> ImageData:
        archive = None if self.dry else find_archive()
        if archive is not None:
            from harness.core.data.datasets import load_dataset

            os.environ["HARNESS_CIFAR10_ARCHIVE"] = str(archive)
            self.real_data = True
            return load_dataset(compose(["dataset.archive=" + str(archive)]).dataset)
        self.real_data = False
        if not self.dry:
            print("#" * 80 + "\n# gpu_check: NO CIFAR-10 ARCHIVE FOUND: RANDOM IMAGES. Timings and syncs count; "
                  "k-NN does not.\n" + "#" * 80, file=sys.stderr, flush=True)
            self.notes.append("**No CIFAR-10 archive was found: random images. The k-NN curve means nothing.**")
        n = 32 if self.dry else 50_000
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        labels = torch.arange(n) % 10
        return ImageData(images, labels, images[:16], labels[:16], [str(i) for i in range(10)], "random",
                         train_index=torch.arange(n))

    def config(self, method: str, batch: int, *extra: str):
        if self.dry:
            size = ("backbone=convnet", "backbone.width=8", *DRY_METHODS.get(method, ()))
        else:
            size = ("backbone=resnet18", *METHODS[method])
        return compose([f"method={method}", *size, f"trainer.batch_size={batch}", "trainer.warmup_epochs=0",
                        f"trainer.device={self.device.type}", "trainer.log_every=1000", *extra])

    def training(self, cfg, images: int, tmp: Path) -> trainer.Training:
        data = self.data
        subset = ImageData(data.train_x[:images], data.train_y[:images], data.test_x, data.test_y, data.classes,
                           data.source, train_index=torch.arange(images))
        torch.manual_seed(0)
        model = instantiate(cfg.method, instantiate(cfg.backbone))
        run = trainer.Training(cfg, model, subset, DistInfo(device=self.device), tmp / "ckpt.pt", lambda e, m: None,
                               build_addons(cfg))
        run.resume()
        return run

    def synchronize(self) -> None:
        if not self.dry:
            torch.cuda.synchronize()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def section(self, title: str, rows: list[dict], columns: list[str], note: str = "") -> None:
        text = f"### {title}\n\n```\n{format_table(rows, columns)}\n```\n" + (f"\n{note}\n" if note else "")
        print(text, flush=True)
        self.sections.append(text)


@contextlib.contextmanager
def syncs_are_errors(dry: bool):
    """Host syncs raise inside each step body; the trainer's logging point (_sync_point) is exempt.

    The views are the first thing a step makes, so making them switches the mode on; the logging point
    switches it off for the rest of that step and for what follows the loop (the epoch's end).
    """
    def set_mode(mode: str) -> None:
        if not dry:
            torch.cuda.set_sync_debug_mode(mode)

    sync_point, make_views = trainer._sync_point, trainer.ViewMaker.__call__

    def views_then_strict(self, x):
        set_mode("error")
        return make_views(self, x)

    def lenient_sync_point(loss):
        set_mode("default")
        return sync_point(loss)

    trainer._sync_point, trainer.ViewMaker.__call__ = lenient_sync_point, views_then_strict
    try:
        yield
    finally:
        set_mode("default")
        trainer._sync_point, trainer.ViewMaker.__call__ = sync_point, make_views


def part_a_and_c(check: Check) -> None:
    """Every method, 20 steps (2 dry) under the sync check; peak memory of each."""
    batch, steps = (16, 1) if check.dry else (256, 20)
    rows = []
    for method in check.methods:
        cfg = check.config(method, batch, "trainer.epochs=1", "eval.every=0")
        with tempfile.TemporaryDirectory() as tmp:
            run = check.training(cfg, batch * steps, Path(tmp))
            if not check.dry:
                torch.cuda.reset_peak_memory_stats()
            verdict = "no sync"
            try:
                with syncs_are_errors(check.dry):
                    sums, *_ = run.train_epoch(0)
                loss = float(sums["loss"]) / steps
            except RuntimeError as e:  # the sync debug mode's error names the op; the traceback, the line
                traceback.print_exc()
                verdict, loss = f"SYNC: {str(e).splitlines()[0][:100]}", float("nan")
                check.failures.append(f"{method}: {verdict}")
            peak = torch.cuda.max_memory_allocated() / 2**30 if not check.dry else float("nan")
        rows.append({"method": method, "steps": steps, "mean_loss": loss, "host_syncs": verdict, "peak_gib": peak})
    check.section(f"(a, c) every method {steps} steps at batch {batch}: host syncs in the step, peak memory", rows,
                  ["method", "steps", "mean_loss", "host_syncs", "peak_gib"])


def step_flops(check: Check, cfg) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = instantiate(cfg.method, instantiate(cfg.backbone)).to(check.device, memory_format=torch.channels_last)
    with tempfile.TemporaryDirectory() as tmp:
        views = check.training(cfg, int(cfg.trainer.batch_size), Path(tmp)).views
    x = check.data.train_x[:int(cfg.trainer.batch_size)].to(check.device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(views(x)).total().backward()
    return float(counter.get_total_flops())


def part_b(check: Check) -> float:
    """SimCLR s/epoch and MFU: eager vs compiled × fp32 vs bf16; returns eager bf16's s/epoch."""
    batch, steps = (16, 1) if check.dry else (512, 30)
    epoch_steps = len(check.data.train_x) // batch
    flops = step_flops(check, check.config("simclr", batch))
    rows, best = [], float("inf")
    for compiled in (False, True):
        for precision in ("fp32", "bf16"):
            cfg = check.config("simclr", batch, "trainer.epochs=2", "eval.every=0", f"trainer.precision={precision}",
                               f"trainer.compile={str(compiled).lower()}")
            with tempfile.TemporaryDirectory() as tmp:
                run = check.training(cfg, batch * steps, Path(tmp))
                start = time.monotonic()
                run.train_epoch(0)  # compilation and warm-up
                warm_s = time.monotonic() - start
                check.synchronize()
                start = time.monotonic()
                run.train_epoch(1)
                check.synchronize()
                seconds = (time.monotonic() - start) / steps
            torch._dynamo.reset()
            epoch_s = seconds * epoch_steps
            if precision == "bf16" and not compiled:  # what part (d) runs (trainer.compile's default, false)
                best = epoch_s
            rows.append({"mode": "compiled" if compiled else "eager", "precision": precision,
                         "s_per_epoch": epoch_s, "images_per_s": batch / seconds, "warmup_s": warm_s,
                         "mfu_pct": 100 * flops / seconds / check.peak_flops})
    check.section(f"(b) SimCLR batch {batch}: seconds per epoch ({epoch_steps} steps, from {steps} timed) and MFU",
                  rows, ["mode", "precision", "s_per_epoch", "images_per_s", "warmup_s", "mfu_pct"],
                  f"MFU: forward+backward FLOPs of one step (torch.utils.flop_counter) per second ÷ "
                  f"{check.peak_flops / 1e12:g} TFLOP/s (dense bf16 peak; fp32 rows use the same peak).")
    return best


def part_d(check: Check, epoch_s: float) -> None:
    """SimCLR for as many epochs as fit in min(5 minutes, what is left), k-NN after each."""
    budget = min(300.0, check.left() - 20)
    batch = 16 if check.dry else 512
    knn_s = 0.0 if check.dry else 5.0  # a k-NN pass over 10,000 queries against 50,000 keys, roughly
    epochs = 1 if check.dry else int(budget // (epoch_s + knn_s))
    if epochs < 1:
        check.section("(d) SimCLR k-NN curve", [], ["epoch"], f"skipped: {budget:.0f} s left")
        return
    cfg = check.config("simclr", batch, f"trainer.epochs={epochs}", "eval.every=1",
                       f"trainer.warmup_epochs={min(10, max(epochs // 10, 0))}")
    curve = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = instantiate(cfg.method, instantiate(cfg.backbone))
        data = check.data
        trainer.fit(cfg, model, data, DistInfo(device=check.device), Path(tmp) / "ckpt.pt",
                    lambda e, m: curve.append({"epoch": e + 1, "loss": m["loss"], "knn_top1": m.get("knn_top1"),
                                               "epoch_s": m["epoch_time_s"]}))
    check.section(f"(d) SimCLR ResNet-18 batch {batch}, {epochs} epochs (cosine schedule over {epochs})", curve,
                  ["epoch", "loss", "knn_top1", "epoch_s"],
                  f"lightly's SimCLR, 200 epochs at batch 512: k-NN {LIGHTLY_SIMCLR_200EP_BS512} (best epoch, "
                  f"../shared/docs/references.md). Not the same schedule: ours decays over {epochs} epochs.")


def part_e(check: Check) -> None:
    """ImageNet-like input rate vs SimCLR ResNet-50 bf16 training rate, then a short run on that input."""
    from benchmarks.imagenet_input import generated_folder
    from harness.core.data import encoded
    from harness.core.data.augment import ViewMaker

    images, batch, size = (16, 8, 32) if check.dry else (2048, 128, 224)
    with tempfile.TemporaryDirectory() as tmp:
        generated_folder(Path(tmp) / "tree", images)
        overrides = ["dataset=imagenet100", f"dataset.root={Path(tmp) / 'tree'}", f"dataset.cache_dir={tmp}/cache",
                     f"dataset.image_size={size}", f"dataset.eval_resize={round(size / 0.875)}",
                     "augment=imagenet_symmetric", f"augment.pipelines.base.size={size}", "method=simclr",
                     "backbone=convnet" if check.dry else "backbone=resnet50", f"trainer.batch_size={batch}",
                     "trainer.warmup_epochs=0", f"trainer.device={check.device.type}", "trainer.log_every=1000",
                     "eval.knn=[{k: 20, T: 0.07}]"]
        cfg = compose(overrides)
        start = time.monotonic()
        data = ImageData(**encoded.load_encoded(cfg.dataset), train_index=torch.arange(images))
        build_s = time.monotonic() - start
        split = data.train_x
        views = ViewMaker(cfg.augment, cfg.dataset.mean, cfg.dataset.std, check.device, seed=0,
                                  channels_last=True, view_size=size)
        steps = len(split) // batch
        rates = []
        for _ in range(2):  # the first pass warms nvJPEG and the allocator
            source = split.batches(check.device, batch)
            check.synchronize()
            start = time.monotonic()
            for _, _, imgs in source.epoch(torch.randperm(len(split)), range(steps), lambda s: s * batch, batch):
                views(imgs)
            check.synchronize()
            rates.append(steps * batch / (time.monotonic() - start))
        rows = [{"what": f"decode + 2 views of {size} px (input)", "images_per_s": max(rates)}]
        train_cfg = compose([*overrides, "trainer.epochs=2", "eval.every=0", "trainer.precision=bf16"])
        n = batch * 4
        fixed = ImageData(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8), torch.arange(n) % 10,
                          data.test_x, data.test_y, data.classes, "random", train_index=torch.arange(n))
        torch.manual_seed(0)
        model = instantiate(train_cfg.method, instantiate(train_cfg.backbone))
        run = trainer.Training(train_cfg, model, fixed, DistInfo(device=check.device), Path(tmp) / "ckpt.pt",
                               lambda e, m: None, [])
        run.resume()
        run.train_epoch(0)
        check.synchronize()
        start = time.monotonic()
        run.train_epoch(1)
        check.synchronize()
        train_rate = n / (time.monotonic() - start)
        rows.append({"what": f"SimCLR {cfg.backbone.name} bf16 training step (uint8 batches already on the device)",
                     "images_per_s": train_rate})
        curve = []
        short = compose([*overrides, "trainer.epochs=2", "eval.every=1"])
        torch.manual_seed(0)
        trainer.fit(short, instantiate(short.method, instantiate(short.backbone)), data,
                    DistInfo(device=check.device), Path(tmp) / "short.pt",
                    lambda e, m: curve.append({"epoch": e + 1, "loss": m["loss"], "knn_top1": m.get("knn_top1"),
                                               "images_per_s": m["images_per_s"]}))
    verdict = "meets" if rows[0]["images_per_s"] >= 2 * train_rate else "MISSES"
    check.section(f"(e) ImageNet-like input: {images} generated JPEGs (200-600 px), batch {batch}", rows,
                  ["what", "images_per_s"], f"Input {rows[0]['images_per_s'] / train_rate:.2f}x the training rate: "
                  f"{verdict} the goal of 2x. Store built in {build_s:.0f} s.")
    check.section("(e) short SimCLR run on the encoded ImageNet-like set", curve,
                  ["epoch", "loss", "knn_top1", "images_per_s"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, ConvNet, random images, 1 step per part")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop part (d) so the whole ends within this")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200 SXM)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    ap.add_argument("--parts", default="a,b,e,d", help="which parts, in this order (a rerun after a fix: --parts a)")
    ap.add_argument("--methods", default="", help=f"part (a)'s methods, comma-separated (default: {','.join(METHODS)})")
    args = ap.parse_args()
    parts = {"a": ("a, c", part_a_and_c), "b": ("b", part_b), "e": ("e", part_e), "d": ("d", part_d)}
    unknown = [p for p in args.parts.split(",") if p not in parts] + [
        m for m in args.methods.split(",") if args.methods and m not in METHODS]
    if unknown:
        ap.error(f"--parts/--methods: {', '.join(unknown)} is not one of {', '.join([*parts, *METHODS])}")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run for the CPU path", file=sys.stderr)
        return 2
    if args.dry_run:
        device_path.COMPILE_BACKEND = "aot_eager"  # inductor's C++ build takes minutes on a CI CPU
    check = Check(args)
    started = time.monotonic()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    def report() -> str:
        head = f"## gpu_check{' (dry run, CPU)' if args.dry_run else ''} — {when}\n\n{machine()}; {versions()}; " \
               f"{time.monotonic() - started:.0f} s; data: {check.data.source}\n"
        verdict = ("\n".join(f"- FAILED {f}" for f in check.failures)
                   or "All methods ran without a host sync in the step.")
        return "\n".join([head, *check.notes, *check.sections, verdict, ""])

    # Each part's failure is reported and the next part still runs, and the report is written after every
    # part: device time is scarce, and a crash or time-out late in the check must not lose what came before.
    before = args.out.read_text() if args.out.exists() else ""
    epoch_s = float("inf")
    for name, part in (parts[p] for p in args.parts.split(",")):
        try:
            result = part(check, epoch_s) if part is part_d else part(check)
            epoch_s = result if part is part_b else epoch_s
        except Exception as e:  # noqa: BLE001 - any failure is the check's finding, named in one line
            traceback.print_exc()
            first_line = str(e).splitlines()[0][:200] if str(e) else ""
            check.failures.append(f"part ({name}): {type(e).__name__}: {first_line}")
        write_text_atomic(args.out, before + "\n" + report())
    print(report().rsplit("\n", 2)[-2])
    return 1 if check.failures else 0


if __name__ == "__main__":
    sys.exit(main())
