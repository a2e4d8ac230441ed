"""The per-image torchvision pipeline matching a harness augmentation pipeline: the reference the
augmentation equivalence test compares against and the augment benchmark races (not harness code:
the harness never builds views per image)."""

from __future__ import annotations

import importlib

import torch

from harness.core.data.augment import Pipeline
from harness.core.tv import import_torchvision


def torchvision_equivalent(p: Pipeline, mean=None, std=None):
    """The per-image torchvision v2 pipeline with the same operations and settings as `p`.

    What the equivalence test compares against and what the augment benchmark races: the way
    per-image SSL libraries build their views. Input uint8 or float in [0, 1]; output float,
    normalised when `mean` and `std` are given.
    """
    import_torchvision()  # repairs the CPU-torch import before transforms.v2 loads
    v2 = importlib.import_module("torchvision.transforms.v2")
    ops = [v2.RandomResizedCrop(32, scale=p.crop_scale, ratio=p.crop_ratio, antialias=True),
           v2.RandomHorizontalFlip(p.flip)]
    if p.jitter_p > 0:
        ops.append(v2.RandomApply([v2.ColorJitter(p.brightness, p.contrast, p.saturation, p.hue)], p=p.jitter_p))
    if p.grayscale > 0:
        ops.append(v2.RandomGrayscale(p.grayscale))
    if p.blur_p > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(p.blur_kernel, p.blur_sigma)], p=p.blur_p))
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if p.solarize > 0:
        ops.append(v2.RandomSolarize(0.5, p.solarize))
    if mean is not None and std is not None:
        ops.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(ops)
