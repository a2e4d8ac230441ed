"""The fields of positives=clsp (harness/conf/positives/clsp.yaml), checked before anything runs."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from harness.errors import ConfigError
from harness.jobs.config import DEVICES, _choice, _number, import_target

MODES = ("similarity", "extra_positive")


def clsp_errors(cfg: DictConfig) -> list[ConfigError | None]:
    """The fields of positives=clsp (harness/conf/positives/clsp.yaml, methods/clsp/addon.py)."""
    if OmegaConf.select(cfg, "positives.name", default=None) != "clsp":
        return []
    p, d = "positives", "positives.diffusion"
    errors = [
        _number(cfg, f"{p}.weight", low=0),
        _choice(cfg, f"{p}.mode", MODES),
        _number(cfg, f"{p}.view", low=0, high=len(cfg.augment.views) - 1, integer=True),
        _number(cfg, f"{p}.candidates", low=1, integer=True),
        _number(cfg, f"{p}.diffusion.image_size", low=8, integer=True, optional=True),
        _number(cfg, f"{p}.sampler.steps", low=1, integer=True),
        _number(cfg, f"{p}.sampler.eta", low=0, high=1),
        _number(cfg, f"{p}.sampler.weight", low=0, high=1),
        _number(cfg, f"{p}.sampler.batch_size", low=1, integer=True),
        _number(cfg, f"{p}.generate.seed", low=0, integer=True),
        _number(cfg, f"{p}.generate.shards", low=1, integer=True),
        _number(cfg, f"{p}.generate.workers", low=1, integer=True, optional=True),
        _choice(cfg, f"{p}.generate.device", DEVICES),
        _number(cfg, f"{d}.timesteps", low=1, integer=True),
        _number(cfg, f"{d}.beta_start", low=0, high=1, strict_low=True),
        _number(cfg, f"{d}.beta_end", low=0, high=1, strict_low=True),
        _number(cfg, f"{d}.epochs", low=1, integer=True),
        _number(cfg, f"{d}.batch_size", low=1, integer=True),
        _number(cfg, f"{d}.lr", low=0, strict_low=True),
        _number(cfg, f"{d}.warmup_steps", low=0, integer=True),
        _number(cfg, f"{d}.grad_clip", low=0, strict_low=True),
        _number(cfg, f"{d}.ema_decay", low=0, high=1),
    ]
    path, hub = OmegaConf.select(cfg, f"{d}.path", default=None), OmegaConf.select(cfg, f"{d}.hub_id", default=None)
    if path and hub:
        errors.append(ConfigError(f"{d}.hub_id", hub, f"null when {d}.path is set (one source of the model)"))
    if path and not Path(str(path)).expanduser().is_dir():
        errors.append(ConfigError(f"{d}.path", path, "an existing diffusers checkpoint directory"))
    if OmegaConf.select(cfg, f"{p}.mode", default=None) == "extra_positive":
        try:
            method = import_target(str(cfg.method._target_))
        except (ImportError, AttributeError, ValueError):
            method = None  # reported with method._target_
        if method is not None and not hasattr(method, "synthetic_positive_loss"):
            errors.append(ConfigError(f"{p}.mode", "extra_positive", f"similarity: {cfg.method.name} has no "
                                      "synthetic_positive_loss(z_syn, selected) hook (see methods/clsp/addon.py)"))
    return errors
