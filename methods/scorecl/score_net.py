"""A noise-conditional score network trained by denoising score matching (DSM).

The network is diffusers' ``UNet2DModel`` predicting the noise ε that was added to an image at
level σ; its score estimate is s(x, σ) = −ε̂(x, σ) / σ ≈ ∇ₓ log p_σ(x). σ is a single value or a
geometric set (NCSN-style), and the UNet is conditioned on it through its sinusoidal time
embedding at t = 100·ln σ (σ in (0.005, 1] spans the embedding's frequencies well).

Images enter as values in [-1, 1] (uint8 / 127.5 − 1). Training: Adam, random horizontal flips,
σ drawn uniformly from the set per image, loss mean ‖ε̂ − ε‖² (DSM weighted by σ²), an EMA of the
weights kept and saved. A trained network is an artifact (harness/artifacts.py) saved with
diffusers' ``save_pretrained`` under ``<artifact>/unet`` plus ``sigmas.json``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import harness.core.tv  # noqa: F401  (imported before diffusers, which is imported where used: see harness/core/tv.py)
from harness.core.ema import ema_update
from harness.core.optim import Adam
from harness.core.progress import Progress


def geometric_sigmas(sigma_min: float, sigma_max: float, num: int) -> list[float]:
    """`num` noise levels from sigma_min to sigma_max, evenly spaced in log; one level is sigma_min."""
    if num == 1:
        return [float(sigma_min)]
    ratio = math.log(sigma_max / sigma_min) / (num - 1)
    return [float(sigma_min * math.exp(ratio * i)) for i in range(num)]


def to_unit_range(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float() / 127.5 - 1.0


class ScoreNet(nn.Module):
    """ε-predicting UNet with score(x, σ) = −ε̂/σ."""

    def __init__(self, unet: nn.Module, sigmas: list[float]):
        super().__init__()
        self.unet = unet
        self.sigmas = [float(s) for s in sigmas]
        # The levels on the model's device, made once (not per DSM step); not saved: sigmas.json has them.
        self.register_buffer("sigma_levels", torch.tensor(self.sigmas), persistent=False)

    @classmethod
    def create(cls, net_cfg, image_size: int) -> ScoreNet:
        from diffusers import UNet2DModel

        unet_cfg = net_cfg.unet
        if isinstance(unet_cfg, DictConfig):
            unet_cfg = OmegaConf.to_container(unet_cfg, resolve=True)
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in unet_cfg.items()}
        unet = UNet2DModel(sample_size=image_size, in_channels=3, out_channels=3, **kwargs)
        return cls(unet, geometric_sigmas(float(net_cfg.sigma_min), float(net_cfg.sigma_max), int(net_cfg.num_sigmas)))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """ε̂(x, σ) for images x in [-1, 1] (N×3×H×W); σ a float or one value per image."""
        if isinstance(sigma, torch.Tensor):
            t = (100.0 * torch.log(sigma.float())).expand(x.shape[0])
        else:  # a fill on the device: no tensor copied from the host per call
            t = x.new_full((x.shape[0],), 100.0 * math.log(sigma), dtype=torch.float32)
        return self.unet(x, t).sample

    def score(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return -self(x, sigma) / sigma

    def save(self, folder: Path) -> None:
        self.unet.save_pretrained(folder / "unet")
        (folder / "sigmas.json").write_text(json.dumps(self.sigmas))

    @classmethod
    def load(cls, folder: Path) -> ScoreNet:
        from diffusers import UNet2DModel

        unet = UNet2DModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False)  # no accelerate here
        return cls(unet, json.loads((folder / "sigmas.json").read_text()))


def dsm_loss(eps: nn.Module, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Denoising score matching on clean images x in [-1, 1]: mean ‖ε̂(x + σε, σ) − ε‖², σ drawn
    uniformly from `levels` (a ScoreNet's sigma_levels, on x's device) per image. `eps` is a ScoreNet,
    or DDP around one."""
    sigma = levels[torch.randint(len(levels), (x.shape[0],), device=x.device)]
    noise = torch.randn_like(x)
    pred = eps(x + sigma.view(-1, 1, 1, 1) * noise, sigma)
    return (pred.float() - noise).pow(2).mean()


def train_score_net(net: ScoreNet, images: torch.Tensor, net_cfg, device: torch.device) -> ScoreNet:
    """Train `net` by DSM on uint8 `images` (N×3×H×W); returns the EMA copy (or `net` if ema=0).

    Prints a progress line (loss, images/s, ETA) every ~10 s and at each epoch end.
    """
    epochs, batch_size = int(net_cfg.epochs), int(net_cfg.batch_size)
    ema_decay = float(net_cfg.ema)
    gen = torch.Generator().manual_seed(int(net_cfg.seed))
    torch.manual_seed(int(net_cfg.seed))  # the UNet's init and the DSM noise
    net.to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False) if ema_decay > 0 else None
    optimizer = Adam(net.parameters(), lr=float(net_cfg.lr))
    if net_cfg.get("max_images") and len(images) > int(net_cfg.max_images):
        images = images[torch.randperm(len(images), generator=gen)[:int(net_cfg.max_images)]]
    images = images.to(device)
    n = len(images)
    steps = max(n // batch_size, 1)
    total, done = epochs * steps, 0
    progress = Progress("[score_net]", total, every=10.0, scale=batch_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        running = 0.0
        for step in range(steps):
            x = to_unit_range(images[order[step * batch_size:(step + 1) * batch_size]])
            if net_cfg.get("flip", True):
                flip = torch.rand(len(x), device=device) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            with autocast:
                loss = dsm_loss(net, x, net.sigma_levels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema_update(net, ema, ema_decay)
            done += 1
            if progress.due(final=step == steps - 1):
                running = loss.item()
                if not math.isfinite(running):
                    raise RuntimeError(f"score network DSM loss became {running} at epoch {epoch + 1}")
                progress.report(done, f"epoch {epoch + 1}/{epochs} step {step + 1}/{steps} | dsm {running:.4f}")
    return (ema if ema is not None else net).eval()
