"""Config checks and run keys.

Every job validates its whole config before it loads data, trains or is submitted, and reports
all problems at once, each naming the field, the value and what is allowed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.errors import ConfigError
from harness.jobs import loggers
from harness.store import NOT_IN_RUN_KEY, NOT_IN_RUN_KEY_WHEN_NULL


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _drop(tree: dict, dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head not in tree:
        return
    if rest:
        if isinstance(tree[head], dict):
            _drop(tree[head], rest)
    else:
        del tree[head]


def experiment_config(cfg: DictConfig, world_size: int | None = None) -> dict:
    """The resolved config plus what decides the result without being a setting of its own:

    - ``dataset.folder_manifest`` for ``dataset.name=imagefolder``: the folder's files (a hash of
      their paths inside it, sizes and first/last 4 KiB, harness.core.data.datasets.folder_manifest),
      since ``dataset.root`` only says where they are: a copy elsewhere gets the same key. Where
      CIFAR is read from (root, archive, download) names the same images and adds nothing.
    - ``trainer.world_size`` when ``trainer.sync_bn=false`` and the job runs as more than one
      process: BatchNorm then normalises each rank's slice, so 1 and 8 processes are different
      experiments. With sync_bn=true (the default) every method here computes what one process
      computes on the whole global batch, and the world size stays out.

    `world_size` is the job's number of processes; None reads it from the environment as
    harness.core.distributed.setup will (torchrun's WORLD_SIZE, else SLURM_NTASKS, else 1).
    This is the config a run stores, so the leaderboard tells these runs apart too.
    """
    tree = to_container(cfg)
    if OmegaConf.select(cfg, "dataset.name") == "imagefolder":
        from harness.core.data.datasets import folder_manifest

        tree["dataset"]["folder_manifest"] = folder_manifest(str(cfg.dataset.root))
    if OmegaConf.select(cfg, "trainer.sync_bn", default=True) is False:
        if world_size is None:
            from harness.core.distributed import expected_world_size

            world_size = expected_world_size()
        if world_size > 1:
            tree["trainer"]["world_size"] = int(world_size)
    return tree


def run_key(cfg: DictConfig, world_size: int | None = None) -> str:
    """A stable hash of every config value that can change a run's result.

    That is `experiment_config` (which adds an image folder's file manifest, and the world size
    when trainer.sync_bn=false and there is more than one process) without NOT_IN_RUN_KEY.
    `world_size`: the job's number of processes, None to read it from the environment.
    """
    tree = experiment_config(cfg, world_size)
    for dotted in NOT_IN_RUN_KEY:
        _drop(tree, dotted)
    for dotted in NOT_IN_RUN_KEY_WHEN_NULL:
        if OmegaConf.select(cfg, dotted, default=None) is None:
            _drop(tree, dotted)
    blob = json.dumps(tree, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def import_target(path: str) -> Any:
    """'pkg.module.Name' -> the object; raises ImportError/AttributeError if it is not there."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def instantiate(node, *args: Any) -> Any:
    """Build the class named by ``node._target_`` with `args` and the node's other keys (not `name`)."""
    kwargs = {k: v for k, v in node.items() if k not in ("_target_", "name")}
    return import_target(node["_target_"])(*args, **kwargs)


def _number(cfg: DictConfig, field: str, *, low: float | None = None, high: float | None = None,
            strict_low: bool = False, integer: bool = False, optional: bool = False) -> ConfigError | None:
    value = OmegaConf.select(cfg, field, default=None)
    if value is None and optional:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
    kind = "an integer" if integer else "a finite number" if isinstance(value, float) and not ok else "a number"
    if ok and low is not None:
        ok = value > low if strict_low else value >= low
    if ok and high is not None:
        ok = value <= high
    if ok:
        return None
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if strict_low else '>='} {low:g}")
    if high is not None:
        bounds.append(f"<= {high}" if isinstance(high, int) else f"<= {high:g}")
    text = f"{kind}{' ' + ' and '.join(bounds) if bounds else ''}{' or null' if optional else ''}"
    return ConfigError(field, value, text)


