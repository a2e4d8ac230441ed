"""``python -m harness [overrides]`` runs one job; ``-m`` runs a sweep (see README)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from harness.jobs.sweeps import register_sweeps

register_sweeps()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from harness.errors import ConfigError
    from harness.jobs.run import RunFailed, run

    try:
        return run(cfg)
    except ConfigError as e:
        # Refuse bad input with one clear message, not a traceback; nothing was trained.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunFailed as e:
        print(e, file=sys.stderr)  # one line that names the cause; the run row says failed
        sys.exit(1)


if __name__ == "__main__":
    main()
