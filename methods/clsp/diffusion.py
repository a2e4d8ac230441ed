"""The diffusion model behind CLSP's synthetic positives, and its anchor-interpolated sampler.

Three ways to get a model (methods.md §4.1): train an unconditional DDPM on the training split
(diffusers ``UNet2DModel`` + ``DDPMScheduler``, the released code's recipe), load a local
diffusers checkpoint directory, or load a hub id (needs the internet; never used in tests).

The sampler (methods.md §4.2) is DDIM in which, at every step, the anchor image is noised to the
current level and both it and the sample go through the UNet's down path and middle block; the
middle output becomes ``w * sample + (1 - w) * anchor`` and the up path runs on the sample's skip
connections. It calls the UNet's own submodules in the order ``UNet2DModel.forward`` does, so any
diffusers checkpoint of that class (with plain down/up blocks) works.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from harness.artifacts import artifact_path, build_once, dataset_identity, lock_timeout_s
from harness.core import tv  # noqa: F401  (makes torchvision, and so diffusers, importable on a CPU torch)
from harness.core.checkpoint import load_checkpoint, save_checkpoint
from harness.core.data.encoded import ADDON_SIZE_ON_ENCODED, is_encoded
from harness.core.ema import ema_update
from harness.core.optim import Adam
from harness.core.progress import Progress

# isort: split
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


# ------------------------------------------------------------------------------------------ model
def build_unet(unet_cfg: Mapping, image_size: int) -> UNet2DModel:
    """A UNet2DModel from the `positives.diffusion.unet` settings (channels, blocks, attention levels)."""
    channels = tuple(int(c) for c in unet_cfg["block_out_channels"])
    attention = {int(a) for a in unet_cfg.get("attention_levels", [])}
    down = tuple("AttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(len(channels)))
    up = tuple("AttnUpBlock2D" if i in attention else "UpBlock2D" for i in reversed(range(len(channels))))
    return UNet2DModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        layers_per_block=int(unet_cfg["layers_per_block"]),
        dropout=float(unet_cfg.get("dropout", 0.0)),
        norm_num_groups=int(unet_cfg.get("norm_num_groups", 32)),
        attention_head_dim=unet_cfg.get("attention_head_dim"),
        add_attention=bool(unet_cfg.get("mid_attention", True)),
    )


def build_scheduler(diffusion_cfg: Mapping) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=int(diffusion_cfg["timesteps"]),
                         beta_start=float(diffusion_cfg["beta_start"]), beta_end=float(diffusion_cfg["beta_end"]),
                         beta_schedule="linear")


def load_model(source: str, **hub_kwargs) -> tuple[UNet2DModel, DDPMScheduler | None]:
    """(unet, training scheduler or None) from a diffusers directory or hub id.

    A pipeline layout (``unet/``, ``scheduler/``) or a bare UNet folder both work.
    """
    local = Path(source).expanduser()
    if local.is_dir():
        if (local / "unet").is_dir():
            unet = UNet2DModel.from_pretrained(local / "unet", low_cpu_mem_usage=False)
            scheduler = DDPMScheduler.from_pretrained(local / "scheduler") if (local / "scheduler").is_dir() else None
            return unet, scheduler
        return UNet2DModel.from_pretrained(local, low_cpu_mem_usage=False), None
    unet = UNet2DModel.from_pretrained(source, subfolder="unet", **hub_kwargs)
    return unet, DDPMScheduler.from_pretrained(source, subfolder="scheduler", **hub_kwargs)


def train_ddpm(images: torch.Tensor, diffusion_cfg: Mapping, out_dir: Path, state_dir: Path, device: torch.device,
               log_every: float = 10.0) -> None:
    """Train an unconditional DDPM on uint8 N×3×H×W `images`; save the EMA model as a diffusers pipeline.

    The released recipe: flip-only augmentation, ε-prediction MSE, Adam with linear warm-up,
    gradient clipping and an EMA of the weights (the EMA is what is saved and sampled from).
    A `train_state.pt` in `state_dir` (written every `checkpoint_every` epochs) lets a killed build resume.
    """
    seed = int(diffusion_cfg.get("seed", 0))
    torch.manual_seed(seed)
    unet = build_unet(diffusion_cfg["unet"], images.shape[-1]).to(device)
    ema = build_unet(diffusion_cfg["unet"], images.shape[-1]).to(device).requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    scheduler = build_scheduler(diffusion_cfg)
    optimizer = Adam(unet.parameters(), lr=float(diffusion_cfg["lr"]))
    epochs, batch = int(diffusion_cfg["epochs"]), int(diffusion_cfg["batch_size"])
    warmup, clip = int(diffusion_cfg["warmup_steps"]), float(diffusion_cfg["grad_clip"])
    decay = float(diffusion_cfg["ema_decay"])
    steps_per_epoch = max(len(images) // batch, 1)
    total = epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(seed)
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file = state_dir / "train_state.pt"
    start = 0
    state = load_checkpoint(state_file, device, "[diffusion]", required=("unet", "ema", "optimizer", "generator",
                                                                         "epoch"))
    if state is not None:
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        start = state["epoch"] + 1
        print(f"[diffusion] resuming training at epoch {start + 1}/{epochs}", file=sys.stderr, flush=True)
    alphas = scheduler.alphas_cumprod.to(device)
    data = images.to(device)
    progress = Progress("[diffusion]", total, first=start * steps_per_epoch, every=log_every, scale=batch)
    for epoch in range(start, epochs):
        unet.train()
        order = torch.randperm(len(data), generator=gen)
        for step in range(steps_per_epoch):
            global_step = epoch * steps_per_epoch + step
            for group in optimizer.param_groups:
                group["lr"] = float(diffusion_cfg["lr"]) * min(1.0, (global_step + 1) / max(warmup, 1))
            x = data[order[step * batch:(step + 1) * batch].to(device)].float().div(127.5).sub(1)
            flip = (torch.rand(len(x), generator=gen) < 0.5).to(device).view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
            noise = torch.randn(x.shape, generator=gen).to(device)
            t = torch.randint(0, len(alphas), (len(x),), generator=gen).to(device)
            a = alphas[t].view(-1, 1, 1, 1)
            loss = F.mse_loss(unet(a.sqrt() * x + (1 - a).sqrt() * noise, t).sample, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), clip)
            optimizer.step()
            # EMA with the usual short warm-up, so a brief (test) training still has a usable EMA.
            ema_update(unet, ema, min(decay, (1 + global_step) / (10 + global_step)))
            if progress.due(final=global_step + 1 == total):
                progress.report(global_step + 1, f"epoch {epoch + 1}/{epochs} step {global_step + 1}/{total} | "
                                                 f"loss {loss.item():.4f}")
        every = int(diffusion_cfg.get("checkpoint_every", 0) or 0)
        if every and (epoch + 1) % every == 0 and epoch + 1 < epochs:
            save_checkpoint({"unet": unet.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                             "generator": gen.get_state(), "epoch": epoch}, state_file)
    DDPMPipeline(unet=ema.cpu(), scheduler=scheduler).save_pretrained(out_dir)
    shutil.rmtree(state_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------- sampler
def ddim_scheduler(trained: DDPMScheduler | None, sampler_cfg: Mapping) -> DDIMScheduler:
    """The DDIM schedule of the released code: steps spread as linspace(-1, 999, steps + 1), last ᾱ = 1.

    diffusers' "trailing" spacing gives exactly those timesteps (999, 989, ..., 9 for 100 steps),
    and set_alpha_to_one makes the final step land on the clean image.
    """
    # Private keys go: diffusers drops every key named in `_use_default_values` (set for any scheduler
    # built in memory, or loaded from an older config file), which would silently undo the overrides.
    base = {k: v for k, v in (trained.config if trained is not None else {}).items() if not k.startswith("_")}
    base.update(timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0,
                clip_sample=bool(sampler_cfg.get("clip_sample", False)))
    return DDIMScheduler.from_config(base)


def _check_supported(unet: UNet2DModel) -> None:
    blocks = list(unet.down_blocks) + list(unet.up_blocks)
    if any(hasattr(b, "skip_conv") for b in blocks):
        raise ValueError("the interpolated sampler supports UNet2DModel with plain down/up blocks, "
                         "not the Skip* blocks of score-SDE models")
    if unet.class_embedding is not None:
        raise ValueError("the interpolated sampler needs an unconditional UNet2DModel (no class embedding)")


def _time_embedding(unet: UNet2DModel, t: torch.Tensor, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    timesteps = t.reshape(-1).to(device) * torch.ones(n, dtype=t.dtype, device=device)
    return timesteps, unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))


def interpolated_noise(unet: UNet2DModel, x: torch.Tensor, anchor_t: torch.Tensor, t: torch.Tensor,
                       weight: float) -> torch.Tensor:
    """The UNet's noise prediction for `x` with its bottleneck mixed toward the noised anchor.

    Both go through conv_in, the down blocks and the middle block in one batch; the middle output
    becomes weight·sample + (1 − weight)·anchor; the up blocks then use the sample's skips.
    """
    n = len(x)
    both = torch.cat([x, anchor_t])
    if unet.config.center_input_sample:
        both = 2 * both - 1.0
    timesteps, emb = _time_embedding(unet, t, 2 * n, x.device)
    h = unet.conv_in(both)
    skips: tuple[torch.Tensor, ...] = (h,)
    for block in unet.down_blocks:
        h, res = block(hidden_states=h, temb=emb)
        skips += res
    if unet.mid_block is not None:
        h = unet.mid_block(h, emb)
    h = weight * h[:n] + (1 - weight) * h[n:]
    skips = tuple(s[:n] for s in skips)  # the sample's skip connections only
    emb = emb[:n]
    for block in unet.up_blocks:
        res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
        h = block(h, res, emb)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    h = unet.conv_out(h)
    if unet.config.time_embedding_type == "fourier":
        h = h / timesteps[:n].reshape(-1, 1, 1, 1)
    return h


@torch.no_grad()
def sample_interpolated(unet: UNet2DModel, scheduler: DDIMScheduler, anchors: torch.Tensor, *, weight: float,
                        steps: int, eta: float, generators: list[torch.Generator],
                        anchor_generators: list[torch.Generator]) -> torch.Tensor:
    """Synthetic positives for `anchors` (float N×3×H×W in [−1, 1]); returns the same shape in [−1, 1].

    `generators` (one per image, CPU) drive the sample's own randomness exactly as diffusers'
    DDIM pipeline does (the starting noise, then each step's η-noise), and `anchor_generators`
    the noise added to the anchor at each step. So with weight = 1 the result is DDIM sampling
    from the same starting noise, and each image's result depends only on its own generators.
    """
    _check_supported(unet)
    device, dtype = anchors.device, unet.dtype
    x = randn_tensor(anchors.shape, generator=generators, device=device, dtype=dtype)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        noise = randn_tensor(anchors.shape, generator=anchor_generators, device=device, dtype=dtype)
        anchor_t = scheduler.add_noise(anchors, noise, t.reshape(1))
        eps = interpolated_noise(unet, x, anchor_t, t, weight)
        x = scheduler.step(eps, t, x, eta=eta, generator=generators).prev_sample
    return x.clamp(-1, 1)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[−1, 1] float N×3×H×W → uint8 N×H×W×3 (the synthetic set's layout)."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()



# --------------------------------------------------------------------------------------- artifact
# Settings of positives.diffusion that do not change the trained model (kept out of its hash).
_NOT_IN_MODEL_KEY = ("path", "hub_id", "checkpoint_every")


def model_identity(cfg) -> dict:
    """What decides the diffusion model: a local path, a hub id, or the training recipe and data."""
    d = cfg.positives.diffusion
    if d.get("path"):
        return {"path": str(Path(str(d.path)).expanduser().absolute())}
    if d.get("hub_id"):
        return {"hub_id": str(d.hub_id)}
    recipe = {k: v for k, v in OmegaConf.to_container(d, resolve=True).items() if k not in _NOT_IN_MODEL_KEY}
    if recipe.get("image_size") is None:  # the decoded images' own size: left out, as before the option
        recipe.pop("image_size", None)
        if is_encoded(cfg.dataset):
            recipe["image_size"] = ADDON_SIZE_ON_ENCODED
    return {"train": recipe, "data": dataset_identity(cfg.dataset)}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def diffusion_model(cfg, train_x: torch.Tensor, device: torch.device) -> str:
    """The diffusion model the job's config asks for, as a diffusers folder or hub id to load.

    A trained model is an artifact (``<artifacts>/diffusion/<hash>``): built once on `train_x`
    (the job's training images) and reused by every job with the same recipe and training split.
    """
    ident = model_identity(cfg)
    if "path" in ident:
        return ident["path"]
    if "hub_id" in ident:
        return ident["hub_id"]
    path = artifact_path(cfg, "diffusion", ident)
    partial = path.parent / f"{path.name}.partial"  # the resumable training state, outside the build folder
    build_once(path, lambda tmp: train_ddpm(train_x, cfg.positives.diffusion, tmp, partial, device),
               config=ident, what="diffusion model", timeout_s=lock_timeout_s(cfg))
    return str(path)
