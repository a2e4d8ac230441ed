"""Real faults against a real run (python -m harness, real CIFAR-10, DuckDB): SIGKILL at random
points, a cut-short, empty or hostile checkpoint.pt, a full disk."""

from __future__ import annotations

import random
import re
import resource
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from harness.store import Store
from tests.conftest import TINY, requires_cifar, run_harness
from tests.events import signal_at_line
from tests.fs_utils import small_file_system

pytestmark = [requires_cifar, pytest.mark.slow]

ARGS = (*TINY, "dataset.train_size=500", "trainer.epochs=3", "trainer.log_every=0",
        "store.keep_checkpoints=all")  # keep_checkpoints=all: the tests copy, damage and read its checkpoints


# What an attempt prints as it goes (trainer.log_every=0: a line at every sync point): a step's line, an
# epoch's end (its checkpoint is written just before), the resume. The kills land after these events.
EVENT = re.compile(r"^\[train\] (epoch \d+/\d+ (step \d+/\d+|done)|resumed from)")


@dataclass
class FinishedRun:
    db: Path
    folder: Path  # <store>.runs/<run key>: checkpoint.pt (epoch 3), checkpoint.prev.pt (epoch 2), run_id
    events: list[str]  # its progress lines that the kills are keyed to (EVENT), in order


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cifar10_cached) -> FinishedRun:
    """One uninterrupted 3-epoch run (seed=1): the reference the faulted runs are compared with."""
    db = tmp_path_factory.mktemp("reference") / "r.duckdb"
    done = run_harness(*ARGS, "seed=1", f"store.path={db}")
    (folder,) = Path(str(db) + ".runs").iterdir()
    return FinishedRun(db, folder, [line for line in done.stderr.splitlines() if EVENT.match(line)])


def _rows_per_epoch_and_name(store: Store, run_id: str) -> dict[tuple[int, str], int]:
    rows = store.query("SELECT epoch, name, count(*) AS n FROM metrics WHERE run_id = ? GROUP BY epoch, name",
                       [run_id])
    return {(r["epoch"], r["name"]): r["n"] for r in rows}


def _completed(store: Store) -> list[dict]:
    return store.query("SELECT run_id, run_key, status FROM runs WHERE status = 'completed'")


def test_sigkill_at_ten_random_points_then_the_same_command_completes_the_run(tmp_path, finished_run):
    """The same command again and again, each attempt SIGKILLed right after an event of its own
    progress drawn at random (the n-th step line, epoch end or resume it prints), unless it ended
    first; once a run has completed, the next attempts go to a new run (the next seed). The first kill
    lands after epoch 1's checkpoint, so a resume is certain whatever the machine's speed. After ten
    kills the last run is completed by the same command. Every run then has exactly the metrics rows
    of an uninterrupted run, one per epoch and name."""
    db = tmp_path / "r.duckdb"
    rng = random.Random(14)
    first_checkpoint = [line.startswith("[train] epoch 1/3 done") for line in finished_run.events].index(True)
    seed, kills, attempts, logs = 0, 0, 0, []
    while kills < 10:
        attempts += 1
        assert attempts <= 40, "the attempts keep ending before their kill"
        nth = first_checkpoint + 1 if attempts == 1 else rng.randint(1, len(finished_run.events))
        outcome = signal_at_line(["-m", "harness", *ARGS, f"seed={seed}", f"store.path={db}"],
                                 lambda line: EVENT.match(line) is not None, signal.SIGKILL, nth=nth)
        if outcome.returncode == -signal.SIGKILL:
            kills += 1
        else:  # it ended by itself before its n-th event: that run is complete; the next kills go to a new run
            assert outcome.returncode == 0, outcome.stderr[-3000:]
            seed += 1
        logs.append(outcome.stderr)
    logs.append(run_harness(*ARGS, f"seed={seed}", f"store.path={db}").stderr)

    assert any("resumed from" in text for text in logs), "no kill landed after a checkpoint: nothing was resumed"
    assert not any("unreadable" in text for text in logs)  # a kill never leaves a half-written checkpoint
    reference = Store(finished_run.db)
    (reference_run,) = _completed(reference)
    expected = set(_rows_per_epoch_and_name(reference, reference_run["run_id"]))
    store = Store(db)
    completed = _completed(store)
    assert len(completed) == seed + 1 == len({r["run_key"] for r in completed})
    for run in completed:
        rows = _rows_per_epoch_and_name(store, run["run_id"])
        assert set(rows) == expected and set(rows.values()) == {1}
    for folder in Path(str(db) + ".runs").iterdir():
        assert not list(folder.glob(".*.tmp"))  # the temporary files of killed writers are cleaned up
    print(f"{kills} kills over {attempts} attempts and {seed + 1} runs")


