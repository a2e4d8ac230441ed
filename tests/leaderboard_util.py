"""Helpers for the leaderboard tests: synthetic runs written through the store, and headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from harness.store import Store

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")

# Injected first into <head> of a copy of the page: every uncaught error, failed resource load
# (capture phase: an <img src=x> that got created fails to load), console.error and alert() call
# is written as text into <pre id="__errors">, which --dump-dom then shows.
COLLECTOR = """<script>
(function () {
  var pre = document.createElement('pre');
  pre.id = '__errors';
  document.documentElement.appendChild(pre);
  function note(kind, text) { pre.textContent += kind + ': ' + text + '\\n'; }
  window.addEventListener('error', function (e) {
    var t = e.target && e.target !== window ? 'load failed: <' + e.target.tagName + '> ' + (e.target.src || '')
                                            : (e.message || String(e.error));
    note('error', t);
  }, true);
  window.addEventListener('unhandledrejection', function (e) { note('rejection', String(e.reason)); });
  var original = console.error;
  console.error = function () {
    note('console.error', Array.prototype.join.call(arguments, ' '));
    original.apply(console, arguments);
  };
  window.alert = function (m) { note('alert', String(m)); };
})();
</script>"""


def chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def with_collector(page: Path, out: Path, extra_head: str = "") -> Path:
    text = page.read_text(encoding="utf-8")
    out.write_text(text.replace("<head>", "<head>" + COLLECTOR + extra_head, 1), encoding="utf-8")
    return out


def browser(page: Path, profile: Path, *args: str, timeout: float = 240,
            fragment: str = "") -> subprocess.CompletedProcess:
    exe = chromium()
    assert exe is not None
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr",
           "--v=0", "--virtual-time-budget=20000", *args, page.resolve().as_uri() + fragment]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def dump_dom(page: Path, profile: Path, fragment: str = "") -> tuple[str, str]:
    """(the DOM after scripts ran, Chromium's console lines)."""
    proc = browser(page, profile, "--dump-dom", fragment=fragment)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = "\n".join(line for line in proc.stderr.splitlines() if "CONSOLE" in line)
    return proc.stdout, console


class DomTables(HTMLParser):
    """Rows of the page's tables (by table class) as {cell class: text}, plus every <img> seen."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.imgs: list[dict[str, str | None]] = []
        self.errors_text = ""
        self._table: str | None = None
        self._row: dict[str, Any] | None = None
        self._cell: str | None = None
        self._in_errors = False
        self._section: dict[str, str | None] = {}
        self.sections: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        elif tag in ("section", "details") and "data-dataset" in a:
            self._section = a
            self.sections.append(a)
        elif tag == "table":
            self._table = a.get("class") or ""
            self.tables.setdefault(self._table, [])
        elif tag == "tr" and self._table is not None and "class" in a:
            self._row = {"_attrs": a, "_section": self._section}
        elif tag == "td" and self._row is not None:
            self._cell = a.get("class") or ""
            self._row[self._cell] = ""
        elif tag == "pre" and a.get("id") == "__errors":
            self._in_errors = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "pre":
            self._in_errors = False
        elif tag in ("section", "details"):
            self._section = {}

    def handle_data(self, text: str) -> None:
        if self._cell is not None and self._row is not None:
            self._row[self._cell] += text
        if self._in_errors:
            self.errors_text += text


def parse_dom(dom: str) -> DomTables:
    parser = DomTables()
    parser.feed(dom)
    return parser


def add_run(store: Store, run_id: str, top1: float, *, seed: int = 0, commit: str = "aaaa1111", method: str = "simclr",
            weighting: str = "none", ratio: float = 0.0, lr: float = 0.05, epochs: int = 10, dataset: str = "cifar10",
            name: str | None = None, protocol: str = "knn:cosine:k=200:T=0.1", finished: str = "2025-01-01T00:00:00",
            metric_epochs: int = 3, dirty: bool = False, fields: dict[str, Any] | None = None,
            row: dict[str, Any] | None = None) -> None:
    """One completed run shaped like the harness's rows (config JSON with the same top-level groups).

    `fields` sets more config values by dotted name ({"trainer.sync_bn": False}); `row` more columns of
    the runs row ({"weighting_variant": "scorecl_tiny"}).
    """
    positives = "clsp" if ratio > 0 else "none"
    config = {"method": {"name": method, "temperature": 0.2}, "dataset": {"name": dataset},
              "backbone": {"name": "convnet"}, "weighting": {"name": weighting},
              "positives": {"name": positives, "ratio": ratio}, "trainer": {"lr": lr, "epochs": epochs},
              "seed": seed, "name": name, "store": {"path": "/somewhere"}}
    for dotted, value in (fields or {}).items():
        *groups, leaf = dotted.split(".")
        node = config
        for group in groups:
            node = node.setdefault(group, {})
        node[leaf] = value
    store.write("runs", [{"run_id": run_id, "run_key": f"k-{run_id}", "name": name, "status": "completed",
                          "method": method, "dataset": dataset, "backbone": "convnet", "weighting": weighting,
                          "positives": positives, "synthetic_ratio": ratio, "seed": seed, "epochs": epochs,
                          "batch_size": 128, "lr": lr, "config": json.dumps(config, sort_keys=True),
                          "git_commit": commit, "git_dirty": dirty, "device_name": "cpu", "world_size": 1,
                          "started_at": finished, "finished_at": finished, "objective": top1, "epochs_done": epochs,
                          **(row or {})}])
    store.write("evals", [{"run_id": run_id, "run_key": f"k-{run_id}", "protocol": protocol, "split": "test",
                           "top1": top1, "top5": 99.0, "epoch": epochs}])
    store.write("metrics", [{"run_id": run_id, "run_key": f"k-{run_id}", "epoch": e + 1, "name": n, "value": v}
                            for e in range(metric_epochs)
                            for n, v in (("loss", 5.0 - e), ("knn_top1", top1 - metric_epochs + e + 1),
                                         ("images_per_s", 1000.0 + seed))])
