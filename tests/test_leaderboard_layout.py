"""The page's blocks as a researcher reads them: primary protocol first, ties, folded columns, published
numbers once per dataset with a budget badge, curves per protocol, cost per configuration (raw HTML; the
Chromium tests in test_leaderboard_page.py check the rendered page)."""

from __future__ import annotations

import json

import pytest

from harness.store import Store
from leaderboard.__main__ import main
from tests.leaderboard_util import add_run, parse_dom

PRIMARY, OTHER = "knn:cosine:k=20:T=0.07", "knn:cosine:k=200:T=0.1"
KNN = [{"k": 20, "T": 0.07}, {"k": 200, "T": 0.1}]


def run(store: Store, run_id: str, top1: float, seed: int, **kw) -> None:
    """A run evaluated under both k-NN protocols (the primary one first in its config), one hour long."""
    add_run(store, run_id, top1, seed=seed, protocol=PRIMARY, fields={"eval.knn": KNN, **kw.pop("fields", {})},
            row={"started_at": "2024-12-31T23:00:00"}, **kw)
    store.write("evals", [{"run_id": run_id, "run_key": f"k-{run_id}", "protocol": OTHER, "split": "test",
                           "top1": top1 - 5, "top5": 99.0, "epoch": 10}])


@pytest.fixture
def page(tmp_path) -> tuple[str, dict]:
    store = Store(tmp_path / "r.duckdb")
    for seed in range(3):
        run(store, f"simclr{seed}", 70.0 + seed, seed)  # mean 71, interval about [68.5, 73.5]
        run(store, f"byol{seed}", 70.5 + seed, seed, method="byol")  # overlaps simclr: a tie
        run(store, f"vicreg{seed}", 50.0 + 0.1 * seed, seed, method="vicreg")  # far below both
    out = tmp_path / "p.html"
    assert main(["build", "--db", str(store.path), "--out", str(out), "--cdn"]) == 0
    text = out.read_text()
    blob = text.split('<script type="application/json" id="figures">', 1)[1].split("</script>", 1)[0]
    return text, json.loads(blob)


def test_primary_protocol_first_and_marked_ties_and_folded_columns(page):
    text, _ = page
    parsed = parse_dom(text)
    blocks = [a for a in parsed.sections if a.get("data-protocol") and a.get("data-primary")]
    assert [(a["data-protocol"], a["data-primary"]) for a in blocks] == [(PRIMARY, "yes"), (OTHER, "no")]
    rows = [r for r in parsed.tables["ranking"] if r["_section"]["data-protocol"] == PRIMARY]
    assert [(r["method"], r["rank"]) for r in rows] == [("byol", "1 (tie)"), ("simclr", "1 (tie)"), ("vicreg", "3")]
    # Columns constant over the block are said once above it; an empty names column is left out.
    assert "In every row: weighting none · positives none · synthetic ratio 0 · backbone convnet · epochs 10" in text
    assert all("positives" not in r and "names" not in r and "weighting" not in r for r in rows)


def test_published_numbers_once_per_dataset_with_a_budget_badge(page):
    parsed = parse_dom(page[0])
    refs = parsed.tables["refs beside"]
    simclr = [r for r in refs if r["method"] == "simclr" and r["source"] == "solo-learn README"]
    assert len(simclr) == 1  # not repeated under each protocol block
    assert simclr[0]["budget"] == "budget differs"
    assert "their budgets (ours: convnet 10 ep)" in page[0]


def test_curves_per_protocol_normalised_losses_integer_epochs(page):
    text, figures = page
    titles = [f["layout"].get("title", {}).get("text") for f in figures.values()]
    # The per-epoch k-NN measures the primary protocol only: no curve claims to be the other one.
    assert f"{PRIMARY} top-1 per epoch (%)" in titles and f"{OTHER} top-1 per epoch (%)" not in titles
    assert "No per-epoch values under this protocol" in text
    losses = [f for f in figures.values() if f["layout"].get("title", {}).get("text", "").startswith("training loss")]
    assert losses and all(t["y"][0] == 1.0 for f in losses for t in f["data"])
    assert all(t["x"][0] == 1 for f in losses for t in f["data"])  # epochs count from 1, as the store does
    assert all(f["layout"]["xaxis"]["dtick"] == 1 and f["layout"]["xaxis"]["tickformat"] == "d" for f in losses)


def test_cost_per_configuration_includes_cpu_runs(page):
    parsed = parse_dom(page[0])
    [simclr] = [r for r in parsed.tables["ranking"]
                if r["method"] == "simclr" and r["_section"]["data-primary"] == "yes"]
    assert simclr.get("cost") is None  # the same in every row: folded into the heading
    assert "device-hours, all seeds (device) 3 h (cpu)" in page[0]


