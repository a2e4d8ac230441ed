"""The batched view pipeline: one pass per batch, seeded, with each operation doing what it says."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from harness.core.data.augment import Pipeline, ViewMaker, augment, gaussian_blur, grayscale, sample_crops


def pipe(**over) -> Pipeline:
    cfg = {"crop": {"scale": [1.0, 1.0], "ratio": [1.0, 1.0]}, "jitter": {"p": 0.0}, "grayscale": 0.0,
           "blur": {"p": 0.0}, "solarize": 0.0, "flip": 0.0}
    cfg.update(over)
    return Pipeline.from_config(cfg)


def images(n=64, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_identity_settings_return_the_images():
    x = images()
    out = augment(x, pipe(), torch.Generator().manual_seed(0))
    assert torch.allclose(out, x.float() / 255, atol=1e-5)


def test_flip_mirrors_exactly_the_chosen_share():
    x = images(400)
    out = augment(x, pipe(flip=0.5), torch.Generator().manual_seed(0))
    same = (out - x.float() / 255).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (out - x.flip(-1).float() / 255).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert bool((same ^ mirrored).all())
    assert 0.4 < mirrored.float().mean() < 0.6


def test_crop_areas_follow_the_configured_scale():
    top, left, h, w = sample_crops(20000, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0), "cpu")
    area = h * w / 1024
    assert area.min() >= 0.05 and area.max() <= 1.0
    assert ((top >= 0) & (left >= 0) & (top + h <= 32) & (left + w <= 32)).all()
    # torchvision draws the area uniformly in [0.08, 1] (before rounding and rejection): mean ≈ 0.54
    assert 0.48 < area.mean() < 0.58


def test_grayscale_solarize_and_blur():
    x = images(200)
    g = augment(x, pipe(grayscale=1.0), torch.Generator().manual_seed(0))
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])
    assert torch.allclose(g[:, :1], grayscale(x.float() / 255), atol=1e-6)
    s = augment(x, pipe(solarize=1.0), torch.Generator().manual_seed(0))
    assert s.max() < 0.5 + 1e-6  # every pixel at or above 0.5 was inverted
    flat = torch.full((1, 3, 32, 32), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([1.5]), 13), flat, atol=1e-6)  # weights sum to one
    noisy = x[:8].float() / 255
    blurred = gaussian_blur(noisy, torch.full((8,), 2.0), 13)
    assert blurred.std() < noisy.std() * 0.6


def test_jitter_changes_images_only_with_its_probability_and_stays_in_range():
    x = images(400)
    p = pipe(jitter={"p": 0.5, "brightness": 0.8, "contrast": 0.8, "saturation": 0.8, "hue": 0.2})
    out = augment(x, p, torch.Generator().manual_seed(0))
    changed = (out - x.float() / 255).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert 0.4 < changed.float().mean() < 0.6
    assert out.min() >= 0 and out.max() <= 1


def test_views_are_seeded_and_each_view_has_its_own_pipeline():
    cfg = OmegaConf.create({"views": ["a", "b"], "pipelines": {
        "a": {"crop": {"scale": [1.0, 1.0], "ratio": [1.0, 1.0]}, "flip": 0.0},
        "b": {"crop": {"scale": [1.0, 1.0], "ratio": [1.0, 1.0]}, "flip": 0.0, "solarize": 1.0, "jitter": {"p": 0.0},
              "grayscale": 0.0, "blur": {"p": 0.0}}}})
    maker = ViewMaker(cfg, [0.5] * 3, [0.25] * 3, "cpu", seed=7)
    x = images(16)
    v1, v2 = maker(x)
    assert v1.shape == v2.shape == (16, 3, 32, 32)
    assert not torch.allclose(v1, v2)
    again = ViewMaker(cfg, [0.5] * 3, [0.25] * 3, "cpu", seed=7)
    w1, w2 = again(x)
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    assert torch.allclose(maker.plain(x), (x.float() / 255 - 0.5) / 0.25)


@pytest.mark.parametrize("jitter_p", [1.0, 0.3])
def test_the_cpu_jitter_of_large_images_a_few_at_a_time_equals_the_whole_batch(monkeypatch, jitter_p):
    # 224 px images go through color_jitter one at a time on the CPU (cache-sized, skipping blends that
    # are exactly the identity); a chunk as large as any batch gives the whole-batch computation. Equal up
    # to float rounding: with several threads the contrast's per-image mean is summed in an order that
    # depends on the batch's shape (bit for bit on one thread).
    from harness.core.data import augment as aug

    x = torch.rand(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    p = Pipeline(jitter_p=jitter_p, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    chunked = aug.color_jitter(x.clone(), p, torch.Generator().manual_seed(1))
    monkeypatch.setattr(aug, "CPU_CHUNK_PIXELS", 10**12)
    whole = aug.color_jitter(x.clone(), p, torch.Generator().manual_seed(1))
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    assert (whole - x).abs().max() > 0.05  # the jitter did change the images


def test_the_cpu_blur_of_the_drawn_images_equals_blurring_the_whole_batch():
    # On the CPU only the images whose coin came up are blurred (half the work at p=0.5); each equals its
    # blur in the whole batch, as a GPU computes it, and the others are untouched.
    from harness.core.data import augment as aug

    x = torch.rand(9, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    p = Pipeline(jitter_p=0.0, grayscale=0.0, blur_p=0.5, blur_sigma=(0.1, 2.0), blur_kernel=23, solarize=0.0)
    got = aug.photometric(x.clone(), p, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    coin = aug._coin(9, 0.5, g, x.device)
    sigma = aug._uniform(9, 0.1, 2.0, g, x.device)
    whole = torch.where(coin.view(-1, 1, 1, 1), aug.gaussian_blur(x, sigma, 23), x)
    assert 0 < int(coin.sum()) < 9
    torch.testing.assert_close(got, whole, rtol=0, atol=1e-6)
    assert torch.equal(got[~coin], x[~coin]) and (got[coin] - x[coin]).abs().max() > 0.01


def test_cpu_grayscale_and_solarize_of_the_drawn_images_equal_the_whole_batchs():
    # As the blur: on the CPU only the drawn images are made grey or solarized; each equals what the GPU's
    # whole-batch form gives it, bit for bit, and the others are untouched.
    from harness.core.data import augment as aug

    x = torch.rand(16, 3, 24, 20, generator=torch.Generator().manual_seed(1))
    p = Pipeline(jitter_p=0.0, grayscale=0.5, blur_p=0.0, solarize=0.5)
    got = aug.photometric(x.clone(), p, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    gray, sol = aug._coin(16, 0.5, g, x.device).view(-1, 1, 1, 1), aug._coin(16, 0.5, g, x.device).view(-1, 1, 1, 1)
    whole = torch.where(gray, aug.grayscale(x).expand_as(x), x)
    whole = torch.where(sol & (whole >= 0.5), 1.0 - whole, whole)
    assert torch.equal(got, whole)
    neither = ~(gray | sol).view(-1)
    assert 0 < int(neither.sum()) < 16 and torch.equal(got[neither], x[neither])
