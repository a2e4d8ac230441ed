"""Views of whole decoded images on the CPU: one image at a time, in uint8, on the image threads.

Where the views are made on the CPU (an encoded image-folder set trained or probed without a GPU),
the batched float pipeline of augment.py spends most of its time in ColorJitter's hue and the 23-tap
blur, a dozen passes over float planes each. Here every operation of a view is one uint8 OpenCV call
(a lookup table, a weighted sum, an HSV round trip, a separable filter) on one image whose planes stay
in cache, and the images of a batch are spread over the image threads (workers.image_threads), which
OpenCV and torch release the GIL for. About 4x the batched pipeline's images/s at 224 px on two cores
(benchmarks/imagenet_input.py).

The draws are augment.py's, from the same generators in the same order, so a seed gives the same crop
boxes, flips, factors, orders, coins and sigmas on either path. The values differ only by rounding:
each operation here rounds to uint8, as torchvision's operations on PIL images do (the CPU loaders of
solo-learn and torchvision), and the hue is turned in 256 steps of OpenCV's 8-bit HSV, as PIL's HSV
does. tests/test_augment_cpu.py bounds the difference from the float path on the same draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from harness.core.data.recipe import (
    GRAY_WEIGHTS,
    PhotometricDraws,
    Pipeline,
    _coin,
    blur_kernel_for,
    draw_photometric,
    gaussian_weights,
    sample_crops,
)
from harness.core.data.workers import image_threads

_IDENTITY = np.arange(256, dtype=np.float64)
_SOLARIZE = np.where(_IDENTITY >= 128, 255 - _IDENTITY, _IDENTITY).astype(np.uint8)  # x/255 >= 0.5 -> 1 - x


def _cv2():
    import cv2

    # One image per thread already uses every core: OpenCV's own threads inside each call would only
    # compete with the other images' threads.
    cv2.setNumThreads(1)
    return cv2


class ImageDraws:
    """One view's draws for a batch of whole images (augment.py's, in its order), as host lists, so
    that each image's task reads plain numbers: crop boxes, flips, jitter, grey, blur kernels, solarize."""

    def __init__(self, images: Sequence[torch.Tensor], p: Pipeline, size: int, g: torch.Generator,
                 boxes: torch.Generator):
        n = len(images)
        hw = torch.tensor([tuple(x.shape[-2:]) for x in images], dtype=torch.float32)
        crops = sample_crops(n, hw[:, 0], hw[:, 1], p.crop_scale, p.crop_ratio, boxes, torch.device("cpu"))
        self.boxes = list(zip(*(t.long().tolist() for t in crops)))  # (top, left, h, w) per image
        self.flip = _coin(n, p.flip, g, g.device).tolist()
        d: PhotometricDraws = draw_photometric(n, p, g, g.device)
        off = [False] * n
        j = d.jitter
        self.jitter = j.apply.tolist() if j is not None else off
        if j is not None:
            self.factors, self.order = j.blend_factors.tolist(), j.order.tolist()
            # the hue shift in steps of OpenCV's 8-bit hue (256 to the turn); 0 where hue is off
            self.hue_steps = [int(round(h * 256)) % 256 if p.hue > 0 else 0 for h in j.hshift.tolist()]
        self.gray = d.gray.tolist() if d.gray is not None else off
        self.blur = d.blur.tolist() if d.blur is not None else off
        if d.blur is not None:
            self.kernels = gaussian_weights(d.sigma, p.blur_kernel or blur_kernel_for(size)).numpy()
        self.solarize = d.solarize.tolist() if d.solarize is not None else off


def _lut(cv2, v: np.ndarray, scale: float, offset: float) -> np.ndarray:
    """round(scale·v + offset), clamped to 0-255: one rounding, like a blend on a PIL image."""
    return cv2.LUT(v, np.clip(np.rint(scale * _IDENTITY + offset), 0, 255).astype(np.uint8))


