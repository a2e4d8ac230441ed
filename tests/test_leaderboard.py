"""The leaderboard's statistics, aggregates and regression verdicts, on real DuckDB stores."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.store import Store
from leaderboard import data
from leaderboard.__main__ import main
from leaderboard.stats import t_cdf, t_halfwidth, t_ppf, welch
from tests.conftest import REPO
from tests.leaderboard_util import add_run

BASE = [70.2, 71.0, 70.6, 70.9]  # four seeds of one configuration at the baseline commit


@pytest.mark.parametrize("df, quantile", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)])
def test_t_quantiles_match_tables(df, quantile):
    assert t_ppf(0.975, df) == pytest.approx(quantile, abs=1e-4)
    assert t_cdf(quantile, df) == pytest.approx(0.975, abs=1e-5)


def test_t_interval_and_welch():
    assert t_halfwidth(1.0, 2) == pytest.approx(12.7062 / 2**0.5, abs=1e-3)
    assert t_halfwidth(None, 1) is None
    w = welch([90, 91, 92], [85, 86, 87])
    assert w["diff"] == -5 and w["df"] == pytest.approx(4.0)
    assert w["p"] == pytest.approx(1 - t_cdf(5 / (2 / 3) ** 0.5, 4))
    assert w["upper"] < 0


def store_with(tmp_path, candidate: list[float], base: list[float] = BASE) -> Store:
    store = Store(tmp_path / "r.duckdb")
    for seed, v in enumerate(base):
        add_run(store, f"a{seed}", v, seed=seed, commit="aaaa1111", finished=f"2025-01-01T00:0{seed}:00")
    for seed, v in enumerate(candidate):
        add_run(store, f"b{seed}", v, seed=seed, commit="bbbb2222", finished=f"2025-01-02T00:0{seed}:00")
    # A second configuration that does not change between commits.
    for seed in range(3):
        add_run(store, f"a-lr{seed}", 60 + seed, seed=seed, lr=0.1, commit="aaaa1111", finished="2025-01-01T01:00:00")
        add_run(store, f"b-lr{seed}", 60 + seed, seed=seed, lr=0.1, commit="bbbb2222", finished="2025-01-02T01:00:00")
    return store


def test_regress_flags_a_planted_drop(tmp_path, capsys):
    store = store_with(tmp_path, [v - 3.0 for v in BASE])
    out = tmp_path / "verdict.json"
    assert main(["regress", "--db", str(store.path), "--baseline", "aaaa", "--candidate", "bbbb",
                 "--json", str(out)]) == 1
    verdict = json.loads(out.read_text())
    assert verdict["regressed"] == 1
    bad = [r for r in verdict["results"] if r["verdict"] == "REGRESSED"]
    assert len(bad) == 1 and bad[0]["diff"] == pytest.approx(-3.0) and bad[0]["rule"].startswith("welch")
    assert bad[0]["p"] < 0.05 and bad[0]["bound"] < 0
    assert "REGRESSED" in capsys.readouterr().out


def test_regress_ignores_seed_noise_of_the_baselines_spread(tmp_path):
    # Same spread as BASE (std 0.36), means 0.05 apart: noise, not a change.
    store = store_with(tmp_path, [70.5, 70.8, 70.3, 71.1])
    out = tmp_path / "verdict.json"
    assert main(["regress", "--db", str(store.path), "--baseline", "aaaa1111", "--json", str(out)]) == 0
    verdict = json.loads(out.read_text())
    assert verdict["regressed"] == 0 and {r["verdict"] for r in verdict["results"]} == {"ok"}


def test_a_significant_but_tiny_drop_is_not_a_regression(tmp_path):
    # Many seeds with almost no spread make a 0.2-point drop significant; the minimum effect keeps it "ok".
    base = [70.0 + 0.01 * i for i in range(8)]
    store = store_with(tmp_path, [v - 0.2 for v in base], base=base)
    assert main(["regress", "--db", str(store.path), "--baseline", "aaaa", "--min-effect", "0.5"]) == 0
    assert main(["regress", "--db", str(store.path), "--baseline", "aaaa", "--min-effect", "0.1"]) == 1


def test_single_seed_uses_the_tolerance(tmp_path):
    store = store_with(tmp_path, [68.5], base=[70.0])
    assert main(["regress", "--db", str(store.path), "--baseline", "aaaa", "--tolerance", "1.0"]) == 1
    assert main(["regress", "--db", str(store.path), "--baseline", "aaaa", "--tolerance", "2.0"]) == 0


def test_pinned_baseline_file(tmp_path):
    store = store_with(tmp_path, [v - 3.0 for v in BASE])
    pinned = tmp_path / "baseline.json"
    assert main(["regress", "--db", str(store.path), "--baseline", "aaaa", "--write-baseline", str(pinned)]) == 0
    blob = json.loads(pinned.read_text())
    assert blob["commit"] == "aaaa1111" and len(blob["entries"]) == 2
    assert sorted(e["values"] for e in blob["entries"])[1] == BASE
    assert main(["regress", "--db", str(store.path), "--baseline", str(pinned), "--candidate", "bbbb"]) == 1
    # A hand-written single expected value with its own tolerance.
    for e in blob["entries"]:
        e.pop("values")
        e["mean"], e["tolerance"] = e["mean"] - 2.5, 1.0
    pinned.write_text(json.dumps(blob))
    assert main(["regress", "--db", str(store.path), "--baseline", str(pinned), "--candidate", "bbbb"]) == 0


def test_unknown_or_ambiguous_commit_is_an_error_not_a_regression(tmp_path, capsys):
    store = store_with(tmp_path, BASE)
    add_run(store, "x", 50.0, commit="aaaa9999")
    assert main(["regress", "--db", str(store.path), "--baseline", "cccc"]) == 2
    assert "error: no completed runs at commit 'cccc'" in capsys.readouterr().err
    assert main(["regress", "--db", str(store.path), "--baseline", "aaaa"]) == 2
    assert "ambiguous" in capsys.readouterr().err


def test_runs_from_a_dirty_tree_are_a_commit_of_their_own(tmp_path, capsys):
    store = store_with(tmp_path, BASE)  # clean runs at aaaa1111 and bbbb2222, no change between them
    for seed, v in enumerate(BASE):  # an uncommitted change on top of bbbb2222 that costs 3 points
        add_run(store, f"d{seed}", v - 3.0, seed=seed, commit="bbbb2222", dirty=True,
                finished=f"2025-01-03T00:0{seed}:00")
    with store.connect() as con:
        data.prepare(con)
        assert data.commits_in_order(con) == ["aaaa1111", "bbbb2222", "bbbb2222+dirty"]
        clean = [e for e in data.seeds_at(con, "bbbb2222") if e["values"][0] > 65]
        assert clean[0]["values"] == BASE  # the clean commit keeps its own runs, not the newer dirty ones
    # A prefix names the clean commit; the newest runs (the dirty ones) are the default candidate.
    assert main(["regress", "--db", str(store.path), "--baseline", "aaaa", "--candidate", "bbbb"]) == 0
    assert main(["regress", "--db", str(store.path), "--baseline", "bbbb"]) == 1
    out = capsys.readouterr().out
    assert "candidate: commit bbbb2222+dirty" in out and "REGRESSED" in out


def store_across_a_new_field(tmp_path, candidate_fields: list[dict]) -> Store:
    """Baseline runs from before a config field existed; candidate runs that have it, 3 points lower."""
    store = Store(tmp_path / "r.duckdb")
    for seed, v in enumerate(BASE):
        add_run(store, f"a{seed}", v, seed=seed, commit="aaaa1111", finished=f"2025-01-01T00:0{seed}:00")
        add_run(store, f"a-lr{seed}", 60 + seed, seed=seed, lr=0.1, commit="aaaa1111")
        for i, fields in enumerate(candidate_fields):
            add_run(store, f"b{i}-{seed}", v - 3.0, seed=seed, commit="bbbb2222", fields=fields,
                    finished=f"2025-01-02T00:0{seed}:00")
            add_run(store, f"b{i}-lr{seed}", 60 + seed, seed=seed, lr=0.1, commit="bbbb2222", fields=fields)
    return store


def test_a_config_field_added_since_the_baseline_does_not_hide_a_regression(tmp_path, capsys):
    store = store_across_a_new_field(tmp_path, [{"trainer.sync_bn": False}])
    out = tmp_path / "verdict.json"
    assert main(["regress", "--db", str(store.path), "--baseline", "aaaa", "--json", str(out)]) == 1
    verdict = json.loads(out.read_text())
    assert sorted(r["verdict"] for r in verdict["results"]) == ["REGRESSED", "ok"]  # matched, none missing or new
    assert [r["diff"] for r in verdict["results"] if r["verdict"] == "REGRESSED"] == [pytest.approx(-3.0)]
    assert "config field trainer.sync_bn is only in the candidate's runs (= false)" in capsys.readouterr().out
    # A pinned baseline file keeps each configuration's config, so it aligns the same way.
    pinned = tmp_path / "baseline.json"
    assert main(["regress", "--db", str(store.path), "--baseline", "aaaa", "--write-baseline", str(pinned)]) == 0
    assert main(["regress", "--db", str(store.path), "--baseline", str(pinned), "--candidate", "bbbb"]) == 1


def test_a_new_field_that_tells_candidate_configurations_apart_is_not_left_out(tmp_path, capsys):
    # Both values of the new field ran at the candidate: leaving it out would merge two configurations.
    store = store_across_a_new_field(tmp_path, [{"trainer.sync_bn": False}, {"trainer.sync_bn": True}])
    assert main(["regress", "--db", str(store.path), "--baseline", "aaaa"]) == 2  # not a pass: nothing compared
    captured = capsys.readouterr()
    assert "would merge configurations" in captured.out
    assert "nothing was compared" in captured.err


def test_configurations_and_addon_effects_pair_seeds(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    for seed in range(3):
        add_run(store, f"plain{seed}", 70.0 + seed, seed=seed)
        add_run(store, f"score{seed}", 71.5 + seed + 0.1 * seed, seed=seed, weighting="scorecl")
        add_run(store, f"clsp{seed}", 69.0 + seed, seed=seed, ratio=0.5)
        add_run(store, f"hi-lr{seed}", 72.0 + seed, seed=seed, lr=0.2)
    add_run(store, "score-unpaired", 90.0, seed=7, weighting="scorecl")  # no baseline run with seed 7
    with store.connect() as con:
        data.prepare(con)
        configs = data.configurations(con)
        effects = {e["treatment"]: e for e in data.effects(con)}
    plain = [c for c in configs if c["weighting"] == "none" and c["synthetic_ratio"] == 0]
    assert sorted(c["n"] for c in plain) == [3, 3]  # two learning rates, three seeds each
    best = min(plain, key=lambda c: c["rank_in_setting"])
    assert best["lr"] == 0.2 and best["mean"] == pytest.approx(73.0)
    assert effects["scorecl"]["n"] == 3 and effects["scorecl"]["mean"] == pytest.approx(1.6)
    assert effects["clsp r=0.5"]["n"] == 3 and effects["clsp r=0.5"]["mean"] == pytest.approx(-1.0)


def test_leaderboard_never_imports_torch(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    for seed in range(2):
        add_run(store, f"r{seed}", 70.0 + seed, seed=seed)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from leaderboard.__main__ import main\n"
        f"main(['build', '--db', {str(store.path)!r}, '--out', {str(tmp_path / 'p.html')!r}])\n"
        f"main(['regress', '--db', {str(store.path)!r}, '--baseline', 'aaaa', '--candidate', 'aaaa'])\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("NO TORCH")
    assert (tmp_path / "p.html").stat().st_size > 1_000_000  # plotly.js inlined


def test_optuna_study_history_and_importances(tmp_path):
    optuna = pytest.importorskip("optuna")
    store = Store(tmp_path / "r.duckdb")
    add_run(store, "r0", 70.0)
    # The layout the Optuna sweeper keeps: one journal file per study beside the store.
    (tmp_path / "r.duckdb.optuna").mkdir()
    journal = optuna.storages.journal.JournalFileBackend(str(tmp_path / "r.duckdb.optuna" / "s.log"))
    study = optuna.create_study(study_name="lr<b>search", storage=optuna.storages.JournalStorage(journal),
                                direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: 10 * t.suggest_float("lr", 0.01, 1.0) + t.suggest_int("k", 1, 2), n_trials=8)
    out = tmp_path / "p.html"
    assert main(["build", "--db", str(store.path), "--out", str(out)]) == 0
    text = out.read_text()
    assert "study lr&lt;b&gt;search (8 completed trials" in text
    blob = text.split('<script type="application/json" id="figures">', 1)[1].split("</script>", 1)[0]
    figures = json.loads(blob).values()
    history = [f for f in figures if any(t.get("name") == "best so far" for t in f["data"])]
    assert len(history) == 1 and history[0]["data"][0]["x"] == list(range(8))
    assert history[0]["data"][1]["y"][-1] == pytest.approx(study.best_value)
    bars = [t for f in figures for t in f["data"] if t["type"] == "bar"]
    assert len(bars) == 1 and sorted(bars[0]["y"]) == ["k", "lr"]


def test_page_without_a_study_has_no_optuna_section(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    add_run(store, "r0", 70.0)
    out = tmp_path / "p.html"
    assert main(["build", "--db", str(store.path), "--out", str(out), "--cdn"]) == 0
    text = out.read_text()
    assert "Optuna studies" not in text
    assert len(text) < 500_000 and 'src="https://cdn.plot.ly/plotly-' in text
