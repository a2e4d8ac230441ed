"""Disk and stores over months: what a completed run keeps, `du`, `prune` and `merge` of
`python -m harness.store`, on real sweeps (the small ConvNet on the real CIFAR-10) and a real DuckDB."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness.store import Store
from harness.store import main as store_cli
from leaderboard.__main__ import main as leaderboard
from tests.conftest import TINY, requires_cifar, run_harness

pytestmark = [requires_cifar, pytest.mark.slow]

SMALL = (*TINY, "dataset.train_size=256", "dataset.test_size=100", "trainer.epochs=2")


@pytest.fixture(scope="module")
def stores(tmp_path_factory, cifar10_cached) -> tuple[Path, Path]:
    """Store a: a 3-point sweep with the default store.keep_checkpoints; store b: one run that keeps all."""
    tmp = tmp_path_factory.mktemp("stores")
    a, b = tmp / "a.duckdb", tmp / "b.duckdb"
    run_harness(*SMALL, f"store.path={a}", f"hydra.sweep.dir={tmp}/sweep", "seed=0,1,2", "-m")
    run_harness(*SMALL, f"store.path={b}", "seed=3", "store.keep_checkpoints=all")
    return a, b


def files_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def du_sb(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def test_completed_runs_keep_their_weights_and_du_counts_bytes_as_du_does(stores, capsys):
    a, b = stores
    folders = [p for p in Path(f"{a}.runs").iterdir() if p.is_dir()]
    assert len(folders) == 3
    for folder in folders:  # the weights, the done marker and the rows; no optimizer state
        assert (folder / "backbone.pt").exists() and (folder / "done.json").exists() and (folder / "rows").is_dir()
        assert not list(folder.glob("checkpoint*")), sorted(p.name for p in folder.iterdir())
    assert {p.name for p in next(Path(f"{b}.runs").iterdir()).glob("*.pt")} == {
        "backbone.pt", "checkpoint.pt", "checkpoint.prev.pt"}

    capsys.readouterr()
    assert store_cli(["du", "--db", str(a), "--artifacts", str(a) + ".artifacts", "--cache", str(a) + ".none"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    sizes = [int(line.split()[0].replace(",", "")) for line in lines if not line.startswith("total")]
    assert sizes == sorted(sizes, reverse=True)  # largest first
    for folder in folders:
        line = next(line for line in lines if line.rstrip().split("  (")[0].endswith(str(folder)))
        assert int(line.split()[0].replace(",", "")) == du_sb(folder)
    total_runs = next(line for line in lines if line.startswith("total run:"))
    assert int(total_runs.split()[2].replace(",", "")) == sum(du_sb(f) for f in folders)


def test_prune_lists_without_deleting_and_deletes_only_what_it_listed(stores, capsys):
    _, b = stores
    runs = Path(f"{b}.runs")
    before = files_under(runs)
    capsys.readouterr()
    assert store_cli(["prune", "--db", str(b)]) == 0
    listed = [line.split()[2] for line in capsys.readouterr().out.splitlines() if line.startswith("would delete")]
    assert sorted(Path(p).name for p in listed) == ["checkpoint.prev.pt", "checkpoint.pt"]
    assert files_under(runs) == before  # a dry run deletes nothing

    assert store_cli(["prune", "--db", str(b), "--apply"]) == 0
    deleted = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("deleted")]
    assert deleted == listed
    after = files_under(runs)
    assert set(before) - set(after) == {str(Path(p).relative_to(runs)) for p in listed}
    assert all(after[k] == before[k] for k in after if not k.endswith((".jsonl", ".lock")))


def test_merge_gives_the_union_and_merging_again_adds_nothing(stores, tmp_path, capsys):
    a, b = stores
    out = tmp_path / "merged.duckdb"

    def show(db: Path) -> list[str]:
        capsys.readouterr()
        assert leaderboard(["show", "--db", str(db), "--runs"]) == 0
        return sorted(line for line in capsys.readouterr().out.splitlines()[2:] if line.strip() and "cifar10" in line)

    assert store_cli(["merge", "--db", str(out), str(a), f"{b}.runs"]) == 0  # a store, or a run folders' root
    assert show(out) == sorted(show(a) + show(b))
    counts = {t: Store(out).query(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in ("runs", "metrics", "evals")}
    ids = {r["run_id"] for r in Store(a).query("SELECT run_id FROM runs")} | {
        r["run_id"] for r in Store(b).query("SELECT run_id FROM runs")}
    assert {r["run_id"] for r in Store(out).query("SELECT run_id FROM runs")} == ids  # run ids kept
    assert not Path(f"{out}.runs").exists()  # only rows were copied: the weights stay where they are

    assert store_cli(["merge", "--db", str(out), str(b)]) == 0
    assert {t: Store(out).query(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in counts} == counts
    # The weights are referenced: a merged run is found (and exported) in its own folder.
    key = Store(b).query("SELECT run_key FROM runs")[0]["run_key"]
    assert leaderboard(["show", "--db", str(out)]) == 0
    from harness.export import main as export

    assert export([key, "--db", str(out), "--out", str(tmp_path / "export")]) == 0
    assert store_cli(["merge", "--db", str(out), str(tmp_path / "nothing.duckdb")]) == 2
