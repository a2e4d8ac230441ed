"""View pipelines applied to whole batches of uint8 images on the training device, and ViewMaker,
which makes a method's views of each batch.

No per-image Python loop: every random parameter is drawn for the whole batch at once (recipe.py),
and each operation is applied to all images with per-image parameters (a per-image sampling grid for
the crop and flip, broadcast factors for colour jitter, a grouped convolution for blur). One exception,
for speed: whole decoded images of different sizes (an encoded set) on the CPU get their views from
augment_cpu.py, one image at a time in uint8, with the same draws.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from harness.core.data import augment_cpu
from harness.core.data.recipe import (  # noqa: F401 - _coin, _uniform: the tests draw as the pipeline does
    GRAY_WEIGHTS,
    JitterDraws,
    Pipeline,
    _coin,
    _uniform,
    blur_kernel_for,
    draw_jitter,
    draw_photometric,
    gaussian_weights,
    sample_crops,
)


def crop_flip_resize(x: torch.Tensor, top, left, h, w, flip: torch.Tensor, out: int) -> torch.Tensor:
    """Crop each image to its box, mirror it where `flip`, and resize to out×out, bilinearly."""
    n, _, height, width = x.shape
    sx = w / width
    sy = h / height
    tx = (left + w / 2) / width * 2 - 1
    ty = (top + h / 2) / height * 2 - 1
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = torch.where(flip, -sx, sx)
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, [n, x.shape[1], out, out], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by `shift` (a fraction of a turn), as torchvision's adjust_hue does
    through HSV. A hue rotation keeps each pixel's max and spread (max − min), so the way back needs
    only the new hue: c = max − spread·clamp(min(k, 4 − k), 0, 1), k = (n_c + 6h) mod 6 with
    n = 5, 3, 1 for R, G, B (the closed form of the six-sector HSV → RGB table)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    spread = maxc - minc
    safe = torch.where(spread > 0, spread, torch.ones_like(spread))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h6 = ((h / 6.0 + shift.view(-1, 1, 1)) % 1.0) * 6.0  # a grey pixel (spread 0) stays grey whatever h is
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (h6 + n) % 6.0
        channels.append(maxc - spread * torch.minimum(k, 4.0 - k).clamp_(0, 1))
    return torch.stack(channels, dim=1)


def color_jitter(x: torch.Tensor, p: Pipeline, g: torch.Generator) -> torch.Tensor:
    """ColorJitter applied with probability p.jitter_p, its four operations in per-image random order."""
    return jittered(x, draw_jitter(x.shape[0], p, g, x.device), p.hue > 0)


def jittered(x: torch.Tensor, d: JitterDraws, hue_on: bool) -> torch.Tensor:
    """A float batch jittered with its draws `d`.

    Brightness, contrast and saturation are all blends ``f·x + (1 − f)·target`` (target 0, the
    image's mean grey, its grey), so each of the four steps does one blend for every image whose
    operation at that step is one of them, with factor 1 (exactly the identity) for the others.
    Hue runs only on the images whose operation it is: on the CPU it is computed for just those
    (work is the limit there); on a GPU for all, kept where chosen (no host sync for the indices).
    """
    n, dev = x.shape[0], x.device
    pixels = x.shape[-1] * x.shape[-2]
    if dev.type != "cpu" or pixels < CPU_CHUNK_PIXELS // 4:  # CIFAR's small images: the whole batch at once
        return _jitter_steps(x, d.apply, d.order, d.blend_factors, d.hshift, hue_on)
    # On the CPU, large images a few at a time (about one 224 px image's pixels): their planes and the
    # hue's temporaries stay in the core's cache, which the whole batch does not fit, and a step whose
    # images all skip a blend or need no grey skips that work (twice as fast at 224 px). Every
    # operation is per image, so the values are the whole batch's (bit for bit on one thread; with more,
    # the contrast's mean may round differently in its last bit).
    chunk = max(1, CPU_CHUNK_PIXELS // pixels)
    return torch.cat([_jitter_steps(x[i:i + chunk], d.apply[i:i + chunk], d.order[i:i + chunk],
                                    d.blend_factors[i:i + chunk], d.hshift[i:i + chunk], hue_on)
                      for i in range(0, n, chunk)])


# Pixels per chunk of the CPU colour jitter: one 224 px image (0.6 MB as float; its temporaries fit in L2).
CPU_CHUNK_PIXELS = 224 * 224


def _jitter_steps(x: torch.Tensor, apply: torch.Tensor, order: torch.Tensor, blend_factors: torch.Tensor,
                  hshift: torch.Tensor, hue_on: bool) -> torch.Tensor:
    """color_jitter's four steps on a batch with its draws (see color_jitter)."""
    dev = x.device
    for step in range(4):
        op = order[:, step]
        factor = blend_factors.gather(1, op.view(-1, 1)).view(-1, 1, 1, 1)
        if dev.type == "cpu" and not bool((factor != 1).any()):
            x = x.clamp(0, 1)  # every blend of this step is 1·x + 0·target: exactly x (clamped, as below)
        elif dev.type == "cpu" and not bool(((op == 1) | (op == 2)).any()):
            x = (factor * x).clamp_(0, 1)  # brightness only: its target 0 adds exactly nothing
        else:
            gray = grayscale(x)
            target = torch.where((op == 2).view(-1, 1, 1, 1), gray, torch.where(
                (op == 1).view(-1, 1, 1, 1), gray.mean(dim=(1, 2, 3), keepdim=True), 0.0))
            x = (factor * x + (1 - factor) * target).clamp_(0, 1)
        if hue_on:
            hue = (op == 3) & apply
            if dev.type == "cpu":
                chosen = hue.nonzero().squeeze(1)
                if len(chosen):
                    x[chosen] = adjust_hue(x[chosen], hshift[chosen])
            else:
                x = torch.where(hue.view(-1, 1, 1, 1), adjust_hue(x, hshift), x)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma, reflect-padded like torchvision."""
    n, ch, hgt, wid = x.shape
    half = kernel // 2
    weights = gaussian_weights(sigma.to(x.dtype), kernel).repeat_interleave(ch, dim=0)  # (n·ch) × k
    y = F.pad(x.reshape(1, n * ch, hgt, wid), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, weights.view(n * ch, 1, 1, kernel), groups=n * ch)
    y = F.conv2d(y, weights.view(n * ch, 1, kernel, 1), groups=n * ch)
    return y.view(n, ch, hgt, wid)


def on_drawn_on_cpu(x: torch.Tensor, drawn: torch.Tensor, op) -> torch.Tensor:
    """On the CPU, where work is the limit, `op(images, chosen)` only on the images drawn (half the blur's
    work at p=0.5, a tenth of the solarize's at 0.1): each gets what `op` on the whole batch would give
    it, since every photometric operation is per image. A GPU computes all and keeps the drawn ones
    (indices would wait for the GPU)."""
    chosen = drawn.nonzero().squeeze(1)
    return x.index_copy(0, chosen, op(x[chosen], chosen)) if len(chosen) else x


def _solarized(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0.5, 1.0 - x, x)


def photometric(x: torch.Tensor, p: Pipeline, g: torch.Generator) -> torch.Tensor:
    """Colour jitter, grayscale, blur and solarize of a float batch in [0, 1] (after its crop)."""
    d = draw_photometric(x.shape[0], p, g, x.device)
    cpu = x.device.type == "cpu"
    if d.jitter is not None:
        x = jittered(x, d.jitter, p.hue > 0)
    if d.gray is not None:
        if cpu:
            x = on_drawn_on_cpu(x, d.gray, lambda images, _: grayscale(images).expand_as(images))
        else:
            x = torch.where(d.gray.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
    if d.blur is not None:
        kernel = p.blur_kernel or blur_kernel_for(x.shape[-1])
        sigma = d.sigma
        if cpu:
            x = on_drawn_on_cpu(x, d.blur, lambda images, chosen: gaussian_blur(images, sigma[chosen], kernel))
        else:
            x = torch.where(d.blur.view(-1, 1, 1, 1), gaussian_blur(x, sigma, kernel), x)
    if d.solarize is not None:
        x = on_drawn_on_cpu(x, d.solarize, lambda images, _: _solarized(images)) if cpu else torch.where(
            d.solarize.view(-1, 1, 1, 1), _solarized(x), x)
    return x


def augment(x_uint8: torch.Tensor, p: Pipeline, g: torch.Generator, out_size: int | None = None) -> torch.Tensor:
    """One augmented view of a batch: uint8 N×3×H×W in, float N×3×out×out in [0, 1] out."""
    n, _, height, width = x_uint8.shape
    dev = x_uint8.device
    x = x_uint8.float().div_(255)
    top, left, h, w = sample_crops(n, height, width, p.crop_scale, p.crop_ratio, g, dev)
    flip = _coin(n, p.flip, g, dev)
    x = crop_flip_resize(x, top, left, h, w, flip, out_size or height)
    return photometric(x, p, g)


def augment_images(images: list[torch.Tensor], p: Pipeline, g: torch.Generator, out_size: int,
                   boxes: torch.Generator | None = None) -> torch.Tensor:
    """One augmented view of whole images of different sizes (decoded JPEGs): each image's
    RandomResizedCrop is drawn on its own height and width and resized to out×out (bilinear,
    antialiased, as torchvision's tensor Resize), then flipped and coloured.
    The crop boxes are drawn from `boxes`, a CPU generator (default: `g`, when it is one): the host
    needs them to slice each image, and drawing them on a GPU would wait for the GPU.
    Returns float N×3×out×out in [0, 1]. On the CPU: augment_cpu's per-image uint8 path, same draws."""
    if per_image_on_cpu(images, [out_size]):
        return augment_cpu.views_of_images(images, [p], [out_size], g, boxes or g)[0]
    return augment_images_batched(images, p, g, out_size, boxes)


# From this view side up, whole images on the CPU get their views one image at a time in uint8
# (augment_cpu.py); below it the per-image Python work costs more than the batched float pipeline's
# arithmetic (measured, two threads: 2,600 vs 3,400 images/s at 32 px, even at 48, 1,900 vs 580 at 96).
PER_IMAGE_FROM_PX = 48


def per_image_on_cpu(images, sizes) -> bool:
    """Whether views of `images` are made by augment_cpu: whole images on the CPU, views of 48 px or more."""
    on_cpu = isinstance(images, list) and images[0].device.type == "cpu"
    return on_cpu and max(s or 0 for s in sizes) >= PER_IMAGE_FROM_PX


def augment_images_batched(images: list[torch.Tensor], p: Pipeline, g: torch.Generator, out_size: int,
                           boxes: torch.Generator | None = None) -> torch.Tensor:
    """augment_images as one float batch on the images' device (the GPU's path): one resize per image,
    then the batch is flipped and coloured together."""
    n, dev = len(images), images[0].device
    hw = torch.tensor([tuple(x.shape[-2:]) for x in images], dtype=torch.float32)
    top, left, h, w = (t.long().tolist() for t in sample_crops(n, hw[:, 0], hw[:, 1], p.crop_scale, p.crop_ratio,
                                                               boxes or g, torch.device("cpu")))
    flip = _coin(n, p.flip, g, dev).view(-1, 1, 1, 1)
    # One resize per image (sizes differ); a crop is a view of its decoded image, never a copy.
    x = torch.cat([F.interpolate(img[None, :, t:t + hh, l_:l_ + ww].float(), size=(out_size, out_size),
                                 mode="bilinear", antialias=True, align_corners=False)
                   for img, t, l_, hh, ww in zip(images, top, left, h, w)]).div_(255).clamp_(0, 1)
    x = torch.where(flip, x.flip(-1), x)
    return photometric(x, p, g)


class ViewMaker:
    """Makes a method's views of a batch: one pipeline per view, then normalisation.

    The batch is a uint8 N×3×H×W tensor (decoded sets: views are crops of it) or a list of whole
    decoded images of any size (encoded sets: each view is cropped from its image's full extent).
    A view's size is its pipeline's `size` (multi-crop: e.g. 2 × 224 then 4 × 96), else the
    input's side, else `view_size`; views are made in the order augment.views lists them.
    """

    def __init__(self, augment_cfg: Mapping, mean, std, device, seed: int, channels_last: bool = False,
                 view_size: int | None = None):
        pipelines = {name: Pipeline.from_config(c) for name, c in augment_cfg["pipelines"].items()}
        unknown = [v for v in augment_cfg["views"] if v not in pipelines]
        if unknown:
            raise ValueError(f"augment.views names {unknown}, not among augment.pipelines {sorted(pipelines)}")
        self.pipelines = [pipelines[v] for v in augment_cfg["views"]]
        self.view_size = view_size
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.boxes = torch.Generator().manual_seed(seed)  # crop boxes of whole images: drawn on the host
        self.channels_last = channels_last

    def reseed(self, seed: int) -> None:
        """Seed every draw of the views (a resumed epoch repeats them)."""
        self.generator.manual_seed(seed)
        self.boxes.manual_seed(seed)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __call__(self, x) -> list[torch.Tensor]:
        sizes = [p.size or self.view_size for p in self.pipelines]
        if per_image_on_cpu(x, sizes):  # whole images on the CPU: one image at a time, in uint8
            views = augment_cpu.views_of_images(x, self.pipelines, sizes, self.generator, self.boxes,
                                                self.mean.flatten().tolist(), self.std.flatten().tolist())
            return [v.contiguous(memory_format=torch.channels_last) if self.channels_last else v for v in views]
        if isinstance(x, list):  # whole decoded images of different sizes: one float batch
            return [self.normalize(augment_images_batched(x, p, self.generator, p.size or self.view_size,
                                                          self.boxes))
                    for p in self.pipelines]
        return [self.normalize(augment(x, p, self.generator, p.size)) for p in self.pipelines]

    def plain(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """The un-augmented, normalised images (for evaluation)."""
        return self.normalize(x_uint8.float().div(255))


def view_sizes(augment_cfg: Mapping) -> list[int | None]:
    """Each view's configured size (None: the input's), in augment.views order."""
    return [augment_cfg["pipelines"][v].get("size") for v in augment_cfg["views"]]


def pad_crop_flip(x_uint8: torch.Tensor, padding: int, flip: float, g: torch.Generator) -> torch.Tensor:
    """RandomCrop(size, padding, zero fill) + RandomHorizontalFlip for a whole uint8 batch, on its device.

    The standard CIFAR supervised/linear-probe augmentation: each image is shifted by up to
    `padding` pixels each way (uncovered pixels are 0) and mirrored with probability `flip`.
    Returns float images in [0, 1].
    """
    n, _, height, width = x_uint8.shape
    dev = x_uint8.device
    padded = F.pad(x_uint8.float().div(255), (padding,) * 4)
    top = torch.randint(0, 2 * padding + 1, (n,), generator=g, device=dev)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=g, device=dev)
    mirror = _coin(n, flip, g, dev)
    cols = torch.arange(width, device=dev).view(1, -1)
    cols = torch.where(mirror.view(-1, 1), width - 1 - cols, cols) + left.view(-1, 1)  # n × W
    rows = torch.arange(height, device=dev).view(1, -1) + top.view(-1, 1)  # n × H
    batch = torch.arange(n, device=dev).view(-1, 1, 1, 1)
    channel = torch.arange(x_uint8.shape[1], device=dev).view(1, -1, 1, 1)
    return padded[batch, channel, rows.view(n, 1, height, 1), cols.view(n, 1, 1, width)]
