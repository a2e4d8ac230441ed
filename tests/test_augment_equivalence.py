"""The batched pipeline draws from the same distributions as torchvision v2 applied image by image.

Both sides see the same real CIFAR-10 images with the same settings; we compare the distribution
of crop parameters directly, and the distributions of per-image output statistics for each
colour operation and for a whole recipe, with a two-sample Kolmogorov–Smirnov test. A wrong
range, probability or order (e.g. jitter before crop, hue in degrees) moves these distributions
far beyond what sampling noise does at these sizes.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from benchmarks.torchvision_reference import torchvision_equivalent
from harness.core.data.augment import Pipeline, augment, sample_crops
from harness.core.tv import import_torchvision
from tests.conftest import requires_cifar

import_torchvision()  # repairs the CPU-torch import first
v2 = importlib.import_module("torchvision.transforms.v2")
N = 3000


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample KS statistic: the largest gap between the two empirical CDFs."""
    a, b = torch.sort(a.double().flatten()).values, torch.sort(b.double().flatten()).values
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, grid, right=True).double() / len(a)
    cdf_b = torch.searchsorted(b, grid, right=True).double() / len(b)
    return float((cdf_a - cdf_b).abs().max())


def ks_critical(n: int, m: int, alpha: float = 1e-3) -> float:
    return math.sqrt(-0.5 * math.log(alpha / 2)) * math.sqrt((n + m) / (n * m))


def assert_same_distribution(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    d, crit = ks_statistic(ours, theirs), ks_critical(len(ours), len(theirs))
    assert d < crit, f"{what}: KS statistic {d:.4f} >= {crit:.4f} (distributions differ)"


def per_image_stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Statistics that each operation moves: brightness, contrast, saturation, hue-ish, sharpness."""
    x = x.float()
    chroma = x.amax(dim=1) - x.amin(dim=1)
    return {
        "mean": x.mean(dim=(1, 2, 3)),
        "std": x.std(dim=(1, 2, 3)),
        "chroma": chroma.mean(dim=(1, 2)),
        "red_minus_blue": (x[:, 0] - x[:, 2]).mean(dim=(1, 2)),
        "sharpness": (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3)),
    }


@pytest.fixture(scope="module")
def real_images(cifar10_cached) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return cifar10_cached.train_x[torch.randperm(len(cifar10_cached.train_x), generator=gen)[:N]]


def test_crop_parameters_match_random_resized_crop():
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    top, left, h, w = sample_crops(20000, 32, 32, scale, ratio, torch.Generator().manual_seed(0), "cpu")
    torch.manual_seed(0)
    image = torch.zeros(3, 32, 32)
    theirs = torch.tensor([v2.RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(20000)],
                          dtype=torch.float64)
    for name, ours, col in (("top", top, 0), ("left", left, 1), ("height", h, 2), ("width", w, 3)):
        assert_same_distribution(ours, theirs[:, col], f"crop {name}")
    assert_same_distribution(h * w, theirs[:, 2] * theirs[:, 3], "crop area")


CASES = {
    "jitter strong": dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=0.0, jitter_p=0.8, brightness=0.8,
                          contrast=0.8, saturation=0.8, hue=0.2, grayscale=0.0),
    "jitter weak": dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=0.0, jitter_p=0.8, brightness=0.4,
                        contrast=0.4, saturation=0.2, hue=0.1, grayscale=0.0),
    "grayscale": dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=0.0, jitter_p=0.0, grayscale=0.2),
    "blur": dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=0.0, jitter_p=0.0, grayscale=0.0, blur_p=0.5),
    "solarize": dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=0.0, jitter_p=0.0, grayscale=0.0,
                     solarize=0.2),
    "symmetric recipe": dict(crop_scale=(0.08, 1.0), jitter_p=0.8, brightness=0.8, contrast=0.8, saturation=0.8,
                             hue=0.2, grayscale=0.2, blur_p=0.5),
}


@requires_cifar
@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_match_torchvision_v2_per_image(real_images, case):
    p = Pipeline(**CASES[case])
    ours = augment(real_images, p, torch.Generator().manual_seed(1))
    recipe = torchvision_equivalent(p)
    torch.manual_seed(1)
    theirs = torch.stack([recipe(img.float() / 255) for img in real_images])
    for name, ours_stat in per_image_stats(ours).items():
        assert_same_distribution(ours_stat, per_image_stats(theirs)[name], f"{case}: per-image {name}")


def test_the_check_can_fail():
    """A planted mistake (hue range in the wrong unit) is caught by the same comparison."""
    torch.manual_seed(0)
    # One orange colour for all: the output hue is then the drawn shift, whose range we got wrong.
    x = torch.tensor([200, 90, 40], dtype=torch.uint8).view(1, 3, 1, 1).expand(N, 3, 8, 8).contiguous()
    right = Pipeline(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=0.0, jitter_p=1.0, brightness=0.0,
                     contrast=0.0, saturation=0.0, hue=0.2, grayscale=0.0)
    wrong = Pipeline(**{**right.__dict__, "hue": 0.5})
    a = per_image_stats(augment(x, right, torch.Generator().manual_seed(0)))["red_minus_blue"]
    b = per_image_stats(augment(x, wrong, torch.Generator().manual_seed(1)))["red_minus_blue"]
    recipe = v2.ColorJitter(hue=0.2)
    c = per_image_stats(torch.stack([recipe(img.float() / 255) for img in x]))["red_minus_blue"]
    assert ks_statistic(a, c) < ks_critical(N, N)
    assert ks_statistic(b, c) > ks_critical(N, N)
