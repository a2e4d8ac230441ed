"""The job's side of a tuned sweep: report each epoch's k-NN to its Optuna trial, stop when pruned.

The sweeper (hydra_plugins/harness_optuna_sweeper) passes `+optuna.journal=PATH
+optuna.study=NAME +optuna.trial=NUMBER` to every trial's job; the study lives in a journal file
next to the store, `<store.path>.optuna/<study>.log`, which works on cluster file systems and is
read by the leaderboard for study history. Jobs of other sweeps have no `optuna` node and report
nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


class Pruned(Exception):
    """Optuna's pruner stopped this trial early; `value` is its last k-NN top-1."""

    def __init__(self, message: str, value: float):
        super().__init__(message)
        self.value = value


def journal_path(store_path: str | Path, study: str) -> Path:
    """Where a study's journal lives: beside the results store, one file per study."""
    store = Path(store_path).expanduser().absolute()
    return store.with_name(store.name + ".optuna") / f"{study}.log"


def storage(path: str | Path) -> Any:
    import optuna

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def pruner(kind: str = "median", percentile: float = 50.0, n_startup_trials: int = 2, n_warmup_steps: int = 1) -> Any:
    """The pruner of a tuned sweep. The study's storage does not keep it, so the sweeper passes
    these settings to every job, which builds the same pruner to answer should_prune()."""
    import optuna

    if kind == "none":
        return optuna.pruners.NopPruner()
    # median keeps the top 50% at each epoch; a lower percentile keeps fewer (prunes more eagerly).
    return optuna.pruners.PercentilePruner(50.0 if kind == "median" else float(percentile),
                                           n_startup_trials=int(n_startup_trials), n_warmup_steps=int(n_warmup_steps))


def open_trial(cfg: DictConfig) -> Any | None:
    """The Optuna trial this job runs, or None outside a tuned sweep."""
    spec = OmegaConf.select(cfg, "optuna", default=None)
    if not spec or spec.get("trial") is None:
        return None
    import optuna

    settings = {k: spec[k] for k in ("kind", "percentile", "n_startup_trials", "n_warmup_steps") if k in spec}
    study = optuna.load_study(study_name=str(spec.study), storage=storage(spec.journal), pruner=pruner(**settings))
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, int(spec.trial))
    return optuna.trial.Trial(study, trial_id)


def should_prune(trial: Any | None, epoch: int, knn_top1: float) -> bool:
    """Report this epoch's k-NN top-1 (the objective, on the validation split) and ask the pruner."""
    if trial is None:
        return False
    try:
        trial.report(float(knn_top1), step=epoch)
        return bool(trial.should_prune())
    except Exception as e:  # noqa: BLE001 - e.g. a restarted driver already closed this trial: keep training
        print(f"[harness] could not report to Optuna trial {trial.number}: {e}", flush=True)
        return False


def tell(study: Any, number: int, value: float | None = None, state: Any = None) -> None:
    """study.tell outside study.optimize.

    Optuna's GridSampler calls study.stop() once the grid is used up, which raises outside
    optimize(); the trial's state was stored before that (in a finally), so that error is moot here.
    """
    try:
        study.tell(number, value, state=state)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise


def mark_pruned(trial: Any | None) -> None:
    """Tell the study the trial was pruned (the sweeper sees it finished and leaves it be)."""
    if trial is None:
        return
    import optuna

    tell(trial.study, trial.number, state=optuna.trial.TrialState.PRUNED)