def test_accuracy_against_cost_marks_the_pareto_frontier(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    # (method, top-1, hours): cheap and good, dear and better, dear and worse (dominated).
    for method, top1, start in (("simclr", 70.0, "2024-12-31T23:00:00"), ("byol", 75.0, "2024-12-31T20:00:00"),
                                ("vicreg", 65.0, "2024-12-31T19:00:00")):
        add_run(store, method, top1, method=method, row={"started_at": start})
    out = tmp_path / "p.html"
    assert main(["build", "--db", str(store.path), "--out", str(out), "--cdn"]) == 0
    text = out.read_text()
    figures = json.loads(text.split('id="figures">', 1)[1].split("</script>", 1)[0]).values()
    [frontier] = [t for f in figures for t in f["data"] if t.get("name") == "Pareto frontier"]
    assert list(zip(frontier["x"], frontier["y"])) == [(1.0, 70.0), (4.0, 75.0)]
    # Throughput is per method, not pooled.
    boxes = [t["name"] for f in figures for t in f["data"] if t["type"] == "box"]
    assert sorted(b.split(" · ")[0] for b in boxes) == ["byol", "simclr", "vicreg"]


def test_the_random_init_floor_is_a_row_and_configurations_not_above_it_are_flagged(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    for seed in range(3):
        add_run(store, f"floor{seed}", 68.0 + 0.1 * seed, seed=seed, epochs=0)  # the untrained ConvNet
        add_run(store, f"good{seed}", 75.0 + seed, seed=seed, method="byol")
        add_run(store, f"bad{seed}", 66.0 + 2 * seed, seed=seed, method="vicreg")  # mean 68, within its interval
    out = tmp_path / "p.html"
    assert main(["build", "--db", str(store.path), "--out", str(out), "--cdn"]) == 0
    rows = {r["method"] + ":" + r["_attrs"]["data-epochs"]: r for r in parse_dom(out.read_text()).tables["ranking"]}
    assert rows["simclr:0"]["rank"] == "floor" and rows["simclr:0"]["_attrs"]["data-floor"] == "yes"
    assert rows["byol:10"]["rank"] == "1" and rows["byol:10"]["floor"] == "+7.90"
    assert rows["vicreg:10"]["floor"].startswith("not above the floor (-0.10")
    assert rows["vicreg:10"]["_attrs"]["data-below-floor"] == "yes"
    assert "data-below-floor" not in rows["byol:10"]["_attrs"]


def test_a_warm_up_longer_than_the_run_shows_the_peak_lr_reached(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    warmup = {"trainer.warmup_epochs": 10, "trainer.warmup_start_lr": 0.0}
    add_run(store, "short", 60.0, epochs=3, lr=0.4, fields=warmup)
    add_run(store, "long", 70.0, epochs=20, lr=0.4, fields=warmup)
    out = tmp_path / "p.html"
    assert main(["build", "--db", str(store.path), "--out", str(out), "--cdn"]) == 0
    rows = {r["_attrs"]["data-epochs"]: r for r in parse_dom(out.read_text()).tables["ranking"]}
    assert rows["3"]["hparams"].endswith("⚠ warm-up 10 ep > the 3-ep run: peak lr reached 0.12, not 0.4")
    assert "warm-up" not in rows["20"]["hparams"]


def test_the_sweep_summary_has_one_line_per_group_over_seeds():
    from leaderboard.text import sweep_groups

    config = json.dumps({"eval": {"knn": KNN}, "dataset": {"val_size": 0}})
    points = [{"overrides": f"seed={seed} sweep=smoke trainer.lr={lr}", "status": status, "objective": value,
               "config": config}
              for lr, seed, status, value in ((0.1, 0, "completed", 70.0), (0.1, 1, "skipped", 72.0),
                                              (0.2, 0, "completed", 60.0), (0.2, 1, "failed", None))]
    lines = sweep_groups(points).splitlines()
    assert lines[0] == f"Per group, over seeds (objective: top-1 under {PRIMARY} on test):"
    assert lines[1] == "Shared by every group: sweep=smoke"
    rows = [line.split() for line in lines[4:]]
    assert rows == [["trainer.lr=0.1", "2", "71.00", "±", "1.41"], ["trainer.lr=0.2", "1", "60.00", "±", "–"]]


def test_an_artifacts_build_time_is_split_over_the_runs_that_share_it(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    tiny = {"epochs": 1, "max_images": 512, "unet": {"block_out_channels": [16, 32]}}
    for seed in range(2):
        add_run(store, f"plain{seed}", 70.0 + seed, seed=seed)
        add_run(store, f"tiny{seed}", 71.0 + seed, seed=seed, weighting="scorecl", fields={"weighting.score_net": tiny})
        add_run(store, f"other{seed}", 72.0 + seed, seed=seed, weighting="scorecl",
                fields={"weighting.score_net": {**tiny, "epochs": 100}},  # another score net, not built here
                row={"weighting_variant": "scorecl_long"})
    # The manifest harness.artifacts.build_once writes: the config that keyed the artifact and its build time.
    folder = tmp_path / "r.duckdb.artifacts" / "score_net" / "0123abcd"
    folder.mkdir(parents=True)
    (folder / "artifact.json").write_text(json.dumps({
        "kind": "score_net", "hash": "0123abcd", "build_seconds": 7200.0, "built_at": "2025-01-01T00:00:00",
        "config": {"score_net": tiny, "data": {"name": "cifar10"}}}))
    out = tmp_path / "p.html"
    assert main(["build", "--db", str(store.path), "--out", str(out), "--cdn"]) == 0
    parsed = parse_dom(out.read_text())
    [artifact] = parsed.tables["artifacts"]
    assert artifact["hours"] == "2" and artifact["runs"] == "2"
    costs = {r["weighting"].split(" ")[0]: r["cost"] for r in parsed.tables["ranking"]}
    assert costs == {"scorecl": "0 h (cpu) + 2 h artifacts (its share)", "scorecl_long": "0 h (cpu)",
                     "none": "0 h (cpu)"}
