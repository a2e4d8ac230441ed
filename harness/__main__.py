"""``python -m harness [overrides]`` runs one job; ``-m`` runs a sweep (see README). ``dry_run=true`` checks
the job (or every point of the sweep) and prints what would run, running nothing."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from harness.jobs.sweeps import register_sweeps

register_sweeps()

PREVIEWED = ("method.name", "dataset.name", "backbone.name", "seed", "trainer.epochs")  # what a dry run names


def refuse_unknown_options(argv: list[str]) -> None:
    """An unknown option of a config group (method=nosuch) or a key no config has (trainer.epoch=3): one
    line per problem and exit 2, like every other bad value, before Hydra composes anything. Options
    and groups of `--config-dir` folders count."""
    from harness.errors import ConfigError
    from harness.jobs.config import refuse_unknown

    try:
        refuse_unknown(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ValueError as e:  # mistyped keys, one line each
        print("\n".join(f"error: invalid config: {line}" for line in str(e).splitlines()), file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from harness.errors import ConfigError
    from harness.jobs.run import RunFailed, run
    from harness.store import quiet_broken_pipe

    try:
        if cfg.get("dry_run"):
            return quiet_broken_pipe(lambda: preview(cfg))  # `| head` ends quietly
        return run(cfg)
    except ConfigError as e:
        # Refuse bad input with one clear message, not a traceback; nothing was trained.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunFailed as e:
        print(e, file=sys.stderr)  # one line that names the cause; the run row says failed
        sys.exit(1)


def preview(cfg: DictConfig) -> None:
    """dry_run=true for one job: the checks a run makes first, then its run key and what a run would do."""
    from harness.jobs.config import run_key, validate
    from harness.store import Store, read_done

    validate(cfg)
    key = run_key(cfg)
    done = read_done(Store(cfg.store.path, cfg.store.get("runs_dir")).runs / key) and not cfg.force
    print(f"dry run: the config is valid; run key {key} would {'be skipped (already completed)' if done else 'run'}"
          f" ({' '.join(f'{k}={OmegaConf.select(cfg, k)}' for k in PREVIEWED)}); nothing was run."
          " Drop dry_run=true to run it.")


def mode_from_the_key_check(argv: list[str]) -> None:
    """Before a run Hydra composes the whole config only to read `hydra.mode`, then composes it again to
    run it (0.35 s of every command). The key check's cached composition (refuse_unknown_options) knows
    the mode, so Hydra is given it; where it cannot tell (`hydra.mode` on the command line, another
    `--config-name`, a config that does not compose) Hydra reads it itself."""
    from hydra._internal.hydra import Hydra
    from hydra.types import RunMode

    from harness.jobs.config import hydra_mode
    from harness.jobs.sweeps import split_argv

    if any(a.startswith(("--config-name", "-cn", "--config-path", "-cp")) for a in argv):
        return
    overrides, config_dirs = split_argv(argv)
    known = hydra_mode(overrides, config_dirs)
    if known is not None:
        mode = None if known[0] is None else RunMode[known[0]]
        Hydra.get_mode = lambda self, config_name, overrides: mode


if __name__ == "__main__":
    from harness.store import quiet_broken_pipe

    refuse_unknown_options(sys.argv[1:])
    mode_from_the_key_check(sys.argv[1:])
    quiet_broken_pipe(main)