def _choice(cfg: DictConfig, field: str, allowed: tuple[str, ...]) -> ConfigError | None:
    value = OmegaConf.select(cfg, field, default=None)
    if value in allowed:
        return None
    return ConfigError(field, value, "one of " + ", ".join(allowed))


def _flag(cfg: DictConfig, field: str) -> ConfigError | None:
    value = OmegaConf.select(cfg, field, default=False)
    return None if isinstance(value, bool) else ConfigError(field, value, "true or false")


SIZE_FIELDS = ("trainer.batch_size", "dataset.train_size", "dataset.test_size", "dataset.val_size",
               "dataset.subset_seed")
OPTIMIZERS = ("sgd", "lars", "adam", "adamw")
DEVICES = ("auto", "cpu", "cuda")
KEEP_CHECKPOINTS = ("all", "last", "weights")  # what a completed run keeps (harness/jobs/run.py)
PRECISIONS = ("auto", "fp32", "bf16")  # harness/core/device_path.py (which needs torch; this module does not)
DATASETS = ("cifar10", "cifar100", "imagefolder", "stl10", "tinyimagenet")
# dataset.recorded_as: the name an image folder's runs record (the runs table's dataset column), so that
# the leaderboard's references and claims (leaderboard/claims.csv names imagenet1k) match them; the
# presets dataset=imagenet and imagenet100 set it. dataset.name stays the loader (imagefolder).
RECORDED_AS = ("imagenet1k", "imagenet100")
LR_SCALING = ("linear", "sqrt", "none")
# runs.seed is a 32-bit INTEGER column: a larger seed would make every later ingest fail.
MAX_SEED = 2**31 - 1


def _folder_error(field: str, value: Any, folder: Path) -> ConfigError | None:
    """Why `folder` cannot be created or written to, as an error on `field`; None when it can."""
    existing = folder
    try:
        while not existing.exists():  # the nearest folder that is there: the rest gets created
            existing = existing.parent
        if not existing.is_dir():
            return ConfigError(field, value, f"a path whose folders can be created: {existing} is a file")
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            return ConfigError(field, value, f"a path on a writable file system: {existing} is on a read-only one")
    except OSError as e:
        return ConfigError(field, value, f"a path whose folders can be created: {existing}: {e.strerror}")
    if not os.access(existing, os.W_OK | os.X_OK):
        return ConfigError(field, value, f"a path in folders this user can write: {existing} is not writable")
    return None


def _storage_errors(cfg: DictConfig) -> list[ConfigError | None]:
    """The store's folder (its file, spool and runs live beside each other) and the folders set apart
    from it must be creatable and writable before anything runs."""
    path = OmegaConf.select(cfg, "store.path", default=None)
    if not path:
        return [ConfigError("store.path", path, "a file path for the results database")]
    errors = [_folder_error("store.path", path, Path(str(path)).expanduser().absolute().parent)]
    for field in ("store.runs_dir", "artifacts.dir"):
        folder = OmegaConf.select(cfg, field, default=None)
        if folder:
            errors.append(_folder_error(field, folder, Path(str(folder)).expanduser().absolute()))
    return errors


def _recorded_as_error(cfg: DictConfig) -> ConfigError | None:
    value = OmegaConf.select(cfg, "dataset.recorded_as", default=None)
    if value is None:
        return None
    if OmegaConf.select(cfg, "dataset.name") != "imagefolder":
        return ConfigError("dataset.recorded_as", value, "null unless dataset.name=imagefolder")
    return _choice(cfg, "dataset.recorded_as", RECORDED_AS)


def _dataset_extras_errors(cfg: DictConfig) -> list[ConfigError | None]:
    """dataset.mean/std (auto or 3 numbers) and eval.transfer's entries."""
    from harness.core.data.normalization import mean_std_errors
    from harness.jobs.transfer import transfer_errors

    errors = list(mean_std_errors(cfg.dataset)) if cfg.get("dataset") is not None else []
    return errors + transfer_errors(OmegaConf.select(cfg, "eval.transfer", default=None))


