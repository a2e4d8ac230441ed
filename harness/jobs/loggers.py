"""Optional views of a run's per-epoch metrics in tools people already use: TensorBoard and Weights & Biases.

Both get exactly the rows the store gets (`metrics`, epochs counted from 1), from the main process
only, written beside the run's checkpoints in its run folder:

- ``logging.tensorboard=true``: event files in ``<run folder>/tensorboard/`` (torch's SummaryWriter;
  needs the optional extra: ``pip install -e '.[tensorboard]'``), one scalar tag per metric name.
- ``logging.wandb=offline`` (or ``online``): a W&B run in ``<run folder>/wandb/`` named after the run
  key, with the resolved config (needs ``pip install -e '.[wandb]'``). Offline writes only local files;
  ``wandb sync <folder>`` uploads them later. ``online`` needs a login and the internet.

The store stays the source of truth: a logger that fails to write says so once and is dropped, and
the run goes on.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.errors import ConfigError

WANDB_MODES = ("offline", "online")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def config_errors(cfg: DictConfig) -> list[ConfigError]:
    """The logging settings' problems, before anything runs: a bad value, or an extra that is not installed."""
    errors = []
    tensorboard = OmegaConf.select(cfg, "logging.tensorboard", default=False)
    if not isinstance(tensorboard, bool):
        errors.append(ConfigError("logging.tensorboard", tensorboard, "true or false"))
    elif tensorboard and not _installed("tensorboard"):
        errors.append(ConfigError("logging.tensorboard", True, "false, or install the optional extra first: "
                                  "pip install -e '.[tensorboard]'"))
    wandb = OmegaConf.select(cfg, "logging.wandb", default=None)
    if wandb not in (None, False, *WANDB_MODES):
        errors.append(ConfigError("logging.wandb", wandb, "null (off), offline or online"))
    elif wandb and not _installed("wandb"):
        errors.append(ConfigError("logging.wandb", wandb, "null (off), or install the optional extra first: "
                                  "pip install -e '.[wandb]'"))
    return errors


class RunLoggers:
    """The optional loggers of one run (none when both are off): `log` per epoch, `close` at the end."""

    def __init__(self, cfg: DictConfig, folder: Path, run_key: str, run_id: str):
        self.writers: dict[str, Any] = {}
        if OmegaConf.select(cfg, "logging.tensorboard", default=False):
            from torch.utils.tensorboard import SummaryWriter

            self.writers["tensorboard"] = SummaryWriter(log_dir=str(folder / "tensorboard"))
        mode = OmegaConf.select(cfg, "logging.wandb", default=None)
        if mode:
            import wandb

            (folder / "wandb").mkdir(parents=True, exist_ok=True)
            self.writers["wandb"] = wandb.init(
                mode=mode, dir=str(folder), project=OmegaConf.select(cfg, "logging.wandb_project") or "ssl-harness",
                name=run_key, id=run_id, resume="allow", config=OmegaConf.to_container(cfg, resolve=True),
                settings=wandb.Settings(silent=True, console="off"))

    def log(self, epoch: int, metrics: dict[str, float]) -> None:
        """One epoch's metrics (epoch counted from 1, as in the store)."""
        metrics = {k: float(v) for k, v in metrics.items() if v is not None}  # the store's NULLs: no point
        for name, writer in list(self.writers.items()):
            try:
                if name == "tensorboard":
                    for key, value in metrics.items():
                        writer.add_scalar(key, value, global_step=epoch)
                    writer.flush()
                else:
                    writer.log({**metrics, "epoch": epoch}, step=epoch)
            except Exception as e:  # a view of the run, not the run: say so once and go on without it
                print(f"[harness] logging.{name} stopped: {type(e).__name__}: {e}", file=sys.stderr)
                self.writers.pop(name)

    def close(self) -> None:
        for name, writer in self.writers.items():
            try:
                writer.close() if name == "tensorboard" else writer.finish()
            except Exception as e:
                print(f"[harness] logging.{name} did not close cleanly: {type(e).__name__}: {e}", file=sys.stderr)
        self.writers = {}
