"""Sweep presets: the YAML files of the top-level ``sweeps/`` folder become the ``sweep`` group.

Hydra finds a config group as a folder of that name on its search path; the presets live in
``sweeps/`` (the design's layout) and are selected as ``sweep=NAME``, so they are registered in
Hydra's ConfigStore under group ``sweep`` with package ``_global_`` instead. Dropping a file in
``sweeps/`` (or in ``./sweeps`` of the directory you run from) adds a preset.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from harness.errors import ConfigError

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


def group_options(config_dirs: list[Path] | tuple[Path, ...] = ()) -> dict[str, list[str]]:
    """Each config group (a folder of harness/conf or of a `--config-dir`, and `sweep`) -> its options."""
    groups: dict[str, set[str]] = {}
    for root in (CONF, *config_dirs):
        for d in sorted(Path(root).iterdir()) if Path(root).is_dir() else []:
            if d.is_dir() and d.name != "hydra":
                groups.setdefault(d.name, set()).update(p.stem for p in d.glob("*.yaml"))
    groups.setdefault("sweep", set()).update(p.stem for folder in sweep_folders() for p in folder.glob("*.yaml"))
    return {name: sorted(options) for name, options in groups.items()}


# Hydra's own command-line options that take a value (`--config-dir DIR`, `-cd DIR`): that value is no override.
HYDRA_VALUED_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn", "--experimental-rerun")


def split_argv(argv: list[str]) -> tuple[list[str], list[Path]]:
    """(the overrides, the `--config-dir` folders) of a `python -m harness` command line."""
    overrides, config_dirs = [], []
    args = iter(argv)
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag in HYDRA_VALUED_FLAGS:
            value = value if eq else next(args, "")
            if flag in ("--config-dir", "-cd"):
                config_dirs.append(Path(value).expanduser())
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides, config_dirs


def unknown_options(overrides: list[str], config_dirs: list[Path] | tuple[Path, ...] = ()
                    ) -> list[tuple[str, str, str]]:
    """(group, option, allowed) for each `group=option` override that names no option of its group.

    Checked before Hydra composes anything, so an unknown option is refused in the harness's one-line
    style (Hydra's own message is several lines and exits 1). A sweep's comma list is checked item by
    item; Hydra's sweep functions (`choice(...)`, `glob(...)`) are left to Hydra.
    """
    groups = group_options(config_dirs)
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


# --- the random-init floor as points of a sweep ------------------------------------------------
# A preset with `sweep_floor: true` gains one untrained-backbone run (trainer.epochs=0) per distinct
# point once the training-only overrides are taken off: typically one per dataset × backbone ×
# evaluation protocol × seed. Added as points of their own, not as a grid axis, which would repeat
# every point at epochs 0.
#
# The floor's identity: an untrained backbone's features depend on the backbone, its seed, the data
# and the evaluation, never on the method, its add-ons or its optimisation. So a floor point takes
# the preset's default method with weighting=none and positives=none, and its run key is computed
# by the ordinary rules: every method of the sweep shares one floor run, and running the preset again
# (with other methods, say) finds it done and skips it.
TRAINING_ONLY_GROUPS = ("method", "weighting", "positives", "augment")
TRAINING_ONLY_TRAINER = ("epochs", "lr", "optimizer", "weight_decay", "momentum", "warmup_epochs",
                         "warmup_start_lr", "min_lr", "base_batch", "lr_scaling", "classifier_lr",
                         "classifier_weight_decay")
FLOOR_OVERRIDES = ("weighting=none", "positives=none", "trainer.epochs=0")


def _training_only(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    head = key.split(".", 1)[0].split("/", 1)[0]
    return head in TRAINING_ONLY_GROUPS or (head == "trainer" and key.split(".", 1)[-1] in TRAINING_ONLY_TRAINER)


def floor_points(config, job_overrides) -> list[list[str]]:
    """The floor points to add to a sweep's `job_overrides` (none unless `sweep_floor` is true)."""
    if not OmegaConf.select(config, "sweep_floor", default=False):
        return []
    points: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for overrides in job_overrides:
        point = [o for o in overrides if not _training_only(o)] + list(FLOOR_OVERRIDES)
        if tuple(sorted(point)) not in seen:
            seen.add(tuple(sorted(point)))
            points.append(point)
    return points


# --- a paper's table as a list of points ------------------------------------------------------
# A preset may list its points instead of (or on top of) a grid: `sweep_points`, each
# {claim: ID, overrides: [...]}. A table's cells are rarely a full product (the ImageNet column runs a
# ResNet-50 with transfer probes, the CIFAR ones a ResNet-18), so each cell is written out, and
# names the claim it tests (leaderboard/claims.csv's id, or a sentence saying why there is none).
def preset_points(config, job_overrides) -> list[list[str]]:
    """The sweep's points: `job_overrides` as the sweeper made them, or, when the preset lists
    `sweep_points`, each of those once per listed point, with the point's overrides and `claim=`."""
    listed = OmegaConf.select(config, "sweep_points", default=None)
    if not listed:
        return [list(o) for o in job_overrides]
    # Unresolved: a point's `${paper_data}` or `${method.name}` is resolved in the point's own config.
    listed = OmegaConf.to_container(listed, resolve=False)
    points = []
    for base in job_overrides:
        for point in listed:
            claim = str(point.get("claim") or "none").replace('"', "'")
            points.append([*base, *[str(o) for o in point.get("overrides", [])], f'claim="{claim}"'])
    return points


# --- a sweep's points as job configs ----------------------------------------------------------
# What the launchers run (hydra_plugins/harness_launchers) and what `python -m harness.store prune
# --keep` keeps the artifacts of (harness/jobs/needed.py): one code path, so the two cannot disagree.
def with_floor_points(config: DictConfig, job_overrides: Sequence[Sequence[str]]) -> tuple[list[list[str]], int]:
    """The sweep's points (a preset's listed `sweep_points`, else the sweeper's), then its random-init floor
    points when the preset asks; and how many of them are the sweep's own. The launchers return results
    for the sweeper's points only: a sweeper zips them with what it asked."""
    own = preset_points(config, job_overrides)
    return own + floor_points(config, own), len(own)


def job_config(cfg: DictConfig) -> DictConfig:
    """A point's config as its job sees it (without the hydra node)."""
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])