def _field_errors(cfg: DictConfig) -> list[ConfigError | None]:
    """Each plain field against its range or its allowed values."""
    return [
        _number(cfg, "seed", low=0, high=MAX_SEED, integer=True),
        _number(cfg, "trainer.epochs", low=0, integer=True),  # 0: evaluate the untrained backbone (the floor)
        _number(cfg, "trainer.batch_size", low=2, integer=True),
        _number(cfg, "trainer.base_batch", low=1, integer=True),
        _number(cfg, "trainer.lr", low=0, strict_low=True),
        _number(cfg, "trainer.weight_decay", low=0),
        _number(cfg, "trainer.warmup_epochs", low=0),
        _number(cfg, "trainer.momentum", low=0, high=1),
        _choice(cfg, "trainer.optimizer", OPTIMIZERS),
        _choice(cfg, "trainer.device", DEVICES),
        _choice(cfg, "trainer.lr_scaling", LR_SCALING),
        _choice(cfg, "trainer.precision", PRECISIONS),
        _flag(cfg, "trainer.compile"),
        _flag(cfg, "trainer.sync_bn"),
        _choice(cfg, "dataset.name", DATASETS),
        _recorded_as_error(cfg),
        _number(cfg, "dataset.train_size", low=1, integer=True, optional=True),
        _number(cfg, "dataset.test_size", low=1, integer=True, optional=True),
        _number(cfg, "dataset.val_size", low=0, integer=True, optional=True),
        _number(cfg, "dataset.subset_seed", low=0, integer=True, optional=True),
        _number(cfg, "dataset.device_memory_fraction", low=0, high=1, strict_low=True, optional=True),
        _number(cfg, "dataset.decode_workers", low=1, integer=True, optional=True),
        _number(cfg, "eval.every", low=0, integer=True),
        _number(cfg, "positives.ratio", low=0, high=1, optional=True),
        _number(cfg, "trainer.classifier_lr", low=0, strict_low=True, optional=True),
        _number(cfg, "trainer.classifier_weight_decay", low=0, optional=True),
        _number(cfg, "store.heartbeat_s", low=0, strict_low=True, optional=True),
        _number(cfg, "store.lost_after_s", low=0, strict_low=True, optional=True),
        _number(cfg, "store.summary_wait_s", low=0, optional=True),
        _choice(cfg, "store.keep_checkpoints", KEEP_CHECKPOINTS) if OmegaConf.select(
            cfg, "store.keep_checkpoints", default=None) is not None else None,
    ]


def _linear_probe_errors(cfg: DictConfig) -> list[ConfigError | None]:
    """eval.linear's fields, when the probe is enabled."""
    if not OmegaConf.select(cfg, "eval.linear.enabled", default=False):
        return []
    errors = [
        _number(cfg, "eval.linear.epochs", low=1, integer=True),
        _number(cfg, "eval.linear.lr", low=0, strict_low=True),
        _number(cfg, "eval.linear.momentum", low=0, high=1),
        _number(cfg, "eval.linear.weight_decay", low=0),
        _number(cfg, "eval.linear.batch_size", low=1, integer=True),
        _number(cfg, "eval.linear.gamma", low=0, strict_low=True),
        _number(cfg, "eval.linear.copies", low=1, integer=True),
        _choice(cfg, "eval.linear.optimizer", ("sgd", "adam")),
        _choice(cfg, "eval.linear.schedule", ("step", "cosine", "constant")),
        _choice(cfg, "eval.linear.augment", ("none", "flip", "crop_flip", "rrc_flip")),
    ]
    for i, _ in enumerate(OmegaConf.select(cfg, "eval.linear.milestones", default=[]) or []):
        errors.append(_number(cfg, f"eval.linear.milestones.{i}", low=0, high=1))
    return errors


