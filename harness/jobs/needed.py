"""What the sweeps a lab still runs need on disk: every artifact and data cache file of their points.

``python -m harness.store prune --keep 'OVERRIDES'`` runs this module in a process of its own to learn
which artifacts and decoded datasets it must not delete. Its own process, because composing a sweep
takes Hydra, the config code and the add-on classes (torch): the store module, which the leaderboard
imports, imports none of them (tests/test_import_graph.py), and it only reads the paths printed here.

A kept sweep is given exactly as it is run, ``python -m harness OVERRIDES -m``: its points are composed
by the code the launchers run (harness/jobs/sweeps.py ``compose_sweep_points``, with a preset's listed
points and its random-init floor), and each point's stages (harness/jobs/stages.py ``stages_of``: the
dataset's cache file, each add-on's artifact) name what it needs. Every point counts, completed or
not: running the sweep again builds its stages before it skips the completed points.

A tuned sweep (hydra.sweeper other than Hydra's grid) has no list of points: Optuna draws them as it
runs. Its points are probed as its sweeper checks them before the first trial: the fixed values with
each choice of a categorical parameter and each end of an interval. When an interval's two ends need
different artifacts (the parameter shapes one), every artifact of that kind is kept.

    python -m harness.jobs.needed --db outputs/results.duckdb --keep 'sweep=scorecl_all' --keep 'sweep=smoke'

prints JSON: {"needed": [paths], "keeps": [{"keep", "points", "needed"}, ...]}; a --keep that does not compose
ends in one ``error:`` line naming it, exit 2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from harness.errors import ConfigError

GRID_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
MULTIRUN_FLAGS = ("-m", "--multirun")  # a kept command copied with its flag: every --keep is a sweep here


def keep_argv(text: str) -> list[str]:
    """The command-line arguments of one --keep (shell quoting as a shell reads it), without `-m`."""
    return [arg for arg in shlex.split(text) if arg not in MULTIRUN_FLAGS]


def _probes(overrides: list[Any]) -> tuple[list[list[str]], list[tuple[int, int]]]:
    """A tuned sweep's probe points from its parsed params and command-line overrides (the last value of
    a key wins, as the sweeper reads them): the fixed overrides alone, or with each categorical value and
    each interval end. Also the index pairs of the points at an interval's two ends."""
    from hydra.core.override_parser.types import IntervalSweep

    last = {o.get_key_element(): o for o in overrides}
    fixed = [o.input_line for o in last.values() if not o.is_sweep_override()]
    points: list[list[str]] = []
    spans: list[tuple[int, int]] = []
    for key, override in last.items():
        if not override.is_sweep_override():
            continue
        value = override.value()
        if isinstance(value, IntervalSweep):
            spans.append((len(points), len(points) + 1))
            points += [[*fixed, f"{key}={value.start}"], [*fixed, f"{key}={value.end}"]]
        else:
            points += [[*fixed, f"{key}={v}"] for v in override.sweep_string_iterator()]
    return points or [fixed], spans


def sweep_configs(argv: list[str]) -> tuple[list[DictConfig], list[tuple[int, int]]]:
    """The job configs of every point `python -m harness ARGV -m` would run (a grid's every point, a
    preset's listed and floor points), composed and not validated or run; and, for a tuned sweep, the
    index pairs of the points at an interval parameter's two ends (see the module's docstring).

    Unchecked: the caller refuses unknown options and keys first (harness.jobs.config.refuse_unknown);
    raises Hydra's own error for anything else it cannot compose."""
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from harness.jobs.config import searchpath_overrides
    from harness.jobs.sweeps import CONF, compose_sweep_points, register_sweeps, split_argv, with_floor_points

    overrides, config_dirs = split_argv(argv)
    register_sweeps()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("config", overrides + searchpath_overrides(config_dirs), RunMode.MULTIRUN)
        params = OmegaConf.select(master, "hydra.sweeper.params", default=None) or {}
        # As the sweeper reads them: the preset's params first, then the command line's overrides.
        lines = [f"{k}={v}" for k, v in params.items()] + list(master.hydra.overrides.task)
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(lines)
        if OmegaConf.select(master, "hydra.sweeper._target_") == GRID_SWEEPER:
            job_overrides, spans = BasicSweeper.split_arguments(parsed, None)[0], []
        else:
            job_overrides, spans = _probes(parsed)
        points, own = with_floor_points(master, job_overrides)
        # An interval's two ends may each gain preset points: pair them up point by point.
        per = len(points[:own]) // max(len(job_overrides), 1)
        spans = [(a * per + i, b * per + i) for a, b in spans for i in range(per)]
        return compose_sweep_points(loader, master, points, config_dirs), spans


