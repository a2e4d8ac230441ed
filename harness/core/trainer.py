"""The one training loop every method runs through.

Per step: take a slice of the epoch's permutation, make the views on the device, compute the
method's loss parts (under bf16 autocast on GPU), weight the per-pair part, step the optimizer,
call the method's after-step hook. Per epoch: log metrics, evaluate k-NN when due, write a
checkpoint atomically. A run that starts with a checkpoint of its own continues from it.
"""

from __future__ import annotations

import math
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from harness.core import distributed, preempt
from harness.core.addons import Batch, combine
from harness.core.checkpoint import load_checkpoint, save_checkpoint
from harness.core.evaluate import knn_evaluate, knn_protocol, linear_probe
from harness.core.optim import build_optimizer, lr_at, scaled_lr
from harness.core.rng import isolated_rng
from harness.data.augment import ViewMaker
from harness.data.datasets import ImageData


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class Progress:
    """A line every `every` seconds (and at each epoch end) with loss, rate and ETA."""

    total_steps: int
    every: float = 10.0
    start: float = field(default_factory=time.monotonic)
    last: float = 0.0
    first_step: int = 0
    enabled: bool = True  # only rank 0 prints

    def maybe_print(self, epoch: int, epochs: int, step: int, steps: int, global_step: int, loss: float | None,
                    images_per_s: float, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < self.every):
            return
        self.last = now
        done = global_step - self.first_step
        remaining = (self.total_steps - global_step) * (now - self.start) / max(done, 1)
        loss_text = f"loss {loss:.4f} | " if loss is not None else ""
        print(
            f"[train] epoch {epoch + 1}/{epochs} step {step}/{steps} | {loss_text}"
            f"{images_per_s:,.0f} img/s | ETA {_duration(remaining)}",
            file=sys.stderr,
            flush=True,
        )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


@dataclass
class TrainResult:
    evals: dict[str, dict[str, tuple[float, float]]]  # split -> protocol -> (top1 %, top5 %)
    objective_split: str  # val when a validation split is held out, else test