def _protocol_and_method_errors(cfg: DictConfig) -> list[ConfigError | None]:
    """The k-NN protocols and the hyper-parameters several methods share, wherever a method has them."""
    errors: list[ConfigError | None] = []
    for i, _ in enumerate(OmegaConf.select(cfg, "eval.knn", default=[]) or []):
        errors.append(_number(cfg, f"eval.knn.{i}.k", low=1, integer=True))
        errors.append(_number(cfg, f"eval.knn.{i}.T", low=0, strict_low=True))
    for name in ("temperature", "temperature_m", "temperature_centroid"):
        errors.append(_number(cfg, f"method.{name}", low=0, strict_low=True, optional=True))
    for name in ("momentum_base", "momentum_final", "lam"):
        errors.append(_number(cfg, f"method.{name}", low=0, high=1, optional=True))
    errors.append(_number(cfg, "method.queue_size", low=1, integer=True, optional=True))
    if OmegaConf.select(cfg, "method.momentum_schedule", default=None) is not None:
        errors.append(_choice(cfg, "method.momentum_schedule", ("constant", "cosine")))
    return errors


def _class_errors(cfg: DictConfig) -> list[ConfigError | None]:
    """Each `_target_` must import; the class then checks its own settings against the rest of the job
    (W-MSE's sub-batch size, an add-on's fields): the core knows no method's or paper's fields."""
    errors: list[ConfigError | None] = []
    for group in ("method", "backbone", "weighting", "positives"):
        target = OmegaConf.select(cfg, f"{group}._target_", default=None)
        if group in ("weighting", "positives") and target is None:  # optional add-ons
            continue
        try:
            found_class = import_target(str(target))
        except (ImportError, AttributeError, ValueError):
            errors.append(ConfigError(f"{group}._target_", target, f"an importable class path for the {group}"))
        else:
            errors.extend(getattr(found_class, "check_config", lambda _: [])(cfg))
            if group == "method" and cfg.get("augment") is not None:
                from harness.core.method import multi_crop_errors

                errors.extend(multi_crop_errors(cfg, found_class))
    return errors


def _device_errors(cfg: DictConfig) -> list[ConfigError | None]:
    """dataset.residency's value, and a CUDA device asked for on a machine without one."""
    errors: list[ConfigError | None] = []
    if OmegaConf.select(cfg, "dataset.residency", default=None) is not None:
        from harness.core.data.residency import RESIDENCIES

        errors.append(_choice(cfg, "dataset.residency", RESIDENCIES))
    if cfg.trainer.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            errors.append(ConfigError("trainer.device", "cuda", "auto or cpu: this machine has no CUDA device"))
    return errors


def _data_errors(cfg: DictConfig, found: list[ConfigError]) -> list[ConfigError]:
    """Sizes against the images there are (known, cached or listed counts), once each size is sane, then
    the memory budget of a config that is otherwise sound: all before anything loads."""
    if any(f == "dataset.name" for e in found for f, _, _ in e.problems):
        return []
    from harness.core.data.datasets import resolve_source, size_errors

    more: list[ConfigError] = []
    try:
        resolve_source(cfg.dataset)
        if not any(f in SIZE_FIELDS for e in found for f, _, _ in e.problems):
            more += size_errors(cfg.dataset, int(cfg.trainer.batch_size))
            if not found and not more:
                from harness.core.data.datasets import split_counts
                from harness.core.data.residency import memory_errors

                more += memory_errors(cfg, split_counts(cfg.dataset), addon_classes(cfg))
    except ConfigError as e:
        more.append(e)
    return more


