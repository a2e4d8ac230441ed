"""A view's recipe (Pipeline) and the draws of its random parameters, for a whole batch at once.

Shared by the two pipelines that make views: augment.py (float, batched, on the training device) and
augment_cpu.py (uint8, one image at a time, on the CPU). Both draw here, from the same generators in the
same order, so a seed gives the same crops, flips, factors and coins on either. Parameters follow the
distributions of torchvision's per-image transforms with the same settings (RandomResizedCrop,
ColorJitter in random order, RandomGrayscale, GaussianBlur, RandomSolarize, RandomHorizontalFlip).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class Pipeline:
    """One view's augmentation settings (probabilities and strengths)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int | None = 13  # None: follows the view size (blur_kernel_for)
    solarize: float = 0.0
    size: int | None = None  # the view's side in pixels (None: the input's); multi-crop views differ

    @classmethod
    def from_config(cls, cfg: Mapping) -> Pipeline:
        crop, jitter, blur = cfg.get("crop", {}), cfg.get("jitter", {}), cfg.get("blur", {})
        d = cls()
        return cls(
            crop_scale=tuple(crop.get("scale", d.crop_scale)),
            crop_ratio=tuple(crop.get("ratio", d.crop_ratio)),
            flip=float(cfg.get("flip", d.flip)),
            jitter_p=float(jitter.get("p", d.jitter_p)),
            brightness=float(jitter.get("brightness", d.brightness)),
            contrast=float(jitter.get("contrast", d.contrast)),
            saturation=float(jitter.get("saturation", d.saturation)),
            hue=float(jitter.get("hue", d.hue)),
            grayscale=float(cfg.get("grayscale", d.grayscale)),
            blur_p=float(blur.get("p", d.blur_p)),
            blur_sigma=tuple(blur.get("sigma", d.blur_sigma)),
            # Unset: the kernel follows the view size (blur_kernel_for); CIFAR's recipes set 13.
            blur_kernel=int(blur["kernel_size"]) if blur.get("kernel_size") else None,
            solarize=float(cfg.get("solarize", d.solarize)),
            size=int(cfg["size"]) if cfg.get("size") else None,
        )


def blur_kernel_for(size: int) -> int:
    """The blur kernel of a `size` px view when the recipe sets none: the odd size nearest 10% of the
    view, as SimCLR's and the ImageNet recipes' 23 at 224 (9 at 96)."""
    k = int(0.1 * size)
    return k + 1 if k % 2 == 0 else k