def _stop_for_requeue(method: nn.Module, trained_addons: nn.Module, optimizer, epoch: int, step: int,
                      sums: dict[str, torch.Tensor], info: distributed.DistInfo, checkpoint: Path) -> None:
    """Write a mid-epoch checkpoint (rank 0) and raise Preempted on every rank."""
    # Partial sums averaged over ranks: the epoch's final mean over ranks stays exact on resume.
    sums = {k: distributed.mean_over_ranks(v).cpu() for k, v in sums.items()}
    if info.is_main:
        save_checkpoint({"model": method.state_dict(), "addons": trained_addons.state_dict(),
                         "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step, "sums": sums}, checkpoint)
    distributed.barrier()
    raise preempt.Preempted(f"stopped at epoch {epoch + 1}, step {step + 1} for a requeue")


def _sync_point(loss: torch.Tensor) -> tuple[float, bool, bool]:
    """(this rank's loss, whether any rank's loss is not finite, whether any rank got the requeue signal).

    One small all-reduce (MAX) and one copy to the host: every rank sees the same two flags, so all
    raise Diverged or stop together, instead of some waiting in the next collective for ranks that left.
    """
    loss = loss.detach().float().reshape(())
    flags = torch.stack([(~torch.isfinite(loss)).float(), loss.new_full((), float(preempt.signalled()))])
    current, nonfinite, stop = torch.cat([loss.view(1), distributed.max_over_ranks(flags)]).tolist()
    return current, nonfinite > 0, stop > 0


def _epoch_end_sync(sums: dict[str, torch.Tensor], steps: int) -> tuple[dict[str, float], bool]:
    """The epoch's mean metrics over ranks and whether any rank got the requeue signal: one all-reduce."""
    names = list(sums)
    loss = sums["loss"]
    packed = torch.stack([sums[k].reshape(()) for k in names] + [loss.new_full((), float(preempt.signalled()))])
    values = distributed.mean_over_ranks(packed).tolist()
    return {k: v / steps for k, v in zip(names, values)}, values[-1] > 0


def knn_settings(eval_cfg) -> list[tuple[int, float]]:
    return [(int(s.k), float(s.T)) for s in eval_cfg.knn]


def fit(cfg, model: nn.Module, data: ImageData, info: distributed.DistInfo, checkpoint: Path,
        log_epoch: Callable[[int, dict[str, float]], None], addons: list | None = None) -> TrainResult:
    """Train `model` (a method wrapping its backbone) on `data`; returns how it ended.

    `log_epoch(epoch, metrics)` receives each finished epoch's metrics (called on every rank).
    `addons` join each step without the method knowing (pair weights, extra positives, probes;
    see harness/core/addons.py).
    """
    tc = cfg.trainer
    device = info.device
    addons = list(addons or [])
    for addon in addons:
        if hasattr(addon, "setup"):
            # Seeded from the run seed (the same on every rank) on an RNG of its own: an add-on's
            # initialisation, or an artifact it builds, neither depends on nor moves the global RNG
            # the training draws from (harness/core/rng.py).
            with isolated_rng(int(cfg.seed) * 1_000_003 + zlib.crc32(type(addon).__name__.encode())):
                addon.setup(data, info)
    trained_addons = nn.ModuleList([a for a in addons if isinstance(a, nn.Module)])
    trained_addons.to(device)
    if tc.get("sync_bn") and info.world_size > 1:
        # Each rank's BatchNorm would otherwise normalise by its own slice, so splitting the same
        # global batch over more GPUs would change the experiment.
        layers = distributed.global_batchnorm(model)
        if info.is_main:
            print(f"[train] trainer.sync_bn: {layers} BatchNorm layers use the global batch's statistics",
                  file=sys.stderr, flush=True)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    method = model
    if info.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.get("compile"):
        model = torch.compile(model)  # the method's own hooks (after_step, embed) stay eager on `method`

    global_batch = int(tc.batch_size)
    if global_batch % info.world_size:
        raise ValueError(f"trainer.batch_size={global_batch} is not divisible by the world size {info.world_size}")
    local_batch = global_batch // info.world_size
    n_train = len(data.train_x)
    steps_per_epoch = n_train // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"trainer.batch_size={global_batch} exceeds the {n_train} training images")
    epochs = int(tc.epochs)
    total_steps = steps_per_epoch * epochs
    peak_lr = scaled_lr(float(tc.lr), global_batch, int(tc.base_batch), tc.lr_scaling)
    warmup_steps = int(round(float(tc.warmup_epochs) * steps_per_epoch))
    special = [g for owner in (method, *addons) if hasattr(owner, "optim_groups") for g in owner.optim_groups()]
    optimizer = build_optimizer(nn.ModuleList([method, trained_addons]), tc, peak_lr, special)

    train_x = data.train_x.to(device)  # the whole uint8 dataset lives on the training device
    train_index = data.train_index.to(device)  # positions in the full training split (for per-image artifacts)
    views = ViewMaker(cfg.augment, cfg.dataset.mean, cfg.dataset.std, device,
                      seed=int(cfg.seed) * 1000 + info.rank, channels_last=device.type == "cuda")
    objective_split = "val" if data.val_x is not None else "test"
    final_queries = {"test": (data.test_x, data.test_y)}
    if data.val_x is not None:
        final_queries["val"] = (data.val_x, data.val_y)
    settings = knn_settings(cfg.eval)
    primary = knn_protocol(*settings[0])

    def evaluate(splits: list[str], final: bool = False) -> dict[str, dict[str, tuple[float, float]]]:
        queries = {s: final_queries[s] for s in splits}
        out = knn_evaluate(method.backbone, data.train_x, data.train_y, queries, views.plain, settings,
                           data.num_classes)
        extra = [a.evaluate(method.backbone, queries, views.plain) for a in addons if hasattr(a, "evaluate")]
        if final and cfg.eval.get("linear") and cfg.eval.linear.enabled:
            extra.append(linear_probe(method.backbone, data.train_x, data.train_y, queries, views.normalize,
                                      cfg.eval.linear, data.num_classes, seed=int(cfg.seed), verbose=info.is_main))
        for results in extra:
            for split, by_protocol in results.items():
                out[split].update(by_protocol)
        return out

    start_epoch, start_step, start_sums = 0, 0, {}
    # weights_only: a checkpoint in the shared runs folder is data, never code to run.
    state = load_checkpoint(checkpoint, device, "[train]", info.is_main, required=("model", "optimizer", "epoch"))
    if state is not None:
        method.load_state_dict(state["model"])
        trained_addons.load_state_dict(state.get("addons", {}))
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1
        if state.get("step"):  # written on Slurm's signal: continue inside that epoch
            start_epoch, start_step, start_sums = state["epoch"], state["step"], state["sums"]
        print(f"[train] resumed from {checkpoint} at epoch {start_epoch + 1}, step {start_step + 1}",
              file=sys.stderr, flush=True)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and bool(tc.bf16))
    progress = Progress(total_steps, every=float(tc.log_every), enabled=info.is_main)
    progress.first_step = start_epoch * steps_per_epoch
    evals: dict[str, dict[str, tuple[float, float]]] = {}
    preempt.defer(True)  # a signal in the loop waits for its next sync point (harness/core/preempt.py)
    for epoch in range(start_epoch, epochs):
        model.train()
        # Augmentations are seeded per (run seed, epoch, rank): a resumed epoch repeats exactly.
        views.generator.manual_seed((int(cfg.seed) * 1_000_003 + epoch) * 1009 + info.rank)
        # The same permutation on every rank (seeded by run seed and epoch); each takes its slice.
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(int(cfg.seed) * 100003 + epoch))
        order = order.to(device)
        sums: dict[str, torch.Tensor] = {}
        first_step = 0
        if epoch == start_epoch and start_step:
            first_step, sums = start_step, {k: v.to(device) for k, v in start_sums.items()}
            # The rest of an interrupted epoch gets fresh augmentations, seeded by where it stopped.
            views.generator.manual_seed(((int(cfg.seed) * 1_000_003 + epoch) * 1009 + info.rank) * 7 + first_step)
        t0 = time.monotonic()
        for step in range(first_step, steps_per_epoch):
            global_step = epoch * steps_per_epoch + step
            lr = lr_at(global_step, total_steps, warmup_steps, peak_lr, float(tc.warmup_start_lr), float(tc.min_lr))
            for group in optimizer.param_groups:
                group["lr"] = (peak_lr if group.get("static_lr") else lr) * group.get("lr_scale", 1.0)
            idx = order[step * global_batch + info.rank * local_batch:][:local_batch]
            batch_views = views(train_x[idx])
            with autocast:
                parts = model(batch_views)
                batch = Batch(train_x[idx], train_index[idx], batch_views, parts, method, model, epoch,
                              global_step / total_steps)
                weights, extra, addon_logs = combine(batch, addons)
            loss = parts.total(weights) if extra is None else parts.total(weights) + extra
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if hasattr(method, "after_step"):
                method.after_step((global_step + 1) / total_steps)
            for name, value in {"loss": loss, "loss_pair": parts.pair.mean(), "loss_batch": parts.batch,
                                **parts.logs, **addon_logs}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            if step % 20 == 0 or step == steps_per_epoch - 1:  # the only host syncs in the loop
                current, diverged, stop = _sync_point(loss)
                if diverged:
                    what = current if not math.isfinite(current) else "not finite on another rank"
                    raise Diverged(f"loss became {what} at epoch {epoch + 1}, step {step + 1}")
                elapsed = time.monotonic() - t0
                progress.maybe_print(epoch, epochs, step + 1, steps_per_epoch, global_step + 1, current,
                                     (step + 1 - first_step) * global_batch / max(elapsed, 1e-9))
                if stop and step < steps_per_epoch - 1:  # at the last step the epoch's end stops
                    _stop_for_requeue(method, trained_addons, optimizer, epoch, step + 1, sums, info, checkpoint)
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_time = time.monotonic() - t0
        metrics, stop = _epoch_end_sync(sums, steps_per_epoch)
        if not math.isfinite(metrics["loss"]):
            raise Diverged(f"loss became {metrics['loss']} in epoch {epoch + 1}")
        metrics.update(lr=lr, epoch_time_s=epoch_time,
                       images_per_s=(steps_per_epoch - first_step) * global_batch / epoch_time)
        for addon in addons:
            if hasattr(addon, "epoch_metrics"):
                metrics.update(addon.epoch_metrics())
        last = epoch == epochs - 1
        if last:  # the final evaluation is outside the loop's deferral (harness/core/preempt.py)
            if stop:
                raise preempt.Preempted(f"stopped before the final evaluation (epoch {epoch + 1}) for a requeue")
            preempt.defer(False, where="before the final evaluation")
        every = int(cfg.eval.every)
        if last or (every and (epoch + 1) % every == 0):
            evals = evaluate(list(final_queries) if last else [objective_split], final=last)
            metrics["knn_top1"] = evals[objective_split][primary][0]
            for protocol, (top1, _) in evals[objective_split].items():
                if not protocol.startswith(("knn:", "linear:")):  # add-on protocols, e.g. online_linear
                    metrics[f"{protocol}_top1"] = top1
        log_epoch(epoch, metrics)
        if info.is_main:
            save_checkpoint({"model": method.state_dict(), "addons": trained_addons.state_dict(),
                             "optimizer": optimizer.state_dict(), "epoch": epoch}, checkpoint)
        distributed.barrier()
        knn_text = f" | knn {metrics['knn_top1']:.2f}" if "knn_top1" in metrics else ""
        if info.is_main:
            print(f"[train] epoch {epoch + 1}/{epochs} done: loss {metrics['loss']:.4f} | "
                  f"{metrics['images_per_s']:,.0f} img/s{knn_text}", file=sys.stderr, flush=True)
        if not last and stop:  # the epoch's checkpoint is written: stop here
            raise preempt.Preempted(f"stopped after epoch {epoch + 1} for a requeue")
    preempt.defer(False, where="after training")  # when no epoch was left (the loop ends it before)
    if set(evals) != set(final_queries):  # resumed after the last epoch's checkpoint: evaluate again
        evals = evaluate(list(final_queries), final=True)
    return TrainResult(evals=evals, objective_split=objective_split)
