"""The one training loop every method runs through.

Per step: take a slice of the epoch's permutation, make the views on the device, compute the
method's loss parts (under trainer.precision's autocast, harness/core/device_path.py), weight the
per-pair part, step the optimizer, call the method's after-step hook. Per epoch: log metrics,
evaluate k-NN when due, write a checkpoint atomically. A run that starts with a checkpoint of its own continues from it.
"""

from __future__ import annotations

import math
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from harness.core import device_path, distributed, preempt
from harness.core.addons import Batch, combine
from harness.core.checkpoint import load_checkpoint, save_checkpoint
from harness.core.data import residency
from harness.core.data.augment import ViewMaker
from harness.core.data.datasets import ImageData, pretraining_view
from harness.core.evaluate import knn_evaluate, knn_protocol, linear_probe
from harness.core.optim import build_optimizer, lr_at, scaled_lr
from harness.core.progress import Progress
from harness.core.rng import isolated_rng


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    evals: dict[str, dict[str, tuple[float, float]]]  # split -> protocol -> (top1 %, top5 %)
    objective_split: str  # val when a validation split is held out, else test
    residency: str = "device"  # where the training images lived (harness/core/data/residency.py)


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
    run = Training(cfg, model, data, info, checkpoint, log_epoch, list(addons or []))
    try:
        run.resume()
        preempt.defer(True)  # a signal in the loop waits for its next sync point (harness/core/preempt.py)
        for epoch in range(run.start_epoch, run.epochs):
            sums, first_step, lr, epoch_time = run.train_epoch(epoch)
            run.end_epoch(epoch, sums, first_step, lr, epoch_time)
        preempt.defer(False, where="after training")  # when no epoch was left (the loop ends it before)
        if set(run.evals) != set(run.final_queries):  # resumed after the last epoch's checkpoint: evaluate again
            run.final_evaluation(run.epochs - 1, run.pending_metrics)
    finally:
        run.batches.close()  # the host batches' helper thread ends with the run, however it ends
    return TrainResult(evals=run.evals, objective_split=run.objective_split, residency=run.batches.residency)


