"""ScoreCL (Kim et al., arXiv 2306.04175): weight each positive pair by how differently a score
network sees its two views.

The paper's idea is confirmed, its formula is not (methods.md §5); every open choice is an option
of ``weighting=scorecl`` with §5.3's proposal as the default:

- score s(v) = −ε̂(v, σ)/σ of a DSM-trained noise-conditional UNet (methods/scorecl/score_net.py),
  evaluated on each view at the fixed level ``sigma``, without gradients;
- per-pair difference d_i (``statistic``): ``vector`` ‖s(v1_i) − s(v2_i)‖₂/√D, or ``norm``
  |‖s(v1_i)‖ − ‖s(v2_i)‖|/√D;
- normalised over the GLOBAL batch (every rank's pairs, ``normalize``): ``mean`` d/mean(d),
  ``minmax`` (d − min)/(max − min), ``zsigmoid`` sigmoid((d − mean)/std);
- w_i = 1 + alpha·normalized_i, then optionally divided by the global mean weight
  (``renormalize``, so only the relative weighting changes and not the loss scale), then
  clipped to ``clip: [w_min, w_max]`` if given. w multiplies the method's per-pair loss.

The score network is either ``pretrained`` (an artifact trained once per score-net config and
training split, then frozen and shared by every job that needs it) or trained ``joint``ly: its
DSM loss on the step's clean images, times ``joint_weight``, is added to the SSL loss, so the
trainer's optimizer trains it with the method (and the checkpoint holds it).

The score network works at one resolution, ``score_net.image_size`` (null: the decoded set's own size;
64 on an encoded image store, whose images have no one size): it is trained on the training images at
that size (an encoded store's centre crops, as the evaluation view makes them) and every view is resized
to it (bilinear, antialiased) before it is scored. At CIFAR's 32 px with 32-px views nothing is resized.
"""

from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from harness.artifacts import artifact_done, artifact_path, build_once, dataset_identity, lock_timeout_s
from harness.core import distributed
from harness.core.addons import AddonOut, Batch
from harness.core.data.encoded import ADDON_SIZE_ON_ENCODED, addon_image_size, at_size, is_encoded, resize_uint8
from harness.core.progress import Progress
from harness.jobs.stages import Resources, Stage
from methods.scorecl.checks import SCORECL_NORMALIZATIONS, SCORECL_STATISTICS, scorecl_errors
from methods.scorecl.score_net import ScoreNet, dsm_loss, to_unit_range, train_score_net

STATISTICS, NORMALIZATIONS = SCORECL_STATISTICS, SCORECL_NORMALIZATIONS


def score_difference(s1: torch.Tensor, s2: torch.Tensor, statistic: str) -> torch.Tensor:
    """Per-pair difference of two score batches (N×C×H×W each), scaled by 1/√D; shape (N,)."""
    a, b = s1.flatten(1).float(), s2.flatten(1).float()
    scale = math.sqrt(a.shape[1])
    if statistic == "vector":
        return (a - b).norm(dim=1) / scale
    if statistic == "norm":
        return (a.norm(dim=1) - b.norm(dim=1)).abs() / scale
    raise ValueError(f"statistic={statistic!r}: expected one of {STATISTICS}")


def normalize_differences(d: torch.Tensor, everyone: torch.Tensor, how: str) -> torch.Tensor:
    """`d` (this rank's pairs) normalised with statistics of `everyone` (the global batch).

    A degenerate batch (all differences equal) gives the neutral value (0, or 0.5 for zsigmoid);
    the guards are clamps rather than branches, so no step waits for the device.
    """
    tiny = 1e-12
    if how == "mean":
        return d / everyone.mean().clamp_min(tiny)
    if how == "minmax":
        low = everyone.min()
        return (d - low) / (everyone.max() - low).clamp_min(tiny)
    if how == "zsigmoid":
        return torch.sigmoid((d - everyone.mean()) / everyone.std(unbiased=False).clamp_min(tiny))
    raise ValueError(f"normalize={how!r}: expected one of {NORMALIZATIONS}")


def pair_weights(d: torch.Tensor, alpha: float, normalize: str, clip: tuple[float, float] | None = None,
                 renormalize: bool = False) -> torch.Tensor:
    """w = 1 + alpha·normalize(d) for this rank's differences `d`, with batch statistics over all
    ranks; detached. alpha = 0 gives exactly 1 (the unweighted loss)."""
    d = d.detach().float()
    if alpha == 0:
        return torch.ones_like(d)
    everyone = distributed.gather(d, grad=False)
    w = 1.0 + alpha * normalize_differences(d, everyone, normalize)
    if renormalize:
        w = w / (1.0 + alpha * normalize_differences(everyone, everyone, normalize)).mean()
    if clip is not None:
        w = w.clamp(float(clip[0]), float(clip[1]))
    return w


