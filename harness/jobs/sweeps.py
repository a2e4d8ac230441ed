"""Sweep presets: the YAML files of the top-level ``sweeps/`` folder become the ``sweep`` group.

Hydra finds a config group as a folder of that name on its search path; the presets live in
``sweeps/`` (the design's layout) and are selected as ``sweep=NAME``, so they are registered in
Hydra's ConfigStore under group ``sweep`` with package ``_global_`` instead. Dropping a file in
``sweeps/`` (or in ``./sweeps`` of the directory you run from) adds a preset.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

PACKAGED = Path(__file__).resolve().parents[2] / "sweeps"


def sweep_folders() -> list[Path]:
    folders = [PACKAGED]
    local = Path.cwd() / "sweeps"
    if local.is_dir() and local.resolve() != PACKAGED:
        folders.append(local)
    return folders


def register_sweeps() -> list[str]:
    """Register every sweeps/*.yaml as option `sweep=<stem>`; returns the names."""
    store = ConfigStore.instance()
    names = []
    for folder in sweep_folders():
        for path in sorted(folder.glob("*.yaml")):
            node = OmegaConf.load(path)
            store.store(group="sweep", name=path.stem, node=node, package="_global_", provider="harness-sweeps")
            names.append(path.stem)
    return names
