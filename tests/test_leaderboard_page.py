"""The leaderboard page in headless Chromium: built from a real small sweep, checked in the rendered DOM."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import duckdb
import pytest

from harness.store import Store
from leaderboard.__main__ import main
from tests.conftest import REPO, TINY, requires_cifar, run_harness
from tests.leaderboard_util import add_run, browser, chromium, dump_dom, parse_dom, with_collector

XSS = "<img src=x onerror=alert(1)>"
# Writes the page's scroll width and the window's width into <pre id="__width"> once the page has loaded.
WIDTH_PROBE = """<script>window.addEventListener('load', function () { setTimeout(function () {
  var pre = document.createElement('pre'); pre.id = '__width';
  pre.textContent = document.documentElement.scrollWidth + ' ' + window.innerWidth;
  document.body.appendChild(pre); }, 500); });</script>"""
ARTIFACTS = REPO / "tests" / "artifacts"

requires_chromium = pytest.mark.skipif(
    chromium() is None, reason="no headless Chromium (chromium, chromium-browser or google-chrome) on PATH; "
    "CI installs Debian's chromium in .ci/system.d/chromium.sh")


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory) -> Path:
    """Four real tiny runs: two seeds of one configuration (one named with HTML), a 1-epoch one, and the
    untrained backbone (epochs 0, the random-init floor)."""
    db = tmp_path_factory.mktemp("sweep") / "r.duckdb"
    for extra in (("trainer.epochs=2", "seed=0"), ("trainer.epochs=2", "seed=1", f"name='{XSS}'"),
                  ("trainer.epochs=1", "seed=0"), ("trainer.epochs=0", "seed=0")):
        run_harness(*TINY, f"store.path={db}", *extra)
    return db


def expected_rows(db: Path) -> list[dict]:
    """Mean, std and n of test top-1 per epochs and protocol, straight from the DuckDB file."""
    Store(db).ingest()
    con = duckdb.connect(str(db), read_only=True)
    try:
        cur = con.execute("""
            SELECT r.epochs, e.protocol, avg(e.top1), stddev_samp(e.top1), count(*)
            FROM evals e JOIN runs r ON r.run_id = e.run_id
            WHERE e.split = 'test' AND r.status = 'completed' GROUP BY ALL""")
        return [dict(zip(["epochs", "protocol", "mean", "std", "n"], r)) for r in cur.fetchall()]
    finally:
        con.close()


def render(db: Path, tmp_path: Path, extra_head: str = "", fragment: str = "") -> tuple[str, str, Path]:
    page = tmp_path / "leaderboard.html"
    assert main(["build", "--db", str(db), "--out", str(page)]) == 0
    probe = with_collector(page, tmp_path / "probe.html", extra_head)
    dom, console = dump_dom(probe, tmp_path / "profile", fragment)
    return dom, console, page


@requires_chromium
def test_the_error_collector_catches_planted_errors(tmp_path):
    # The checks below rely on this collector: prove it reports an error, a console.error, an <img>
    # that failed to load and an alert when they do happen.
    store = Store(tmp_path / "r.duckdb")
    add_run(store, "r0", 70.0)
    planted = ("<script>throw new Error('planted error')</script><script>console.error('planted console')</script>"
               "<script>document.addEventListener('DOMContentLoaded', function () {"
               "document.body.insertAdjacentHTML('beforeend', '<img src=x onerror=alert(7)>'); });</script>")
    dom, console, _ = render(store.path, tmp_path, planted)
    errors = parse_dom(dom).errors_text
    assert "planted error" in errors and "planted console" in errors
    assert "load failed: <IMG>" in errors and "alert: 7" in errors
    assert "planted error" in console  # Chromium's own console log agrees


@requires_chromium
def test_html_in_names_and_config_values_stays_text(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    for seed in range(2):
        add_run(store, f"a{seed}", 70.0 + seed, seed=seed, name=XSS, commit="aaaa1111", finished="2025-01-01T00:00:00")
        add_run(store, f"b{seed}", 60.0 + seed, seed=seed, method="<script>alert(2)</script>", commit="bbbb2222",
                finished="2025-01-02T00:00:00")
        # CLSP on SimCLR at 10 epochs of a ConvNet: measured against the code release's claim (1000 epochs,
        # ResNet-18), which the page must show as another budget, not as a failed reproduction.
        add_run(store, f"plain{seed}", 70.0 + seed, seed=seed, dataset="cifar100", name=XSS)
        add_run(store, f"clsp{seed}", 69.0 + 1.5 * seed, seed=seed, dataset="cifar100", ratio=0.5)
    dom, console, _ = render(store.path, tmp_path)
    parsed = parse_dom(dom)
    assert parsed.errors_text == "" and "alert" not in console
    [claim] = [r for r in parsed.tables["claims"] if r["claim"] == "clsp-simclr-cifar100-knn"]
    assert claim["measured"] == "-0.75" and claim["n"] == "2" and claim["budget"] == "budget differs"
    assert claim["verdict"] == "not run at the claim's budget (at ours: consistent but not significant)"
    assert "epochs 10 vs 1000" in claim["budgetnotes"] and "backbone convnet vs resnet18" in claim["budgetnotes"]
    assert not [i for i in parsed.imgs if i.get("src") == "x"]
    cells = [cell for rows in parsed.tables.values() for row in rows for cell in row.values() if isinstance(cell, str)]
    assert XSS in cells and "<script>alert(2)</script>" in cells  # shown literally, as text


@requires_chromium
def test_filters_from_the_link_hide_other_datasets_and_epochs(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    for dataset in ("cifar10", "cifar100"):
        for epochs in (10, 20):
            add_run(store, f"{dataset}-{epochs}", 50.0 + epochs, dataset=dataset, epochs=epochs)
    dom, _, _ = render(store.path, tmp_path, fragment="#dataset=cifar100&epochs=20")
    parsed = parse_dom(dom)
    assert parsed.errors_text == ""
    hidden = lambda attrs: "display: none" in (attrs.get("style") or "")
    rankings = [a for a in parsed.sections if a.get("data-protocol")]
    assert {a["data-dataset"]: hidden(a) for a in rankings} == {"cifar10": True, "cifar100": False}
    rows = [r for r in parsed.tables["ranking"] if r["_section"]["data-dataset"] == "cifar100"]
    assert {r["_attrs"]["data-epochs"]: hidden(r["_attrs"]) for r in rows} == {"10": True, "20": False}


@requires_cifar
@requires_chromium
@pytest.mark.slow
def test_page_from_a_real_sweep_in_chromium(real_sweep, tmp_path):
    dom, console, page = render(real_sweep, tmp_path)
    parsed = parse_dom(dom)
    assert parsed.errors_text == "", parsed.errors_text
    assert "Uncaught" not in console, console

    # Every (epochs, protocol) group of the store is a ranking row with the store's numbers.
    ranking = parsed.tables["ranking"]
    expected = expected_rows(real_sweep)
    assert len(expected) >= 4 and len(ranking) == len(expected)  # 2 epochs settings x >= 2 protocols
    floors = {e["protocol"]: e["mean"] for e in expected if e["epochs"] == 0}
    assert len(floors) >= 2
    for e in expected:
        [row] = [r for r in ranking if r["_section"]["data-protocol"] == e["protocol"]
                 and r["_attrs"]["data-epochs"] == str(e["epochs"])]
        if e["epochs"] == 0:  # the random-init floor: a row of its own, not ranked
            assert row["rank"] == "floor" and row["floor"] == "random-init floor"
        else:  # how far above the floor, flagged when not by more than the row's own interval
            diff = e["mean"] - floors[e["protocol"]]
            half = 12.7062 * e["std"] / math.sqrt(2) if e["n"] == 2 else 0.0
            assert row["floor"] == (f"{diff:+.2f}" if diff > half else
                                    f"not above the floor ({diff:+.2f}, interval ±{half:.2f})")
        std = "–" if e["std"] is None else f"{e['std']:.2f}"
        assert row["mean"] == f"{e['mean']:.2f} ± {std}"
        assert row["n"] == str(e["n"])
        if e["n"] == 2:  # t(0.975, 1 df) = 12.706
            half = 12.7062 * e["std"] / math.sqrt(2)
            assert row["interval"] == f"[{e['mean'] - half:.2f}, {e['mean'] + half:.2f}]"
            assert row["names"] == XSS  # the run's name, as text
    assert not [i for i in parsed.imgs if i.get("src") == "x"]
    # The charts were drawn by plotly.js (learning curves and throughput at least).
    assert dom.count('class="main-svg"') >= 3

    # The primary protocol (the first of eval.knn) comes first and is marked; the claims open the page.
    blocks = [a for a in parsed.sections if a.get("data-primary")]
    assert blocks[0]["data-protocol"] == "knn:cosine:k=200:T=0.1" and blocks[0]["data-primary"] == "yes"
    assert [a["data-primary"] for a in blocks].count("yes") == 1
    assert "claims" not in parsed.tables and "No claim is measured by the runs in this store yet." in dom
    assert {r["claim"] for r in parsed.tables["claims-unmeasured"]} >= {"scorecl-cifar10", "clsp-nnclr-cifar10"}

    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(page, ARTIFACTS / "leaderboard.html")
    for width in (1400, 1000):
        # Nothing runs off the page: wide tables scroll inside their own box.
        wide = with_collector(page, tmp_path / f"probe{width}.html", WIDTH_PROBE)
        proc = browser(wide, tmp_path / f"profile{width}", "--dump-dom", f"--window-size={width},2600")
        assert proc.returncode == 0, proc.stderr[-2000:]
        widths = proc.stdout.split('<pre id="__width">', 1)[1].split("</pre>", 1)[0].split()
        assert int(widths[0]) <= int(widths[1]), (width, widths)
        shot = ARTIFACTS / f"leaderboard-{width}.png"
        shot.unlink(missing_ok=True)
        proc = browser(tmp_path / "probe.html", tmp_path / f"profile-shot{width}", f"--screenshot={shot}",
                       f"--window-size={width},2600", "--hide-scrollbars")
        assert proc.returncode == 0 and shot.stat().st_size > 50_000, proc.stderr[-2000:]
        print(f"screenshot: {shot}")
