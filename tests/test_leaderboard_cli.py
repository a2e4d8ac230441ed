"""`python -m leaderboard` as a user types it: regress's exit statuses, show's aggregation and filters, export."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import duckdb
import pytest

from harness.store import Store
from leaderboard.__main__ import main
from tests.conftest import REPO
from tests.leaderboard_util import add_run


def leaderboard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leaderboard", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_regress_exit_status_tells_regressed_from_cannot_compare(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    for seed, v in enumerate([70.0, 70.4, 70.2]):
        add_run(store, f"a{seed}", v, seed=seed, commit="aaaa1111", finished=f"2025-01-01T00:0{seed}:00")
        add_run(store, f"b{seed}", v - 3.0, seed=seed, commit="bbbb2222", finished=f"2025-01-02T00:0{seed}:00")
        add_run(store, f"c{seed}", v + 0.1, seed=seed, commit="cccc3333", finished=f"2025-01-03T00:0{seed}:00")
    # A configuration only the commit dddd ran: nothing in common with aaaa.
    add_run(store, "d0", 50.0, lr=0.3, commit="dddd4444", finished="2025-01-04T00:00:00")
    db = str(store.path)
    ok = leaderboard("regress", "--db", db, "--baseline", "aaaa", "--candidate", "cccc")
    assert ok.returncode == 0, ok.stderr
    worse = leaderboard("regress", "--db", db, "--baseline", "aaaa", "--candidate", "bbbb")
    assert worse.returncode == 1 and "REGRESSED" in worse.stdout
    for args, why in ((("--baseline", "aaaa", "--candidate", "dddd"), "nothing was compared"),
                      (("--baseline", "eeee"), "no completed runs at commit 'eeee'"),
                      (("--baseline", str(tmp_path / "r.duckdb"), "--candidate", "bbbb"), "not a readable baseline"),
                      (("--db", str(tmp_path / "none.duckdb"), "--baseline", "aaaa"), "no such store")):
        proc = leaderboard("regress", "--db", db, *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert why in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    only = Store(tmp_path / "one.duckdb")
    add_run(only, "x", 60.0, commit="ffff0000")
    proc = leaderboard("regress", "--db", str(only.path), "--baseline", "ffff")
    assert proc.returncode == 2 and "no other commit" in proc.stderr
    assert "2 = nothing could be compared" in leaderboard("regress", "--help").stdout


@pytest.fixture
def store(tmp_path) -> Store:
    store = Store(tmp_path / "r.duckdb")
    for seed, v in enumerate([70.0, 72.0, 74.0]):
        add_run(store, f"s{seed}", v, seed=seed, commit="aaaa1111bbbb2222cccc", finished=f"2025-01-01T00:0{seed}:00")
    for seed, v in enumerate([60.0, 62.0]):
        add_run(store, f"v{seed}", v, seed=seed, method="vicreg", commit="aaaa1111bbbb2222cccc",
                finished=f"2025-01-01T00:1{seed}:00")
    add_run(store, "c100", 40.0, dataset="cifar100", commit="dddd5555eeee6666ffff", finished="2025-01-02T00:00:00")
    return store


def test_show_aggregates_configurations_with_mean_std_n_and_filters(store, capsys):
    assert main(["show", "--db", str(store.path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    simclr = [line for line in lines if " simclr " in line and "cifar10 " in line]
    assert len(simclr) == 1 and "72.00 ± 2.00" in simclr[0] and " 3 " in simclr[0]  # mean ± std, n
    assert "aaaa1111bb" in simclr[0] and "aaaa1111bbbb2222cccc" not in out  # short commits
    assert any("61.00 ± 1.41" in line and "vicreg" in line for line in lines)
    main(["show", "--db", str(store.path), "--method", "vicreg"])
    out = capsys.readouterr().out
    assert "vicreg" in out and " simclr " not in out
    main(["show", "--db", str(store.path), "--dataset", "cifar100"])
    out = capsys.readouterr().out
    assert "40.00 ± –" in out and "cifar100" in out and "72.00" not in out
    main(["show", "--db", str(store.path), "--commit", "dddd"])
    assert "40.00" in (out := capsys.readouterr().out) and "72.00" not in out
    main(["show", "--db", str(store.path), "--protocol", "linear"])
    assert "no completed runs match the filters" in capsys.readouterr().out
    main(["show", "--db", str(store.path), "--runs", "--method", "simclr", "--dataset", "cifar10"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("simclr")]
    assert len(rows) == 3 and all(line.rstrip().endswith(" aaaa1111bb") for line in rows)  # per run, short commit


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_writes_runs_metrics_and_evals_that_read_back(store, tmp_path, fmt):
    out = tmp_path / "export"
    assert main(["export", "--db", str(store.path), "--format", fmt, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{t}.{fmt}" for t in ("evals", "metrics", "runs"))
    expected = {t: store.query(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in ("runs", "metrics", "evals")}
    for table, n in expected.items():
        path = out / f"{table}.{fmt}"
        if fmt == "csv":
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        else:
            con = duckdb.connect()
            cur = con.execute(f"SELECT * FROM read_parquet('{path}')")
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r)) for r in cur.fetchall()]
        assert len(rows) == n > 0
        if table == "runs":
            assert {str(r["run_id"]) for r in rows} == {"s0", "s1", "s2", "v0", "v1", "c100"}
            assert len({r["config_key"] for r in rows if r["run_id"].startswith("s")}) == 1  # seeds grouped
        if table == "metrics":
            assert min(int(r["epoch"]) for r in rows) == 1  # epochs count from 1, as in evals


def test_a_sweeps_end_message_names_a_page_build_command_that_works(store, tmp_path):
    import os
    import shlex

    from hydra_plugins.harness_callbacks.sweep_summary import results_hint

    [build] = [line.split(":", 1)[1].split("(then")[0] for line in results_hint(store.path).splitlines()
               if "leaderboard build" in line]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(shlex.split(build.replace("python", sys.executable, 1)), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "outputs" / "leaderboard.html").stat().st_size > 100_000


def test_regress_accepts_any_name_git_rev_parse_knows_and_prints_what_it_resolved(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q", "-b", "main")
    for n in (1, 2):
        (repo / "f").write_text(str(n))
        git("add", "f")
        git("commit", "-q", "-m", f"c{n}")
    first, second = git("rev-parse", "HEAD~1"), git("rev-parse", "HEAD")
    git("tag", "v1", first)
    store = Store(tmp_path / "r.duckdb")
    for seed, v in enumerate([70.0, 70.4]):
        add_run(store, f"a{seed}", v, seed=seed, commit=first, finished=f"2025-01-01T00:0{seed}:00")
        add_run(store, f"b{seed}", v - 3.0, seed=seed, commit=second, finished=f"2025-01-02T00:0{seed}:00")

    def regress(*args: str) -> subprocess.CompletedProcess:  # run in the repository, as a CI step does
        return subprocess.run([sys.executable, "-m", "leaderboard", "regress", "--db", str(store.path), *args],
                              cwd=repo, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                              timeout=300)

    proc = regress("--baseline", "HEAD~1")
    assert proc.returncode == 1 and "REGRESSED" in proc.stdout, proc.stderr  # both commits' runs were compared
    assert f"baseline HEAD~1 = {first}" in proc.stdout
    proc = regress("--baseline", "v1", "--candidate", "main")
    assert proc.returncode == 1, proc.stderr
    assert f"baseline v1 = {first}" in proc.stdout and f"candidate main = {second}" in proc.stdout
    proc = regress("--baseline", "no-such-branch")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    # A name git knows whose commit has no runs: one line naming both.
    git("commit", "-q", "--allow-empty", "-m", "c3")
    proc = regress("--baseline", "HEAD")
    assert proc.returncode == 2 and "git resolves 'HEAD'" in proc.stderr, proc.stderr
