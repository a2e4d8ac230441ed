"""CLSP (Zeng et al., ECCV 2024), methods.md §4: diffusion-made synthetic positives for any method.

An add-on (harness/core/addons.py), chosen with ``positives=clsp``. Its stages, built before the
training jobs (harness/jobs/stages.py), make the job's synthetic set (methods/clsp/generate.py: a
DDPM trained on the training split, then K anchor-interpolated samples per image); its ``setup``
loads it. At every step a ``ratio`` share of this rank's anchors
each get one of their candidates, drawn uniformly, augmented with the pipeline of the method's view
``view`` and embedded with the method's ``embed``. What the synthetic embedding does (``mode``):

- ``similarity`` (the released CLSP-SimCLR/MoCo code): an extra ``λ·mean(2 − 2·cos(z, z_syn))``
  over the selected anchors, z being the anchor's embedding of view 1 (the code's z¹). z and
  z_syn go through the encoder in one batch, gradients through both. Works with every method.
- ``extra_positive`` (NNCLR/All4One as the paper describes them, form unconfirmed): the method
  scores the synthetic embedding as another positive beside its nearest neighbour through the hook

      method.synthetic_positive_loss(z_syn, selected) -> Tensor (k,)

  called after the method's forward in the same step. ``z_syn`` (k×d) is ``method.embed`` of the
  synthetic views, ``selected`` (k,) the positions of their anchors in this rank's batch; the
  method uses what its forward kept (its predictions). NNCLR and All4One implement it with
  ``methods.common.synthetic_positive_pairs``. The add-on adds ``λ·mean`` of it.

The embeddings are computed with ``batch.method`` outside the DDP-wrapped forward; DDP still
averages their gradients (a parameter's gradient hook fires once per backward, with every use of
it summed), which tests/test_clsp.py checks with two gloo processes against one.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from harness.core import distributed
from harness.core.addons import AddonOut, Batch
from harness.core.data.augment import Pipeline, augment
from harness.core.data.encoded import ADDON_SIZE_ON_ENCODED, is_encoded
from methods.clsp.checks import MODES, clsp_errors


def similarity_term(method, anchor_views: torch.Tensor, synthetic_views: torch.Tensor) -> torch.Tensor:
    """mean(2 − 2·cos(z, z_syn)) over the pairs; both embedded in one batch, gradients through both."""
    z = method.embed(torch.cat([anchor_views, synthetic_views])).float()
    k = len(anchor_views)
    return (2 - 2 * F.cosine_similarity(z[:k], z[k:], dim=1)).mean()


class SyntheticPositives:
    """The ``positives=clsp`` add-on; built as ``SyntheticPositives(job_cfg, **positives_node)``.

    The stages read their settings (candidates, diffusion, sampler, generate) from the job config,
    whose hash keys their artifacts; the keyword arguments used here are the training-time ones.
    """

    check_config = staticmethod(clsp_errors)  # called by harness.jobs.config.validate

    @staticmethod
    def stages(cfg) -> list:
        """The stages of the synthetic set this job needs (DDPM, shards, assembly; harness/jobs/stages.py)."""
        from methods.clsp.generate import clsp_stages

        return clsp_stages(cfg)

    @staticmethod
    def held_bytes(cfg, n_images: int, image_bytes: int) -> int:
        """The memory budget's hook (harness/core/data/residency.py): the candidate set, K images per
        training image at the DDPM's side (`image_bytes`, a decoded training image's, while that side is
        theirs), held where the training set is (dataset.residency)."""
        positives = cfg.get("positives") or {}
        if float(positives.get("ratio", 0) or 0) <= 0:
            return 0
        size = OmegaConf.select(cfg, "positives.diffusion.image_size", default=None)
        if size is None and is_encoded(cfg.dataset):
            size = ADDON_SIZE_ON_ENCODED
        per_image = image_bytes if size is None else 3 * int(size) ** 2
        return int(positives.get("candidates", 0) or 0) * n_images * per_image

    def __init__(self, cfg, ratio: float = 0.5, weight: float = 1.0, mode: str = "similarity", view: int = 0,
                 candidates: int = 8, diffusion=None, sampler=None, generate=None, stages=None):
        if mode not in MODES:
            raise ValueError(f"positives.mode = {mode!r} is not allowed: expected one of {', '.join(MODES)}")
        self.cfg = cfg
        self.ratio, self.weight, self.mode, self.view = float(ratio), float(weight), mode, int(view)
        self.used, self.seen = 0, 0
        self.candidates: torch.Tensor | None = None  # N×K×H×W×3 uint8 on the training device

    def setup(self, data, info) -> None:
        self.device = info.device
        aug = self.cfg.augment
        self.pipeline = Pipeline.from_config(aug.pipelines[aug.views[self.view]])
        self.mean = torch.tensor(list(self.cfg.dataset.mean), device=info.device).view(1, 3, 1, 1)
        self.std = torch.tensor(list(self.cfg.dataset.std), device=info.device).view(1, 3, 1, 1)
        # Its own stream, so the method's views are the same with and without synthetic positives.
        self.generator = torch.Generator(device=info.device).manual_seed(int(self.cfg.seed) * 7_000_003 + info.rank)
        if self.ratio == 0:
            return  # nothing is ever drawn: no diffusion model or synthetic set is needed
        from methods.clsp.generate import synthetic_set

        folder = synthetic_set(self.cfg, data, info.device)
        index = np.load(folder / "index.npy")
        if not np.array_equal(index, data.train_index.numpy()):
            raise RuntimeError(f"synthetic set {folder} was made for other training images than this job's")
        if data.residency == "host":  # memory-mapped (shared by the node's ranks); each step gathers its rows
            self.candidates = torch.from_numpy(np.load(folder / "candidates.npy", mmap_mode="c"))
        else:
            self.candidates = torch.from_numpy(np.load(folder / "candidates.npy")).to(info.device)
        # Add-on batches carry full-training-split positions; the set's rows follow data.train_index.
        row_of = torch.full((int(index.max()) + 1,), -1, dtype=torch.long)
        row_of[torch.from_numpy(index)] = torch.arange(len(index))
        self.row_of = row_of.to(info.device)
        if info.is_main:
            self._copy_grid(folder, info.world_size)

    def _copy_grid(self, folder: Path, world_size: int) -> None:
        from harness.jobs.config import run_key
        from harness.jobs.run import run_dir

        target = run_dir(self.cfg, run_key(self.cfg, world_size))
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / "grid.png", target / "clsp_grid.png")
        print(f"[clsp] synthetic set {folder}; anchors | candidates grid in {target / 'clsp_grid.png'}",
              file=sys.stderr, flush=True)

    def synthetic_views(self, image_ids: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """One random candidate of each training image (full-split positions), augmented and normalised,
        as views of `size` (the method's view's; None: the candidates' own)."""
        rows = self.row_of[image_ids]
        pick = torch.randint(self.candidates.shape[1], (len(rows),), generator=self.generator,
                             device=rows.device)
        if self.candidates.device != rows.device:  # host residency: gather on the host, then copy
            images = self.candidates[rows.cpu(), pick.cpu()].to(rows.device, non_blocking=True).permute(0, 3, 1, 2)
        else:
            images = self.candidates[rows, pick].permute(0, 3, 1, 2)
        with torch.autocast(rows.device.type, enabled=False):
            return (augment(images, self.pipeline, self.generator, size) - self.mean) / self.std

    def step(self, batch: Batch) -> AddonOut:
        n = len(batch.index)
        self.seen += n
        k = round(self.ratio * n)
        if k == 0:
            return AddonOut()
        selected = torch.randperm(n, generator=self.generator, device=batch.index.device)[:k]
        anchor_views = batch.views[self.view]
        views = self.synthetic_views(batch.index[selected], anchor_views.shape[-1]).to(anchor_views.dtype)
        if self.mode == "similarity":
            term = similarity_term(batch.method, anchor_views[selected], views)
        else:
            hook = getattr(batch.method, "synthetic_positive_loss", None)
            if hook is None:
                raise TypeError(f"positives.mode=extra_positive needs {type(batch.method).__name__}"
                                ".synthetic_positive_loss(z_syn, selected); see methods/clsp/addon.py")
            term = hook(batch.method.embed(views), selected).mean()
        self.used += k
        return AddonOut(loss=self.weight * term, logs={"loss_synthetic": term.detach()})

    def epoch_metrics(self) -> dict[str, float]:
        counts = distributed.mean_over_ranks(torch.tensor([float(self.used), float(self.seen)], device=self.device))
        self.used, self.seen = 0, 0
        return {"synthetic_share": (counts[0] / counts[1].clamp(min=1)).item()}