def validate(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every problem in `cfg`, or return if there is none."""
    errors = _field_errors(cfg) + _storage_errors(cfg) + _dataset_extras_errors(cfg)
    errors += loggers.config_errors(cfg)  # optional TensorBoard / W&B views of the metrics
    from harness.core.data import encoded

    errors += encoded.config_errors(cfg)  # dataset.store=encoded and its options
    errors += _linear_probe_errors(cfg) + _protocol_and_method_errors(cfg) + _class_errors(cfg) + _device_errors(cfg)
    found = [e for e in errors if e is not None]
    found += _data_errors(cfg, found)
    if found:
        raise ConfigError(*found[0].problems[0], more=found[1:])


def compose(overrides: list[str] | tuple[str, ...] = (), config_dirs: list[Path] | tuple[Path, ...] = (),
            with_hydra: bool = False) -> DictConfig:
    """The job config `python -m harness OVERRIDES` would run, composed without running it (`config_dirs`:
    its `--config-dir` folders; `with_hydra`: keep the `hydra` node, e.g. a preset's sweeper params)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from harness.jobs.sweeps import register_sweeps

    register_sweeps()
    conf_dir = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides) + searchpath_overrides(config_dirs),
                             return_hydra_config=with_hydra)


def searchpath_overrides(config_dirs: Sequence[Path | str]) -> list[str]:
    """The override that adds `--config-dir` folders to Hydra's search path (none without folders)."""
    if not config_dirs:
        return []
    return [f"hydra.searchpath=[{','.join('file://' + str(Path(d).absolute()) for d in config_dirs)}]"]


def refuse_unknown(argv: list[str]) -> None:
    """Raise for an unknown option of a config group (ConfigError naming each) or a key no config has
    (ValueError, one line per key naming the closest one), before anything is composed: what
    `python -m harness` and `prune --keep` refuse in one line each."""
    from harness.jobs.sweeps import split_argv, unknown_options

    overrides, config_dirs = split_argv(argv)
    unknown = unknown_options(overrides, config_dirs)
    if unknown:
        raise ConfigError(*unknown[0], more=[ConfigError(*p) for p in unknown[1:]])
    mistyped = mistyped_keys(overrides, config_dirs)
    if mistyped:
        raise ValueError("\n".join(mistyped))


