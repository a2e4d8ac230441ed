"""The fields of weighting=scorecl (harness/conf/weighting/scorecl.yaml), checked before anything runs."""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig, OmegaConf

from harness.errors import ConfigError
from harness.jobs.config import _choice, _number

SCORECL_STATISTICS = ("vector", "norm")
SCORECL_NORMALIZATIONS = ("mean", "minmax", "zsigmoid")
SCORECL_MODES = ("pretrained", "joint")


def scorecl_errors(cfg: DictConfig) -> list[ConfigError | None]:
    """weighting=scorecl's fields (methods/scorecl/addon.py); ScoreCL.check_config."""
    w, net = "weighting", "weighting.score_net"
    errors = [
        _number(cfg, f"{w}.alpha", low=0),
        _choice(cfg, f"{w}.statistic", SCORECL_STATISTICS),
        _choice(cfg, f"{w}.normalize", SCORECL_NORMALIZATIONS),
        _choice(cfg, f"{w}.mode", SCORECL_MODES),
        _number(cfg, f"{w}.sigma", low=0, strict_low=True),
        _number(cfg, f"{w}.joint_weight", low=0),
        _number(cfg, f"{net}.sigma_min", low=0, strict_low=True),
        _number(cfg, f"{net}.sigma_max", low=0, strict_low=True),
        _number(cfg, f"{net}.num_sigmas", low=1, integer=True),
        _number(cfg, f"{net}.epochs", low=1, integer=True),
        _number(cfg, f"{net}.max_images", low=1, integer=True, optional=True),
        _number(cfg, f"{net}.image_size", low=8, integer=True, optional=True),
        _number(cfg, f"{net}.batch_size", low=1, integer=True),
        _number(cfg, f"{net}.lr", low=0, strict_low=True),
        _number(cfg, f"{net}.ema", low=0, high=0.999999),
        _number(cfg, f"{net}.seed", low=0, integer=True),
    ]
    clip = OmegaConf.select(cfg, f"{w}.clip", default=None)
    if clip is not None and not (
            isinstance(clip, (list, tuple, ListConfig)) and len(clip) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in clip) and clip[0] <= clip[1]):
        errors.append(ConfigError(f"{w}.clip", clip, "null or [w_min, w_max] with w_min <= w_max"))
    if not any(errors):
        low, high, sigma = float(cfg[w].score_net.sigma_min), float(cfg[w].score_net.sigma_max), float(cfg[w].sigma)
        if int(cfg[w].score_net.num_sigmas) == 1:
            high = low
        elif high < low:
            errors.append(ConfigError(f"{net}.sigma_max", high, f"a number >= score_net.sigma_min ({low:g})"))
        if not low <= sigma <= high:
            errors.append(ConfigError(f"{w}.sigma", sigma, f"a noise level the score net is trained on, in "
                                                            f"[{low:g}, {high:g}] (score_net.sigma_min..sigma_max)"))
    return errors