def needed_paths(argv: list[str]) -> tuple[list[Path], int]:
    """The artifacts and data cache files the points of sweep `argv` need (see the module's docstring),
    and how many points it has: each stage's key as a path; a folder that holds every artifact of a kind
    when a tuned parameter shapes that artifact."""
    from harness.jobs.stages import stages_of

    configs, spans = sweep_configs(argv)
    keys = [[stage.key for stage in stages_of(cfg)] for cfg in configs]
    found = {_key_path(key) for point in keys for key in point}
    for a, b in spans:
        for key in set(keys[a]) ^ set(keys[b]):  # this stage's artifact depends on the searched value
            found.add(_key_path(key).parent)
    return sorted(p for p in found if p is not None), len(configs)


def _key_path(key: str) -> Path | None:
    # The dataset stage's key is `dataset:<cache file>`, or `dataset:<hash>` while a download still has to
    # fetch the files (no file yet: nothing to keep); an add-on stage's key is its artifact's path.
    path = key.removeprefix("dataset:")
    return Path(path) if Path(path).is_absolute() else None


def _refused(text: str, e: Exception) -> int:
    """One line naming the --keep and what is wrong with it; exit status 2."""
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, ConfigError):
        message = message.removeprefix("invalid config: ")
    print(f"error: --keep {text!r}: {message}; nothing was deleted", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.jobs.needed",
                                     description="The artifacts and data cache files the points of the given "
                                     "sweeps need, as JSON (what `python -m harness.store prune --keep` keeps).")
    parser.add_argument("--keep", action="append", required=True, metavar="OVERRIDES",
                        help="one sweep as `python -m harness OVERRIDES -m` runs it, quoted; repeatable")
    parser.add_argument("--db", type=Path, default=None, help="the store: its path goes first (store.path)")
    parser.add_argument("--artifacts", type=Path, default=None, help="artifacts.dir, first")
    parser.add_argument("--cache", type=Path, default=None, help="dataset.cache_dir, first")
    args = parser.parse_args(argv)
    # The store being pruned: its artifacts sit beside it unless a point says otherwise. A --keep's own
    # values come later, and Hydra takes the last value of a key.
    first = [f"{key}={path.expanduser().absolute()}" for key, path in
             (("store.path", args.db), ("artifacts.dir", args.artifacts), ("dataset.cache_dir", args.cache))
             if path is not None]
    # Every --keep's options and keys first (a second each), then the compositions: a typo is refused at once.
    from harness.jobs.config import refuse_unknown

    for text in args.keep:
        try:
            if not keep_argv(text):
                raise ValueError("empty: expected one sweep's overrides as `python -m harness OVERRIDES -m` takes them")
            refuse_unknown(keep_argv(text))
        except Exception as e:  # noqa: BLE001 - reported in one line
            return _refused(text, e)
    needed: set[Path] = set()
    keeps = []
    for text in args.keep:
        try:
            paths, points = needed_paths(first + keep_argv(text))
        except Exception as e:  # noqa: BLE001 - whatever stops the composition is reported in one line
            return _refused(text, e)
        needed.update(paths)
        keeps.append({"keep": text, "points": points, "needed": [str(p) for p in paths]})
    print(json.dumps({"needed": sorted(str(p) for p in needed), "keeps": keeps}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