def score_net_identity(cfg: DictConfig) -> dict:
    """What decides the pretrained score network: its own settings (its size as resolved; a null size on
    decoded images is left out, as before the option) and the training split."""
    net = OmegaConf.to_container(cfg.weighting.score_net, resolve=True)
    if net.get("image_size") is None:
        net.pop("image_size", None)
        if is_encoded(cfg.dataset):
            net["image_size"] = ADDON_SIZE_ON_ENCODED
    return {"score_net": net, "data": dataset_identity(cfg.dataset)}


def score_net_path(cfg: DictConfig) -> Path:
    return artifact_path(cfg, "score_net", score_net_identity(cfg))


def pretrained_score_net(cfg: DictConfig, data=None, device: torch.device | None = None) -> Path:
    """The folder of the job's pretrained score network, trained first unless a stage (or another job)
    has: the score-net stage's build, and the fallback of a job no driver staged."""
    path = score_net_path(cfg)
    if artifact_done(path):
        return path
    from harness.core.data.datasets import pretraining_view
    from harness.core.data.encoded import load_dataset

    net_cfg = cfg.weighting.score_net
    data = data if data is not None else pretraining_view(load_dataset(cfg.dataset))
    if device is None:  # a stage job: the training device the job would pick (trainer.device)
        device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.device != "cpu" else "cpu")

    def build(folder):
        size = score_net_size(net_cfg, data.train_x)
        net = ScoreNet.create(net_cfg, size)
        train_score_net(net, score_net_images(data.train_x, size, net_cfg), net_cfg, device).cpu().save(folder)

    return build_once(path, build, config=score_net_identity(cfg), what="score network",
                      seed=int(net_cfg.seed), timeout_s=lock_timeout_s(cfg))  # score_net.seed: the UNet's init too


def score_net_size(net_cfg, train_x) -> int:
    """The score network's resolution (score_net.image_size; see harness/core/data/encoded.py)."""
    return addon_image_size(net_cfg.get("image_size"), train_x)


def score_net_images(train_x, size: int, net_cfg, chunk: int = 512) -> torch.Tensor:
    """The uint8 N×3×size×size images the score network trains on. Decoded images are resized only when
    `size` differs from theirs; an encoded store's images are decoded as centre crops at `size`, only the
    seeded subset of score_net.max_images of them."""
    if isinstance(train_x, torch.Tensor):
        return at_size(train_x, size)  # train_score_net takes its max_images subset itself, as it always has
    if net_cfg.get("max_images") and len(train_x) > int(net_cfg.max_images):
        gen = torch.Generator().manual_seed(int(net_cfg.seed))
        train_x = train_x.take_rows(torch.randperm(len(train_x), generator=gen)[:int(net_cfg.max_images)])
    images = at_size(train_x, size)
    progress = Progress("[score_net] decoding its training images", len(images))
    out = []
    for start in range(0, len(images), chunk):
        out.append(images[start:start + chunk].to("cpu"))
        done = min(start + chunk, len(images))
        if progress.due(final=done == len(images)):
            progress.report(done, f"{done}/{len(images)} images at {size} px")
    return torch.cat(out)


