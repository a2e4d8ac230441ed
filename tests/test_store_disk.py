"""Disk and stores over months: what a completed run keeps, `du`, `prune` and `merge` of
`python -m harness.store`, on real sweeps (the small ConvNet on the real CIFAR-10) and a real DuckDB;
and `prune --keep` on artifact folders and data cache files laid out where the real stage keys of the
kept sweeps' points put them (no training)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.store import Store
from harness.store import main as store_cli
from leaderboard.__main__ import main as leaderboard
from tests.conftest import TINY, harness_env, requires_cifar, run_harness

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


@requires_cifar
@pytest.mark.slow  # trains on the real CIFAR-10 (the `stores` fixture)
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


@requires_cifar
@pytest.mark.slow  # trains on the real CIFAR-10 (the `stores` fixture)
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


@requires_cifar
@pytest.mark.slow  # trains on the real CIFAR-10 (the `stores` fixture)
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


# ---------------------------------------------------------------------- prune --keep: artifacts and caches
def stage_paths(*overrides: str) -> tuple[Path, Path | None]:
    """(the data cache file, the score net's artifact folder) of one point, from its real stage keys."""
    from harness.jobs.config import compose
    from harness.jobs.stages import stages_of

    keys = [stage.key for stage in stages_of(compose(list(overrides)))]
    return Path(keys[0].removeprefix("dataset:")), (Path(keys[1]) if len(keys) > 1 else None)


def make(path: Path, size: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)


@pytest.fixture
def disk(tmp_path) -> dict:
    """A store's artifacts and a data cache as builds leave them: A and C (the score net and data cache
    file the kept sweep's ScoreCL points need), B and D (another score net, another dataset's cache file),
    each with its lock and partial builds; no training, each file at the path the real stage keys name."""
    db, cache = tmp_path / "results.duckdb", tmp_path / "cache"
    archive, other = tmp_path / "cifar10-jpeg.tar.xz", tmp_path / "other" / "cifar10-jpeg.tar.xz"
    make(archive)  # the cache key reads the archive's size and time; nothing decodes it here
    make(other, 1)
    kept = f"backbone=convnet weighting=none,scorecl_tiny seed=0,1 dataset.archive={archive} -m"
    first = (f"store.path={db}", f"dataset.cache_dir={cache}", "backbone=convnet")
    c, a = stage_paths(*first, "weighting=scorecl_tiny", f"dataset.archive={archive}")
    d, b = stage_paths(*first, "weighting=scorecl", f"dataset.archive={other}")
    assert a.parent == b.parent == Path(f"{db}.artifacts") / "score_net" and a != b
    assert c.parent == d.parent == cache and c != d
    groups = {
        "A": [a / "artifact.json", a / "score_net.pt", Path(f"{a}.lock")],
        "B": [b / "artifact.json", b / "score_net.pt", Path(f"{b}.lock"), b.parent / f".{b.name}.4242.tmp" / "x.pt"],
        "C": [c, Path(f"{c}.lock"), c.with_name(f"{c.name}.train-0123456789abcdef.pt")],
        "D": [d, Path(f"{d}.lock"), Path(f"{d}.decoding") / "train_x.npy"],
    }
    for files in groups.values():
        for i, f in enumerate(files):
            make(f, 100 * i)
    make(cache / "downloads" / "cifar-10-batches-py" / "data_batch_1", 10)  # a download's source: never pruned
    make(cache / "notes.txt", 10)  # nothing harness builds: never pruned either
    make(a.parent / "README", 10)
    # What a prune of B and D lists: each build's top-level entries (a folder as one path).
    tops = {name: sorted({str(p if p.parent in (cache, a.parent) else next(q for q in p.parents
                                                                          if q.parent in (cache, a.parent)))
                          for p in files}) for name, files in groups.items()}
    return {"db": db, "cache": cache, "root": tmp_path, "keep": kept, "groups": groups, "tops": tops,
            "args": ["prune", "--db", str(db), "--cache", str(cache)]}


def files_now(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if p.is_file()}


def listed(out: str, verb: str) -> list[str]:
    return sorted(line.split()[len(verb.split())] for line in out.splitlines() if line.startswith(verb + " "))


@pytest.mark.slow  # three prunes, each composing the kept sweep in a process of its own: about 10 s
def test_prune_with_keep_frees_the_artifacts_and_caches_no_kept_point_needs(disk, capsys):
    before = files_now(disk["root"])
    capsys.readouterr()
    assert store_cli([*disk["args"], "--keep", disk["keep"]]) == 0  # a dry run
    out = capsys.readouterr().out
    assert listed(out, "would delete") == sorted(disk["tops"]["B"] + disk["tops"]["D"])
    assert f"kept for --keep {disk['keep']!r}: what its 4 point(s) need" in out
    assert files_now(disk["root"]) == before  # a dry run deletes nothing

    # --older-than: only what was last written before DAYS ago (D, made old here).
    import os
    import time

    old = time.time() - 40 * 86400
    for p in [Path(t) for t in disk["tops"]["D"]] + disk["groups"]["D"]:
        os.utime(p, (old, old))
    assert store_cli([*disk["args"], "--keep", disk["keep"], "--older-than", "30", "--apply"]) == 0
    assert listed(capsys.readouterr().out, "deleted") == disk["tops"]["D"]
    assert store_cli([*disk["args"], "--keep", disk["keep"], "--apply"]) == 0
    assert listed(capsys.readouterr().out, "deleted") == disk["tops"]["B"]
    gone = {str(f) for name in "BD" for f in disk["groups"][name]}
    assert files_now(disk["root"]) == before - gone
    assert not any(Path(t).exists() for name in "BD" for t in disk["tops"][name])
    assert all(f.exists() for name in "AC" for f in disk["groups"][name])
    assert (disk["cache"] / "downloads" / "cifar-10-batches-py" / "data_batch_1").exists()


def test_prune_without_keep_lists_and_deletes_no_artifact_or_cache(disk, capsys):
    before = files_now(disk["root"])
    capsys.readouterr()
    assert store_cli([*disk["args"], "--apply"]) == 0
    out = capsys.readouterr().out
    assert not listed(out, "deleted")
    kept = [line for line in out.splitlines() if line.startswith("kept every artifact")]
    assert len(kept) == 1 and "--keep" in kept[0] and str(disk["cache"]) in kept[0]
    assert files_now(disk["root"]) == before


def test_prune_keeps_an_artifact_whose_lock_is_held(disk, capsys):
    b_lock = disk["groups"]["B"][2]
    holder = subprocess.Popen(  # a builder in another process, holding B's lock as build_once does
        [sys.executable, "-c", "import sys; from filelock import FileLock; lock = FileLock(sys.argv[1]); "
         "lock.acquire(); print('held', flush=True); sys.stdin.read()", str(b_lock)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=harness_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert store_cli([*disk["args"], "--keep", disk["keep"], "--apply"]) == 0
        out = capsys.readouterr().out
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert listed(out, "deleted") == disk["tops"]["D"]
    assert f"kept {disk['groups']['B'][0].parent}: its lock is held" in out  # the build, named by its folder
    assert all(f.exists() for f in disk["groups"]["B"])
    assert not any(f.exists() for f in disk["groups"]["D"])


def test_a_keep_that_does_not_compose_ends_in_one_line_and_deletes_nothing(disk, capsys):
    before = files_now(disk["root"])
    capsys.readouterr()
    assert store_cli([*disk["args"], "--keep", disk["keep"], "--keep", "weighting=nosuch", "--apply"]) == 2
    captured = capsys.readouterr()
    assert not captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: --keep 'weighting=nosuch'") and "'nosuch'" in lines[0]
    assert "scorecl_tiny" in lines[0] and "nothing was deleted" in lines[0]
    assert files_now(disk["root"]) == before


@pytest.mark.slow  # two prunes, each composing a tuned sweep's probes: about 7 s
def test_a_tuned_parameter_that_shapes_an_artifact_keeps_every_artifact_of_its_kind(disk, capsys, monkeypatch):
    """Optuna draws a tuned sweep's points as it runs: an interval that changes the score net's key
    between its ends may need any score net, so none goes; one that does not (the learning rate) keeps
    only the score net of the fixed values."""
    monkeypatch.chdir(disk["root"])  # ./sweeps of the directory prune runs from holds the presets
    for name, param in (("tune_net", "weighting.score_net.epochs: interval(1, 3)"),
                        ("tune_lr", "trainer.lr: tag(log, interval(0.1, 2.0))")):
        make(disk["root"] / "sweeps" / f"{name}.yaml")
        (disk["root"] / "sweeps" / f"{name}.yaml").write_text(
            "# @package _global_\ndefaults:\n  - override /weighting: scorecl_tiny\n"
            f"  - override /hydra/sweeper: harness_optuna\nsweep_name: {name}\n"
            f"hydra:\n  sweeper:\n    params:\n      {param}\n")
    archive = disk["keep"].split("dataset.archive=")[1].split()[0]
    capsys.readouterr()
    assert store_cli([*disk["args"], "--keep", f"sweep=tune_net backbone=convnet dataset.archive={archive}"]) == 0
    assert listed(capsys.readouterr().out, "would delete") == disk["tops"]["D"]  # no score net
    assert store_cli([*disk["args"], "--keep", f"sweep=tune_lr backbone=convnet dataset.archive={archive}"]) == 0
    assert listed(capsys.readouterr().out, "would delete") == sorted(disk["tops"]["B"] + disk["tops"]["D"])