def _resume_copy(finished_run: FinishedRun, tmp_path: Path, keep_previous: bool = True) -> tuple[Path, Path]:
    """A fresh store whose run folder holds the finished run's checkpoints, as if the run had been
    killed after its last epoch's checkpoint: (store path, run folder)."""
    db = tmp_path / "r.duckdb"
    folder = Path(str(db) + ".runs") / finished_run.folder.name
    folder.mkdir(parents=True)
    for name in ("checkpoint.pt", "run_id", *(("checkpoint.prev.pt",) if keep_previous else ())):
        shutil.copy(finished_run.folder / name, folder / name)
    return db, folder


def _one_checkpoint_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "checkpoint.pt is unreadable" in line]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("damage", ["truncated", "zero bytes"])
def test_a_broken_checkpoint_falls_back_to_the_previous_one_or_starts_over(tmp_path, finished_run, damage):
    # Truncated with a previous checkpoint beside it: resume from that one (the last epoch again).
    # Zero bytes with none: start over.
    db, folder = _resume_copy(finished_run, tmp_path, keep_previous=damage == "truncated")
    checkpoint = folder / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100_000] if damage == "truncated" else b"")

    done = run_harness(*ARGS, "seed=1", f"store.path={db}")
    line = _one_checkpoint_line(done.stderr)
    assert line.startswith("[train] checkpoint.pt is unreadable (")
    if damage == "truncated":
        assert line.endswith("; resuming from checkpoint.prev.pt")
        assert "epoch 3/3 done" in done.stderr and "epoch 1/3" not in done.stderr
    else:
        assert line == "[train] checkpoint.pt is unreadable (zero bytes); starting over"
        assert "epoch 1/3 done" in done.stderr
    store = Store(db)
    (run,) = _completed(store)
    assert run["run_id"] == (finished_run.folder / "run_id").read_text().strip()  # the same run continued
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2  # a good checkpoint replaced the broken one


class MakesAFile:
    """Unpickling this (with weights_only=False) opens `path` for writing, i.e. creates it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_hostile_checkpoint_is_never_executed_and_the_run_completes(tmp_path, finished_run):
    db, folder = _resume_copy(finished_run, tmp_path)
    marker = tmp_path / "created-by-the-checkpoint"
    good = torch.load(folder / "checkpoint.pt", weights_only=True)
    torch.save({**good, "model": {"hook": MakesAFile(marker)}}, folder / "checkpoint.pt")

    done = run_harness(*ARGS, "seed=1", f"store.path={db}")
    line = _one_checkpoint_line(done.stderr)
    assert "refused by weights_only=True" in line and line.endswith("; resuming from checkpoint.prev.pt")
    assert not marker.exists()
    assert [r["status"] for r in Store(db).query("SELECT status FROM runs")] == ["completed"]
    # The file had teeth: loading it as before (weights_only=False) creates the file.
    torch.load(folder / "checkpoint.pt.unreadable", weights_only=False)
    assert marker.exists()


def test_a_full_disk_ends_the_run_in_one_line_marked_failed_with_no_temporary_file(tmp_path, cifar10_cached):
    db = tmp_path / "r.duckdb"
    runs = tmp_path / "runs"
    args = (*ARGS, "trainer.epochs=2", f"store.path={db}", f"store.runs_dir={runs}")
    # The run folder on a 4 MiB file system: a convnet checkpoint (about 11 MB) cannot fit.
    with small_file_system(runs, 4096) as mounted:
        if mounted:
            done = run_harness(*args, check=False)
            expected = "no space left on device"
        else:  # no mount here: a file-size limit on the job makes the same write fail (EFBIG)
            limit = 4 * 2**20
            done = run_harness(*args, check=False,
                               preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
            expected = "file too large"
        leftovers = [p.name for p in runs.rglob("*") if p.name.endswith(".tmp")]
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and "Traceback" not in done.stderr
    key = lines[-1].split()[2] if lines[-1].startswith("[harness] run ") else "?"
    assert lines[-1] == f"[harness] run {key} failed: {expected} writing {runs}/{key}/checkpoint.pt"
    assert leftovers == []
    (row,) = Store(db).query("SELECT status, error FROM runs")
    assert row["status"] == "failed" and expected in row["error"]