def mistyped_keys(overrides: list[str], config_dirs: list[Path] | tuple[Path, ...] = ()) -> list[str]:
    """One line per `a.b=value` override whose key the composed config does not have, naming the closest
    key that exists (`trainer.epoch=3` -> did you mean trainer.epochs?). Hydra would refuse the same
    key in seven lines; this says it in one, before anything loads.

    Keys under a group the command (or its sweep preset) sweeps over several options are not checked:
    another option may define them. `+key=value` adds a key on purpose and is left to Hydra.
    """
    import difflib

    chosen, swept, keys = group_choices(overrides, config_dirs)
    if not keys:
        return []
    composed = composed_keys(chosen, config_dirs)
    if composed is None:  # a command Hydra cannot compose: Hydra's own run says why
        return []
    known, params, _ = composed
    swept |= {k.split(".")[0] for k in params}
    lines = []
    for key, value in keys:
        if key.split(".")[0] in swept or key in known:
            continue
        close = difflib.get_close_matches(key, [k for k in known if not k.startswith("hydra.")], n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "see `python -m harness --cfg job` for every key"
        lines.append(f"{key}={value}: {key} is not a config key; {hint}")
    return lines


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    """Every key of a nested config as a dotted name (groups, leaves, and list items by index)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    out = []
    for k, v in items:
        name = f"{prefix}{k}"
        out.append(name)
        out += _dotted_keys(v, name + ".")
    return out


def config_files_fingerprint(config_dirs: Sequence[Path] = ()) -> str:
    """A hash of what composing reads: every config file's path, size and time (harness/conf, the sweep
    presets, `--config-dir` folders, our Hydra plugins) and the versions of Hydra and its launcher."""
    from importlib import metadata

    from harness.jobs.sweeps import CONF, sweep_folders

    plugins = Path(__file__).resolve().parents[2] / "hydra_plugins"
    digest = hashlib.sha256()
    for root in (CONF, *sweep_folders(), plugins, *config_dirs):
        for path in sorted(Path(root).rglob("*")) if Path(root).is_dir() else []:
            if path.suffix in (".yaml", ".yml", ".py"):
                stat = path.stat()
                digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    for package in ("hydra-core", "hydra-submitit-launcher", "omegaconf"):
        try:
            digest.update(f"{package}={metadata.version(package)}\n".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{package}=none\n".encode())
    return digest.hexdigest()[:20]


def composed_keys(chosen: list[str], config_dirs: Sequence[Path] = ()) -> tuple[set[str], list[str], str | None] | None:
    """(every dotted key, the sweeper's swept keys, hydra.mode) of the config the group choices `chosen`
    compose, or None when Hydra cannot compose it. Composing costs about 0.4 s per command, so these are
    kept in $HARNESS_CACHE/config-keys under the choices and the config files' fingerprint: a changed
    file or package composes again."""
    from harness.atomic import write_text_atomic
    from harness.store import harness_cache

    name = hashlib.sha256(json.dumps([chosen, [str(Path(d).absolute()) for d in config_dirs],
                                      config_files_fingerprint(config_dirs)]).encode()).hexdigest()[:24]
    cached = harness_cache() / "config-keys" / f"{name}.json"
    try:
        known, params, mode = json.loads(cached.read_text())
        return set(known), list(params), mode
    except (OSError, ValueError, TypeError):  # not cached yet, or a torn or foreign file: compose
        pass
    try:
        cfg = compose(chosen, config_dirs, with_hydra=True)
    except Exception:  # noqa: BLE001 - Hydra's own run says why
        return None
    known = _dotted_keys(OmegaConf.to_container(cfg, resolve=False))
    params = [str(k) for k in (OmegaConf.select(cfg, "hydra.sweeper.params") or {})]
    mode = None if cfg.hydra.mode is None else str(cfg.hydra.mode.name)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cached, json.dumps([known, params, mode]))
    except OSError:  # a read-only cache: compose each time
        pass
    return set(known), params, mode


def group_choices(overrides: list[str], config_dirs: Sequence[Path] = ()) -> tuple[list[str], set[str], list]:
    """(the group overrides that pick one option, the groups swept over several, the other `key=value`
    pairs) of a command's overrides; `+`, `~` and `hydra...` overrides are in none of them."""
    from harness.jobs.sweeps import group_options

    groups = group_options(config_dirs)
    chosen, swept, keys = [], set(), []
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or key.startswith(("+", "~", "hydra")):
            continue
        if key in groups:
            if any(c in value for c in ",()["):
                swept.add(key)
            else:
                chosen.append(override)
        else:
            keys.append((key, value))
    return chosen, swept, keys


def hydra_mode(overrides: list[str], config_dirs: Sequence[Path] = ()) -> tuple[str | None] | None:
    """The config's hydra.mode as Hydra's get_mode reads it before a run (wrapped in a tuple; None when
    it cannot be told without Hydra: an override names hydra.mode, or the config does not compose)."""
    if any(o.lstrip("+~").startswith("hydra.mode") for o in overrides):
        return None
    composed = composed_keys(group_choices(overrides, config_dirs)[0], config_dirs)
    return None if composed is None else (composed[2],)


def build_addons(cfg: DictConfig, feat_dim: int | None = None) -> list:
    """The add-ons a job's config asks for (hooks: harness/core/addons.py): `_target_` entries of
    weighting and positives, and the online linear classifier when ``eval.online_linear`` (it needs
    the backbone's `feat_dim`)."""
    from harness.core.evaluate import OnlineLinear

    found = []
    for group in ("weighting", "positives"):
        node = cfg.get(group)
        if node is not None and node.get("_target_"):
            found.append(instantiate(node, cfg))
    if cfg.get("eval") is not None and cfg.eval.get("online_linear"):
        found.append(OnlineLinear(cfg, feat_dim))
    return found


def addon_classes(cfg: DictConfig) -> list[type]:
    """The classes of the add-ons `cfg` configures (weighting, positives), not built: for their class
    hooks (``check_config``, ``stages``)."""
    return [import_target(str(cfg[group]._target_)) for group in ("weighting", "positives")
            if cfg.get(group) is not None and cfg[group].get("_target_")]