class Training:
    """One `fit`: what its steps share. Built by `prepare` (the constructor), then `resume`, then
    `train_epoch` and `end_epoch` for each epoch left; `evaluate` runs the k-NN, add-on and linear probes."""

    def __init__(self, cfg, model: nn.Module, data: ImageData, info: distributed.DistInfo, checkpoint: Path,
                 log_epoch: Callable[[int, dict[str, float]], None], addons: list):
        self.cfg, self.data, self.info, self.checkpoint, self.log_epoch = cfg, data, info, checkpoint, log_epoch
        self.addons = addons
        self.prepare(model)

    def prepare(self, model: nn.Module) -> None:
        """Add-ons set up, the model on its device (global BatchNorm, DDP, compile), the schedule,
        the optimizer, the data on the device and the evaluation's splits."""
        cfg, info, tc = self.cfg, self.info, self.cfg.trainer
        device = self.device = info.device
        # Decided before the add-ons set up, so their own image sets (CLSP's candidates) follow it.
        # What SSL trains on: the labelled train split, or more (STL-10's train + unlabeled: ImageData.pretrain_x).
        pretrain = pretraining_view(self.data)
        images, index = pretrain.train_x, pretrain.train_index
        self.data.residency = residency.resolve(cfg, images, device, self.addons, info.is_main)
        self.setup_addons()
        self.place_model(model)

        self.global_batch = int(tc.batch_size)
        if self.global_batch % info.world_size:
            raise ValueError(f"trainer.batch_size={self.global_batch} is not divisible by the world size "
                             f"{info.world_size}")
        self.local_batch = self.global_batch // info.world_size
        self.n_train = len(images)
        self.steps_per_epoch = self.n_train // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"trainer.batch_size={self.global_batch} exceeds the {self.n_train} training images")
        self.epochs = int(tc.epochs)
        self.total_steps = self.steps_per_epoch * self.epochs
        self.peak_lr = scaled_lr(float(tc.lr), self.global_batch, int(tc.base_batch), tc.lr_scaling)
        self.warmup_steps = int(round(float(tc.warmup_epochs) * self.steps_per_epoch))
        special = [g for owner in (self.method, *self.addons) if hasattr(owner, "optim_groups")
                   for g in owner.optim_groups()]
        self.optimizer = build_optimizer(nn.ModuleList([self.method, self.trained_addons]), tc, self.peak_lr, special)

        self.batches = residency.batch_source(self.data.residency, images, device, self.local_batch)
        self.train_index = index.to(device)  # positions in the full training (or pretraining) split
        self.views = ViewMaker(cfg.augment, cfg.dataset.mean, cfg.dataset.std, device,
                               seed=int(cfg.seed) * 1000 + info.rank, channels_last=True,
                               view_size=cfg.dataset.get("image_size"))
        self.objective_split = "val" if self.data.val_x is not None else "test"
        self.final_queries = {"test": (self.data.test_x, self.data.test_y)}
        if self.data.val_x is not None:
            self.final_queries["val"] = (self.data.val_x, self.data.val_y)
        self.settings = knn_settings(cfg.eval)
        self.primary = knn_protocol(*self.settings[0])
        self.autocast = device_path.autocast(device, str(tc.get("precision", "auto")))
        self.evals: dict[str, dict[str, tuple[float, float]]] = {}

    def setup_addons(self) -> None:
        for addon in self.addons:
            if hasattr(addon, "setup"):
                # Seeded from the run seed (the same on every rank) on an RNG of its own: an add-on's
                # initialisation, or an artifact it builds, neither depends on nor moves the global RNG
                # the training draws from (harness/core/rng.py).
                with isolated_rng(int(self.cfg.seed) * 1_000_003 + zlib.crc32(type(addon).__name__.encode())):
                    addon.setup(pretraining_view(self.data), self.info)
        self.trained_addons = nn.ModuleList([a for a in self.addons if isinstance(a, nn.Module)])
        self.trained_addons.to(self.device)

    def place_model(self, model: nn.Module) -> None:
        """`method` is the model itself (its hooks, checkpoints); `model` what the step calls (DDP, compiled)."""
        info, tc, device = self.info, self.cfg.trainer, self.device
        if tc.get("sync_bn") and info.world_size > 1:
            # Each rank's BatchNorm would otherwise normalise by its own slice, so splitting the same
            # global batch over more GPUs would change the experiment.
            layers, kind = device_path.sync_batchnorm(model, info)
            if info.is_main:
                print(f"[train] trainer.sync_bn: {layers} BatchNorm layers use the global batch's statistics "
                      f"({kind})", file=sys.stderr, flush=True)
        model.to(device, memory_format=torch.channels_last)  # on every device: CPU tests run the GPU's layout
        self.method = model
        if tc.get("compile"):  # backbone and heads in place, before DDP wraps the method (device_path.py)
            compiled = device_path.compile_parts(model)
            if info.is_main:
                print(f"[train] trainer.compile: {', '.join(compiled)}", file=sys.stderr, flush=True)
        if info.world_size > 1:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
        self.model = model

    def resume(self) -> None:
        """Continue from this run's checkpoint when there is one (after an epoch, or inside one)."""
        self.start_epoch, self.start_step, self.start_sums = 0, 0, {}
        self.pending_metrics: dict[str, float] | None = None
        # weights_only: a checkpoint in the shared runs folder is data, never code to run.
        state = load_checkpoint(self.checkpoint, self.device, "[train]", self.info.is_main,
                                required=("model", "optimizer", "epoch"))
        if state is not None:
            self.method.load_state_dict(state["model"])
            self.trained_addons.load_state_dict(state.get("addons", {}))
            self.optimizer.load_state_dict(state["optimizer"])
            self.start_epoch = state["epoch"] + 1
            # The last epoch's metrics, saved before its final evaluation: logged once that evaluation ends.
            self.pending_metrics = state.get("pending_metrics")
            if state.get("step"):  # written on Slurm's signal: continue inside that epoch
                self.start_epoch, self.start_step, self.start_sums = state["epoch"], state["step"], state["sums"]
            print(f"[train] resumed from {self.checkpoint} at epoch {self.start_epoch + 1}, step {self.start_step + 1}",
                  file=sys.stderr, flush=True)
        self.progress = Progress("[train]", self.total_steps, first=self.start_epoch * self.steps_per_epoch,
                                 every=float(self.cfg.trainer.log_every), scale=self.global_batch,
                                 enabled=self.info.is_main)

    def batch_start(self, step: int) -> int:
        """Where this rank's slice of step `step` starts in the epoch's permutation."""
        return step * self.global_batch + self.info.rank * self.local_batch

    def train_epoch(self, epoch: int) -> tuple[dict[str, torch.Tensor], int, float, float]:
        """One epoch's steps; returns (metric sums, the step it started at, the last lr, its seconds)."""
        cfg, info, tc, device = self.cfg, self.info, self.cfg.trainer, self.device
        self.model.train()
        # Augmentations are seeded per (run seed, epoch, rank): a resumed epoch repeats exactly.
        self.views.reseed((int(cfg.seed) * 1_000_003 + epoch) * 1009 + info.rank)
        # The same permutation on every rank (seeded by run seed and epoch); each takes its slice.
        order = torch.randperm(self.n_train, generator=torch.Generator().manual_seed(int(cfg.seed) * 100003 + epoch))
        sums: dict[str, torch.Tensor] = {}
        first_step = 0
        if epoch == self.start_epoch and self.start_step:
            first_step, sums = self.start_step, {k: v.to(device) for k, v in self.start_sums.items()}
            # The rest of an interrupted epoch gets fresh augmentations, seeded by where it stopped.
            self.views.reseed(((int(cfg.seed) * 1_000_003 + epoch) * 1009 + info.rank) * 7 + first_step)
        t0 = time.monotonic()
        steps = self.steps_per_epoch
        batches = self.batches.epoch(order, range(first_step, steps), self.batch_start, self.local_batch)
        for step, idx, x in batches:
            global_step = epoch * steps + step
            lr = lr_at(global_step, self.total_steps, self.warmup_steps, self.peak_lr, float(tc.warmup_start_lr),
                       float(tc.min_lr))
            for group in self.optimizer.param_groups:
                group["lr"] = (self.peak_lr if group.get("static_lr") else lr) * group.get("lr_scale", 1.0)
            batch_views = self.views(x)
            with self.autocast:
                parts = self.model(batch_views)
                batch = Batch(x, self.train_index[idx], batch_views, parts, self.method, epoch,
                              global_step / self.total_steps)
                weights, extra, addon_logs = combine(batch, self.addons)
            loss = parts.total(weights) if extra is None else parts.total(weights) + extra
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if hasattr(self.method, "after_step"):
                self.method.after_step((global_step + 1) / self.total_steps)
            for name, value in {"loss": loss, "loss_pair": parts.pair.mean(), "loss_batch": parts.batch,
                                **parts.logs, **addon_logs}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            if step % 20 == 0 or step == steps - 1:  # the only host syncs in the loop
                current, diverged, stop = _sync_point(loss)
                if diverged:
                    what = current if not math.isfinite(current) else "not finite on another rank"
                    raise Diverged(f"loss became {what} at epoch {epoch + 1}, step {step + 1}")
                self.progress.update(global_step + 1, f"epoch {epoch + 1}/{self.epochs} step {step + 1}/{steps} | "
                                     f"loss {current:.4f}")
                if stop and step < steps - 1:  # at the last step the epoch's end stops
                    _stop_for_requeue(self.method, self.trained_addons, self.optimizer, epoch, step + 1, sums, info,
                                      self.checkpoint)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return sums, first_step, lr, time.monotonic() - t0

    def end_epoch(self, epoch: int, sums: dict[str, torch.Tensor], first_step: int, lr: float,
                  epoch_time: float) -> None:
        """Metrics over ranks, evaluation when due, the epoch's checkpoint, and a stop when signalled."""
        metrics, stop = _epoch_end_sync(sums, self.steps_per_epoch)
        if not math.isfinite(metrics["loss"]):
            raise Diverged(f"loss became {metrics['loss']} in epoch {epoch + 1}")
        metrics.update(lr=lr, epoch_time_s=epoch_time,
                       images_per_s=(self.steps_per_epoch - first_step) * self.global_batch / epoch_time)
        for addon in self.addons:
            if hasattr(addon, "epoch_metrics"):
                metrics.update(addon.epoch_metrics())
        last = epoch == self.epochs - 1
        if last:
            # The last epoch's checkpoint comes before the final evaluation (outside the loop's deferral,
            # harness/core/preempt.py): a requeue during the evaluation then only evaluates again.
            self.save(epoch, pending_metrics=metrics)
            if stop:
                raise preempt.Preempted(f"stopped before the final evaluation (epoch {epoch + 1}) for a requeue")
            preempt.defer(False, where="before the final evaluation")
            self.report(epoch, self.final_evaluation(epoch, metrics))
            return
        every = int(self.cfg.eval.every)
        if every and (epoch + 1) % every == 0:
            self.evals = self.evaluate([self.objective_split])
            self.add_eval_metrics(metrics)
        self.log_epoch(epoch, metrics)
        self.save(epoch)
        self.report(epoch, metrics)
        if stop:  # the epoch's checkpoint is written: stop here
            raise preempt.Preempted(f"stopped after epoch {epoch + 1} for a requeue")

    def save(self, epoch: int, **extra) -> None:
        """The checkpoint after `epoch` (rank 0), then every rank waits for it."""
        if self.info.is_main:
            save_checkpoint({"model": self.method.state_dict(), "addons": self.trained_addons.state_dict(),
                             "optimizer": self.optimizer.state_dict(), "epoch": epoch, **extra}, self.checkpoint)
        distributed.barrier()

    def report(self, epoch: int, metrics: dict[str, float]) -> None:
        """The epoch's one progress line."""
        knn_text = f" | knn {metrics['knn_top1']:.2f}" if "knn_top1" in metrics else ""
        if self.info.is_main:
            print(f"[train] epoch {epoch + 1}/{self.epochs} done: loss {metrics['loss']:.4f} | "
                  f"{metrics['images_per_s']:,.0f} img/s{knn_text}", file=sys.stderr, flush=True)

    def add_eval_metrics(self, metrics: dict[str, float]) -> None:
        """The objective split's k-NN top-1 and the add-ons' protocols, as epoch metrics."""
        metrics["knn_top1"] = self.evals[self.objective_split][self.primary][0]
        for protocol, (top1, _) in self.evals[self.objective_split].items():
            if not protocol.startswith(("knn:", "linear:")):  # add-on protocols, e.g. online_linear
                metrics[f"{protocol}_top1"] = top1

    def final_evaluation(self, epoch: int, metrics: dict[str, float] | None) -> dict[str, float]:
        """Every split's evaluation after the last epoch, then that epoch's metrics row (when this
        attempt has it: a checkpoint from before this rule carries none)."""
        if self.info.is_main:
            print(f"[train] final evaluation ({', '.join(self.final_queries)})", file=sys.stderr, flush=True)
        self.evals = self.evaluate(list(self.final_queries), final=True)
        if metrics is None:
            return {}
        metrics = dict(metrics)
        self.add_eval_metrics(metrics)
        self.log_epoch(epoch, metrics)
        return metrics

    def evaluate(self, splits: list[str], final: bool = False) -> dict[str, dict[str, tuple[float, float]]]:
        """k-NN on `splits`, the add-ons' own protocols, and the linear probe at the end when enabled."""
        data, backbone, cfg = self.data, self.method.backbone, self.cfg
        queries = {s: self.final_queries[s] for s in splits}
        out = knn_evaluate(backbone, data.train_x, data.train_y, queries, self.views.plain, self.settings,
                           data.num_classes)
        extra = [a.evaluate(backbone, queries, self.views.plain) for a in self.addons if hasattr(a, "evaluate")]
        if final and cfg.eval.get("linear") and cfg.eval.linear.enabled:
            extra.append(linear_probe(backbone, data.train_x, data.train_y, queries, self.views.normalize,
                                      cfg.eval.linear, data.num_classes, seed=int(cfg.seed), verbose=self.info.is_main))
        for results in extra:
            for split, by_protocol in results.items():
                out[split].update(by_protocol)
        return out
