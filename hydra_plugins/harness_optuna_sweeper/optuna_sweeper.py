"""A Hydra sweeper over Optuna's ask/tell API (hydra-optuna-sweeper still pins optuna < 3).

Select it with `override /hydra/sweeper: harness_optuna` in a sweep preset (see sweeps/tune_simclr.yaml).
Each batch asks Optuna for `n_jobs` trials, launches them through the configured launcher (local
or Slurm), and tells Optuna their objective: k-NN top-1 on the validation split, as `run()`
returns it. The study lives in a journal file beside the store
(`<store.path>.optuna/<study_name>.log`), so a driver that dies can be started again with the
same command: trials it left running are launched again under their own numbers (a job that did
finish is skipped by its run key and returns its stored objective), then the study continues
until it holds `n_trials` trials. Jobs report every evaluated epoch to their trial and stop when
the pruner says so (harness/jobs/tuning.py); such a trial is PRUNED in the study and `pruned` in the
store.

Search space, `params: {config.key: spec}` in Hydra's override syntax:
  `choice(a, b, c)` or `a,b,c`  categorical        `range(1, 10)`  categorical over the range
  `interval(lo, hi)`           uniform float/int   `tag(log, interval(lo, hi))`  log-uniform
Grid sampling takes only choice/range parameters and runs the whole grid at most once.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "grid", "random")
PRUNERS = ("median", "percentile", "none")


def _fail(message: str) -> None:
    print(f"error: tuned sweep refused, nothing was run or submitted: {message}", file=sys.stderr)
    sys.exit(2)


def distribution(override: Override) -> Any:
    """An Optuna distribution for one sweep override."""
    import optuna.distributions as d

    value = override.value()
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return d.IntDistribution(value.start, value.end, log=log_scale)
        return d.FloatDistribution(float(value.start), float(value.end), log=log_scale)
    if isinstance(value, (ChoiceSweep, RangeSweep)):
        return d.CategoricalDistribution(list(override.sweep_iterator()))
    raise ValueError(f"{override.get_key_element()}: {override.input_line!r} is not choice/range/interval")


class OptunaSweeper(Sweeper):
    def __init__(self, study_name: str, storage: str | None, sampler: str, seed: int, direction: str,
                 n_trials: int, n_jobs: int, pruner: str, n_startup_trials: int, n_warmup_steps: int,
                 params: dict[str, str] | None, percentile: float = 50.0) -> None:
        self.study_name = study_name
        self.storage = storage
        self.sampler = sampler
        self.seed = seed
        self.direction = direction
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.pruner = pruner
        self.n_startup_trials = n_startup_trials
        self.n_warmup_steps = n_warmup_steps
        self.percentile = percentile
        self._pruning = {"kind": pruner, "percentile": percentile, "n_startup_trials": n_startup_trials,
                         "n_warmup_steps": n_warmup_steps}
        self.params = dict(params or {})
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context = None
        self._journal = ""

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    # ------------------------------------------------------------------------------------ set-up
    def _space(self, arguments: list[str]) -> tuple[list[str], dict[str, Any], dict[str, list]]:
        """(fixed overrides, distributions, grid values) from the preset's params and the command line."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        lines = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        fixed, space, grid = [], {}, {}
        # The command line comes last and wins over the preset's params for the same key.
        last = {o.get_key_element(): o for o in parser.parse_overrides(lines)}
        for override in last.values():
            if not override.is_sweep_override():
                fixed.append(override.input_line)
                continue
            name = override.get_key_element()
            try:
                space[name] = distribution(override)
            except ValueError as e:
                _fail(str(e))
            if override.is_discrete_sweep():
                grid[name] = list(override.sweep_iterator())
        if not space:
            _fail("no parameter to tune: give hydra.sweeper.params, e.g. {trainer.lr: tag(log, interval(0.01, 1))}")
        return fixed, space, grid

    def _check(self, grid: dict[str, list], space: dict[str, Any]) -> None:
        problems = []
        if self.sampler not in SAMPLERS:
            problems.append(f"hydra.sweeper.sampler = {self.sampler!r}: expected one of {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            problems.append(f"hydra.sweeper.pruner = {self.pruner!r}: expected one of {', '.join(PRUNERS)}")
        if self.direction not in ("maximize", "minimize"):
            problems.append(f"hydra.sweeper.direction = {self.direction!r}: expected maximize or minimize")
        for name in ("n_trials", "n_jobs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"hydra.sweeper.{name} = {getattr(self, name)!r}: expected an integer >= 1")
        if self.sampler == "grid" and set(grid) != set(space):
            intervals = sorted(set(space) - set(grid))
            problems.append(f"grid sampling needs choice/range values; intervals given for {intervals}")
        if problems:
            _fail("\n  " + "\n  ".join(problems))

    def _refuse_bad_values(self, fixed: list[str], space: dict[str, Any]) -> None:
        """Compose and validate each parameter's extreme values before the first trial runs."""
        import optuna.distributions as d

        from hydra_plugins.harness_launchers.launchers import compose_points, refuse_bad_points

        def candidates(dist: Any) -> list:
            if isinstance(dist, d.CategoricalDistribution):
                return list(dist.choices)
            return [dist.low, dist.high]

        probes = [fixed + [f"{name}={value}"] for name, dist in space.items() for value in candidates(dist)]
        refuse_bad_points(compose_points(self, probes), probes)

    def _study(self, grid: dict[str, list]) -> Any:
        import optuna

        from harness.jobs import tuning

        path = self.storage or str(tuning.journal_path(self.config.store.path, self.study_name))
        # A resumed study must not draw the same random startup points again: offset the seed by
        # the trials already in it (filled in below, once the study is open).
        samplers = {
            "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed),
            "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
            "grid": lambda seed: optuna.samplers.GridSampler(grid, seed=self.seed),
        }
        pruner = tuning.pruner(**self._pruning)
        study = optuna.create_study(study_name=self.study_name, storage=tuning.storage(path),
                                    sampler=samplers[self.sampler](self.seed), pruner=pruner,
                                    direction=self.direction, load_if_exists=True)
        study.sampler = samplers[self.sampler](self.seed + len(study.trials))
        print(f"Optuna study {self.study_name!r} in {path}: {len(study.trials)} trial(s) so far", file=sys.stderr)
        self._journal = path
        return study

    # ------------------------------------------------------------------------------------ the loop
    def sweep(self, arguments: list[str]) -> Any:
        import optuna
        from optuna.trial import TrialState

        fixed, space, grid = self._space(arguments)
        self._check(grid, space)
        self._refuse_bad_values(fixed, space)
        if self.config is not None and self.config.get("dry_run"):
            # Optuna picks each trial's values from the ones before it: there is no list of points to show.
            print(f"Tuned sweep preview (dry_run=true): the search space ({', '.join(space) or 'none'}) and the fixed "
                  "values are valid; Optuna chooses the points as the sweep runs, so none are listed. Nothing was "
                  "run and no study was written.")
            return []
        study = self._study(grid)
        n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values())) if self.sampler == "grid" \
            else self.n_trials

        # Trials a dead driver left running: run them again under their own numbers first.
        leftover = [optuna.trial.Trial(study, t._trial_id) for t in study.get_trials(deepcopy=False)
                    if t.state == TrialState.RUNNING]
        if leftover:
            print(f"continuing {len(leftover)} trial(s) a previous driver left running: "
                  f"{[t.number for t in leftover]}", file=sys.stderr)
        job_idx = 0
        while True:
            batch = leftover[:self.n_jobs]
            leftover = leftover[self.n_jobs:]
            if not batch:
                want = n_trials - len(study.get_trials(deepcopy=False))
                batch = [study.ask(space) for _ in range(min(self.n_jobs, want))]
            if not batch:
                break
            overrides = [self._overrides(fixed, trial) for trial in batch]
            returns = self.launcher.launch(overrides, initial_job_idx=job_idx)
            job_idx += len(batch)
            for trial, ret in zip(batch, returns):
                self._tell(study, trial, ret.return_value)
        self._report(study)
        return study

    def _overrides(self, fixed: Sequence[str], trial: Any) -> list[str]:
        # Values from `params` of a resumed trial (asked by an earlier driver) or of a new one.
        values = trial.params
        return [*fixed, *(f"{k}={v}" for k, v in values.items()), f"+optuna.journal={self._journal}",
                f"+optuna.study={self.study_name}", f"+optuna.trial={trial.number}",
                *(f"+optuna.{k}={v}" for k, v in self._pruning.items())]

    @staticmethod
    def _tell(study: Any, trial: Any, value: Any) -> None:
        from optuna.trial import TrialState

        from harness.jobs.tuning import tell

        state = study._storage.get_trial(trial._trial_id).state
        if state.is_finished():  # the job told the study itself (pruned)
            return
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            tell(study, trial.number, state=TrialState.FAIL)
        else:
            tell(study, trial.number, float(value))

    def _report(self, study: Any) -> None:
        from optuna.trial import TrialState

        counts = {s.name.lower(): 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        for t in study.get_trials(deepcopy=False):
            counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
        text = ", ".join(f"{n} {k}" for k, n in counts.items())
        print(f"\nOptuna study {self.study_name!r}: {len(study.trials)} trial(s) ({text}); journal {self._journal}",
              file=sys.stderr)
        try:
            best = study.best_trial
            print(f"  best: trial {best.number}, objective {best.value:.2f}, params {best.params}", file=sys.stderr)
        except ValueError:
            print("  no completed trial yet", file=sys.stderr)

