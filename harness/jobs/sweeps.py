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


CONF = Path(__file__).resolve().parents[1] / "conf"


def group_options() -> dict[str, list[str]]:
    """Each config group the harness defines (a folder of harness/conf, and `sweep`) -> its options."""
    groups = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(CONF.iterdir())
              if d.is_dir() and d.name != "hydra"}
    groups["sweep"] = sorted({p.stem for folder in sweep_folders() for p in folder.glob("*.yaml")})
    return groups


def unknown_options(overrides: list[str]) -> list[tuple[str, str, str]]:
    """(group, option, allowed) for each `group=option` override that names no option of its group.

    Checked before Hydra composes anything, so an unknown option is refused in the harness's one-line
    style (Hydra's own message is several lines and exits 1). A sweep's comma list is checked item by
    item; Hydra's sweep functions (`choice(...)`, `glob(...)`) are left to Hydra.
    """
    groups = group_options()
    found = []
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep or key not in groups or "(" in value or "[" in value:
            continue
        for option in value.strip("'\"").split(","):
            option = option.strip()
            if option not in groups[key] and option not in ("null", ""):
                found.append((key, option, "one of " + ", ".join(groups[key])))
    return found