def _views_to_unit_range(view: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                         size: int | None) -> torch.Tensor:
    """A method's view (normalised with the dataset's mean/std) → the score net's [-1, 1] at its size."""
    x = (view.float() * std + mean) * 2.0 - 1.0
    if size is not None and (x.shape[-1] != size or x.shape[-2] != size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


class ScoreCL(nn.Module):
    """The ``weighting=scorecl`` add-on (hooks of harness/core/addons.py)."""

    check_config = staticmethod(scorecl_errors)  # called by harness.jobs.config.validate

    @staticmethod
    def stages(cfg: DictConfig) -> list[Stage]:
        """The pretrained score network, built once per sweep before its training jobs (harness/jobs/stages.py)."""
        if cfg.weighting.mode != "pretrained":
            return []
        path = score_net_path(cfg)
        return [Stage(name="scorecl-score-net", key=str(path), build=partial(pretrained_score_net, cfg),
                      done=partial(artifact_done, path),
                      resources=Resources.from_config(OmegaConf.select(cfg, "weighting.stages.score_net")))]

    def __init__(self, job_cfg, alpha: float = 1.0, statistic: str = "vector", normalize: str = "mean",
                 clip=None, renormalize: bool = False, sigma: float = 0.05, mode: str = "pretrained",
                 joint_weight: float = 1.0, score_net=None, stages=None):
        super().__init__()
        self.alpha, self.statistic, self.normalize = float(alpha), str(statistic), str(normalize)
        self.clip = None if clip is None else (float(clip[0]), float(clip[1]))
        self.renormalize, self.sigma, self.mode = bool(renormalize), float(sigma), str(mode)
        self.joint_weight = float(joint_weight)
        self.net_cfg = score_net
        self.job_cfg = job_cfg
        self.artifact = score_net_path(job_cfg)
        mean, std = job_cfg.dataset.mean, job_cfg.dataset.std
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._frozen: list[ScoreNet] = []  # pretrained: kept out of the module tree (not optimised, not saved)
        self.size: int | None = None  # the score network's side, set by setup (None: the views' own)
        self._ddp = None
        self._reset()

    # ------------------------------------------------------------------ hooks
    def setup(self, data, info: distributed.DistInfo) -> None:
        self.to(info.device)
        self.size = score_net_size(self.net_cfg, data.train_x)
        if self.mode == "joint":
            self.net = ScoreNet.create(self.net_cfg, self.size).to(info.device)
            if info.world_size > 1:  # the trainer's DDP wraps only the method: average this net's gradients too
                self._ddp = [nn.parallel.DistributedDataParallel(
                    self.net, device_ids=[info.device.index] if info.device.type == "cuda" else None)]
            return
        # Staged before the job (the score-net stage); built here only when no driver staged it.
        pretrained_score_net(self.job_cfg, data, info.device)
        net = ScoreNet.load(self.artifact).to(info.device).eval().requires_grad_(False)
        self._frozen = [net]
        if info.is_main:
            print(f"[scorecl] score network from {self.artifact} (σ set {len(net.sigmas)} levels, weights at "
                  f"σ={self.sigma})", file=sys.stderr, flush=True)

    def step(self, batch: Batch) -> AddonOut:
        net = self.net if self.mode == "joint" else self._frozen[0]
        v1, v2 = batch.views[0], batch.views[1]
        with torch.no_grad():
            s1 = net.score(_views_to_unit_range(v1, self.mean, self.std, self.size), self.sigma)
            s2 = net.score(_views_to_unit_range(v2, self.mean, self.std, self.size), self.sigma)
            d = score_difference(s1, s2, self.statistic)
            w = pair_weights(d, self.alpha, self.normalize, self.clip, self.renormalize)
            self._accumulate(w, d)
        out = AddonOut(weights=w)
        if self.mode == "joint":
            images = batch.images if self.size in (None, batch.images.shape[-1]) else resize_uint8(batch.images,
                                                                                                  self.size)
            dsm = dsm_loss(self._ddp[0] if self._ddp else net, to_unit_range(images), net.sigma_levels)
            out.loss = self.joint_weight * dsm
            out.logs["dsm_loss"] = dsm.detach()
        return out

    def epoch_metrics(self) -> dict[str, float]:
        """Weight distribution and mean score difference of the epoch, over all ranks' pairs."""
        s = self._stats
        local = torch.stack([s["n"], s["w_sum"], s["w_sq"], s["d_sum"], -s["w_min"], s["w_max"]]).view(1, -1)
        rows = distributed.gather(local, grad=False)
        n, w_sum, w_sq, d_sum = rows[:, 0].sum(), rows[:, 1].sum(), rows[:, 2].sum(), rows[:, 3].sum()
        self._reset()
        if n == 0:
            return {}
        mean = w_sum / n
        return {"weight_mean": mean.item(), "weight_std": (w_sq / n - mean**2).clamp(min=0).sqrt().item(),
                "weight_min": (-rows[:, 4].max()).item(), "weight_max": rows[:, 5].max().item(),
                "score_diff_mean": (d_sum / n).item()}

    # ------------------------------------------------------------------ internals
    def _reset(self) -> None:
        dev = self.mean.device
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        self._stats = {"n": zero.clone(), "w_sum": zero.clone(), "w_sq": zero.clone(), "d_sum": zero.clone(),
                       "w_min": torch.full((), math.inf, dtype=torch.float64, device=dev),
                       "w_max": torch.full((), -math.inf, dtype=torch.float64, device=dev)}

    def _accumulate(self, w: torch.Tensor, d: torch.Tensor) -> None:
        s, w64 = self._stats, w.double()
        if s["n"].device != w.device:
            self._stats = s = {k: v.to(w.device) for k, v in s.items()}
        s["n"] += len(w)
        s["w_sum"] += w64.sum()
        s["w_sq"] += (w64 * w64).sum()
        s["d_sum"] += d.double().sum()
        s["w_min"] = torch.minimum(s["w_min"], w64.min())
        s["w_max"] = torch.maximum(s["w_max"], w64.max())

