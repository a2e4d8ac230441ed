"""Shared test helpers: the real CIFAR-10 archive, and running the harness as a user does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.core.data.workers import usable_cores

REPO = Path(__file__).resolve().parents[1]

# Under pytest-xdist the workers share the cores: each worker's torch, and each job it starts, gets its
# share of them. Two workers with two threads each on two cores spin against each other (torch's
# threads wait busily): the learning check's fixture took 674 s instead of 143.
THREADS = max(1, usable_cores() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


def cifar_archive() -> Path | None:
    from harness.core.data.datasets import default_archive

    archive = default_archive()
    return archive if archive is not None and archive.exists() else None


# Tests on the real CIFAR-10 carry this mark. Without the archive they skip on a developer's
# machine but FAIL under CI (CI=true): CI is where the archive must be, and a green run that
# skipped them would prove nothing.
requires_cifar = pytest.mark.requires_cifar
NO_CIFAR = "the real CIFAR-10 archive (../shared/data/cifar10-jpeg.tar.xz or $HARNESS_CIFAR10_ARCHIVE) is absent"


def _without_cifar() -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{NO_CIFAR}, and CI must have it", pytrace=False)
    pytest.skip(NO_CIFAR)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("requires_cifar") and cifar_archive() is None:
        _without_cifar()


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(THREADS)  # in case torch was imported before OMP_NUM_THREADS was set above


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with Slurm tests first, then files by how many slow tests they hold, most first, each file's
    tests in their own order. pytest-xdist (`--dist loadfile --no-loadscope-reorder`) hands out files in
    this order as workers come free, so the long files start early and the run does not end waiting on
    one of them.
    """
    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    slurm = {module(item) for item in items if item.get_closest_marker("slurm")}
    slow: dict[str, int] = {}
    for item in items:
        slow[module(item)] = slow.get(module(item), 0) + bool(item.get_closest_marker("slow"))
    items.sort(key=lambda item: (module(item) not in slurm, -slow[module(item)]))  # stable: files keep their order


def harness_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", str(THREADS))
    env.update(extra)
    return env


def run_harness(*overrides: str, timeout: float = 900, check: bool = True, **popen) -> subprocess.CompletedProcess:
    """`python -m harness OVERRIDES` in a subprocess, as a user runs it; output captured."""
    proc = subprocess.run([sys.executable, "-m", "harness", *overrides], cwd=popen.pop("cwd", REPO),
                          env=harness_env(), capture_output=True, text=True, timeout=timeout, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"harness failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


TINY = ("backbone=convnet", "dataset.train_size=1000", "dataset.test_size=200", "trainer.batch_size=128",
        "trainer.warmup_epochs=0", "eval.every=1", "hydra.run.dir=${store.path}.hydra/${now:%H-%M-%S-%f}")


@pytest.fixture(scope="session")
def cifar10_cached():
    """Decode the real CIFAR-10 once for the session (later loads come from the tensor cache)."""
    if cifar_archive() is None:
        _without_cifar()
    from omegaconf import OmegaConf

    from harness.core.data.datasets import load_full

    return load_full(OmegaConf.create({"name": "cifar10", "archive": "auto", "root": None, "download": False}))


class Holder:
    """Another process holding the DuckDB file open read-write (a user's duckdb shell, say)."""

    def __init__(self, db: Path):
        code = ("import duckdb, sys; con = duckdb.connect(sys.argv[1]); print('held', flush=True); "
                "sys.stdin.read(); con.close()")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(db)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def release(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0