class PointConfigs:
    """Hydra's ``load_sweep_config`` for a sweep's points, with one composition per defaults tree.

    Hydra composes each point from the YAML files (about 0.3 s), and a driver asks for each point more
    than once (the sweeper checks the batch, the launcher composes it, the local launcher once more):
    40 s of a 54-point preview, 20 s before a 64-task array is submitted. Points that differ only in
    plain values (``seed=3``, ``trainer.lr=0.1``) share their defaults tree, so the tree is composed
    once, from the point's other overrides (groups, ``+``/``~``, ``hydra.*``), and each point's values
    are applied to a copy by Hydra's own override code, as ``load_configuration`` applies them after
    composing. A point whose values cannot be applied so is composed in full: its error is Hydra's.
    """

    def __init__(self, loader: Any):
        from hydra.core.override_parser.overrides_parser import OverridesParser

        self.loader, self.compose = loader, loader.load_sweep_config
        self.parser = OverridesParser.create()
        self.trees: dict[tuple[str, ...], DictConfig] = {}

    # A Slurm job unpickles the launcher and with it this loader: the trees travel with each job, so a
    # task derives its config instead of composing it (0.35 s of each task), as long as they are few; a
    # sweep over many group choices would put every tree in every job's pickle, so then each task composes.
    CARRIED_TREES = 4

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if len(self.trees) > self.CARRIED_TREES:
            state["trees"] = {}
        return state

    @staticmethod
    def install(loader: Any) -> None:
        """Serve `loader.load_sweep_config` (every caller of this driver's loader) through one of these."""
        if not isinstance(loader.load_sweep_config, PointConfigs):
            loader.load_sweep_config = PointConfigs(loader)

    def is_value(self, override: Any) -> bool:
        from hydra.core.override_parser.types import OverrideType, ValueType

        return (override.type == OverrideType.CHANGE and override.package is None
                and override.value_type == ValueType.ELEMENT and not override.is_hydra_override()
                and not self.loader.repository.group_exists(override.key_or_group))

    def __call__(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        import copy

        from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
        from omegaconf import open_dict

        parsed = self.parser.parse_overrides(list(sweep_overrides))
        values = [o for o in parsed if self.is_value(o)]
        others = [o for o in parsed if not self.is_value(o)]
        # Config overrides among the others (`++trainer.lr=`, `~key`) are applied in the same pass as the
        # values; on a related key their order matters, so Hydra composes that point. Group choices
        # (`launcher=slurm` beside `launcher.nodes=2`) are settled before any value is applied.
        keys = [o.key_or_group for o in others if not self.loader.repository.group_exists(o.key_or_group)]
        if not values or any(_related(v.key_or_group, k) for v in values for k in keys):
            return self.compose(master_config, list(sweep_overrides))
        tree = tuple(o.input_line for o in others)
        if tree not in self.trees:
            self.trees[tree] = self.compose(master_config, list(tree))
        cfg = copy.deepcopy(self.trees[tree])
        try:
            ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        except Exception:  # noqa: BLE001 - Hydra composes it again and raises its own error
            return self.compose(master_config, list(sweep_overrides))
        task = [o for o in parsed if not o.is_hydra_override()]
        with open_dict(cfg.hydra):
            cfg.hydra.overrides.task = [o.input_line for o in task]
            dirname = cfg.hydra.job.config.override_dirname
            cfg.hydra.job.override_dirname = get_overrides_dirname(
                overrides=task, kv_sep=dirname.kv_sep, item_sep=dirname.item_sep, exclude_keys=dirname.exclude_keys)
        return cfg


def _related(a: str, b: str) -> bool:
    """Whether config keys `a` and `b` are the same node or one holds the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def compose_sweep_points(loader: Any, master: DictConfig, job_overrides: Sequence[Sequence[str]],
                         config_dirs: Sequence[Path] = ()) -> list[DictConfig]:
    """Each point's job config, composed by Hydra's config `loader` from the sweep's `master` config (the
    one `-m` composed) and the point's overrides. An unknown group option in a point (the sweep's grid,
    hydra.sweeper.params) raises one ConfigError naming every such option, before anything is composed:
    Hydra would stop at the first with a multi-line message."""
    found = list(dict.fromkeys(p for overrides in job_overrides
                               for p in unknown_options(list(overrides), list(config_dirs))))
    if found:
        raise ConfigError(*found[0], more=[ConfigError(*p) for p in found[1:]])
    PointConfigs.install(loader)
    return [job_config(loader.load_sweep_config(master, list(o))) for o in job_overrides]