def _gray(cv2, v: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(v, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def _hue(cv2, v: np.ndarray, steps: int) -> np.ndarray:
    """Turn the hue by `steps` of OpenCV's full-range 8-bit HSV (256 to the turn)."""
    table = np.stack([(np.arange(256) + steps) % 256, np.arange(256), np.arange(256)], axis=1)
    hsv = cv2.LUT(cv2.cvtColor(v, cv2.COLOR_RGB2HSV_FULL), table.astype(np.uint8).reshape(256, 1, 3))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def _jitter(cv2, v: np.ndarray, factors: list[float], order: list[int], hue_steps: int) -> np.ndarray:
    """ColorJitter's four operations on one H×W×3 uint8 image, in its drawn order (augment.jittered)."""
    for op in order:
        f = factors[op]
        if op == 0:  # brightness: a blend with black
            v = _lut(cv2, v, f, 0.0)
        elif op == 1:  # contrast: a blend with the image's mean grey
            r, g, b, _ = cv2.mean(v)
            v = _lut(cv2, v, f, (1 - f) * (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b))
        elif op == 2:  # saturation: a blend with the image's grey
            v = cv2.addWeighted(v, f, _gray(cv2, v), 1 - f, 0.0)
        elif hue_steps:
            v = _hue(cv2, v, hue_steps)
    return v


def _view(cv2, image: torch.Tensor, i: int, d: ImageDraws, out: np.ndarray, mean, std) -> None:
    """One view of image `i` (3×H×W uint8) into `out` (3×S×S float32): crop, resize, flip, colour,
    normalise ((x/255 − mean) / std)."""
    size = out.shape[-1]
    top, left, h, w = d.boxes[i]
    # The crop's antialiased bilinear resize, as torchvision's on tensors, done on uint8 by torch's kernel
    # for interleaved (channels-last) pixels: the crop is made channels-last first (a crop of a decoded
    # image is not, once narrower than it), which makes the resize 2.7x faster and its output H×W×3.
    crop = image[None, :, top:top + h, left:left + w].contiguous(memory_format=torch.channels_last)
    v = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    v = np.ascontiguousarray(v[0].permute(1, 2, 0).numpy())  # already contiguous: no copy
    if d.flip[i]:
        v = cv2.flip(v, 1)
    if d.jitter[i]:
        v = _jitter(cv2, v, d.factors[i], d.order[i], d.hue_steps[i])
    if d.gray[i]:
        v = _gray(cv2, v)
    if d.blur[i]:
        v = cv2.sepFilter2D(v, -1, d.kernels[i], d.kernels[i], borderType=cv2.BORDER_REFLECT_101)  # torch's reflect
    if d.solarize[i]:
        v = cv2.LUT(v, _SOLARIZE)
    for c, plane in enumerate(cv2.split(v)):
        cv2.addWeighted(plane, 1 / (255 * std[c]), plane, 0.0, -mean[c] / std[c], dst=out[c], dtype=cv2.CV_32F)


def views_of_images(images: Sequence[torch.Tensor], pipelines: Sequence[Pipeline], sizes: Sequence[int],
                    g: torch.Generator, boxes: torch.Generator, mean: Sequence[float] = (0.0, 0.0, 0.0),
                    std: Sequence[float] = (1.0, 1.0, 1.0)) -> list[torch.Tensor]:
    """One view per pipeline of each whole image (3×H×W uint8 on the CPU, any sizes): float
    N×3×size×size tensors, normalised by `mean` and `std` (in [0, 1] units; the defaults give [0, 1]).
    Each image's views are made by one task on the image threads."""
    cv2 = _cv2()
    draws = [ImageDraws(images, p, s, g, boxes) for p, s in zip(pipelines, sizes)]
    outs = [torch.empty(len(images), 3, s, s) for s in sizes]
    planes = [o.numpy() for o in outs]
    mean, std = [float(m) for m in mean], [float(s) for s in std]

    def one(i: int) -> None:
        for d, out in zip(draws, planes):
            _view(cv2, images[i], i, d, out[i], mean, std)

    list(image_threads().map(one, range(len(images))))  # list(): an error in any image is raised here
    return outs