def _uniform(n: int, low: float, high: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def _coin(n: int, p: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) < p


def sample_crops(n: int, height, width, scale, ratio, g: torch.Generator, device, attempts: int = 10):
    """RandomResizedCrop's parameters for n images: (top, left, h, w) as float tensors.

    Like torchvision: up to 10 tries of (area, log-uniform aspect); the first that fits wins;
    if none fits, a centre crop with the aspect clamped to `ratio`. `height` and `width` are one
    size for the whole batch (ints) or each image's own (tensors of n): crops of whole images of
    different sizes follow the same rule on each image's own size.
    """
    per_image = isinstance(height, torch.Tensor)
    if per_image:
        height, width = height.to(device).float().view(n, 1), width.to(device).float().view(n, 1)
    area = height * width
    target = area * _uniform(n * attempts, scale[0], scale[1], g, device).view(n, attempts)
    log_r = _uniform(n * attempts, math.log(ratio[0]), math.log(ratio[1]), g, device).view(n, attempts)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(fits.int(), dim=1)  # index of the first fitting try (0 if none)
    rows = torch.arange(n, device=device)
    w, h, found = w[rows, first], h[rows, first], fits.any(dim=1)
    # Fallback: the whole image cropped to the nearest allowed aspect, centred.
    if per_image:
        height, width = height.view(n), width.view(n)
        in_ratio = width / height
        fw = torch.where(in_ratio > ratio[1], torch.round(height * ratio[1]), width)
        fh = torch.where(in_ratio < ratio[0], torch.round(width / ratio[0]), height)
    else:
        in_ratio = width / height
        if in_ratio < ratio[0]:
            fw, fh = width, round(width / ratio[0])
        elif in_ratio > ratio[1]:
            fh, fw = height, round(height * ratio[1])
        else:
            fw, fh = width, height
        fw, fh = torch.full_like(w, fw), torch.full_like(h, fh)
    w = torch.where(found, w, fw)
    h = torch.where(found, h, fh)
    # torch.randint(0, H - h + 1) per image: floor(U * (H - h + 1)).
    top = torch.floor(torch.rand(n, generator=g, device=device) * (height - h + 1))
    left = torch.floor(torch.rand(n, generator=g, device=device) * (width - w + 1))
    top = torch.where(found, top, torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(width - w, 2, rounding_mode="floor"))
    return top, left, h, w


@dataclass
class JitterDraws:
    """ColorJitter's draws for n images: whether each is jittered, its blend factors by operation
    (brightness, contrast, saturation, then 1 for hue), its hue shift (a fraction of a turn) and the
    order of its four operations (a random permutation per image). An image that skips jitter gets
    identity factors and no shift."""

    apply: torch.Tensor
    blend_factors: torch.Tensor  # n × 4
    hshift: torch.Tensor
    order: torch.Tensor  # n × 4


def draw_jitter(n: int, p: Pipeline, g: torch.Generator, dev) -> JitterDraws:
    """ColorJitter's parameters as torchvision draws them, for n images at once."""
    apply = _coin(n, p.jitter_p, g, dev)
    ones = torch.ones(n, device=dev)
    b = torch.where(apply, _uniform(n, max(0.0, 1 - p.brightness), 1 + p.brightness, g, dev), ones)
    c = torch.where(apply, _uniform(n, max(0.0, 1 - p.contrast), 1 + p.contrast, g, dev), ones)
    s = torch.where(apply, _uniform(n, max(0.0, 1 - p.saturation), 1 + p.saturation, g, dev), ones)
    hshift = torch.where(apply, _uniform(n, -p.hue, p.hue, g, dev), torch.zeros(n, device=dev))
    order = torch.argsort(torch.rand(n, 4, generator=g, device=dev), dim=1)
    return JitterDraws(apply, torch.stack([b, c, s, ones], dim=1), hshift, order)


@dataclass
class PhotometricDraws:
    """Every draw of the colour operations for n images, in the order they are drawn: jitter (None when
    the recipe has none), then grayscale, blur (coin and sigma) and solarize coins (None when off)."""

    jitter: JitterDraws | None
    gray: torch.Tensor | None
    blur: torch.Tensor | None
    sigma: torch.Tensor | None
    solarize: torch.Tensor | None


def draw_photometric(n: int, p: Pipeline, g: torch.Generator, dev) -> PhotometricDraws:
    jitter = draw_jitter(n, p, g, dev) if p.jitter_p > 0 else None
    gray = _coin(n, p.grayscale, g, dev) if p.grayscale > 0 else None
    blur = sigma = None
    if p.blur_p > 0:
        blur = _coin(n, p.blur_p, g, dev)
        sigma = _uniform(n, p.blur_sigma[0], p.blur_sigma[1], g, dev)
    solarize = _coin(n, p.solarize, g, dev) if p.solarize > 0 else None
    return PhotometricDraws(jitter, gray, blur, sigma, solarize)


def gaussian_weights(sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """The normalised 1-D Gaussian of `kernel` taps for each sigma (n × kernel), as torchvision's blur."""
    half = kernel // 2
    pos = torch.arange(-half, half + 1, device=sigma.device, dtype=sigma.dtype)
    weights = torch.exp(-0.5 * (pos.view(1, -1) / sigma.view(-1, 1)) ** 2)
    weights = weights / weights.sum(dim=1, keepdim=True)
    # The far taps of a small sigma are float32 denormals, which make a CPU filter several times slower
    # (measured 3x on OpenCV's); under 1e-12 a tap moves no result, so it is 0.
    return torch.where(weights < 1e-12, 0.0, weights)
