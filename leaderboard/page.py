"""`python -m leaderboard build`: one self-contained HTML page with the tables and Plotly charts.

Safety: every string that comes from the store (run names, tags, config values, methods) reaches
the page either as HTML-escaped text built here, or inside a JSON blob whose `<`, `>` and `&` are
\\u-escaped and which the page's script hands to Plotly; strings that Plotly draws (legend names,
hover text) are HTML-escaped too, because Plotly reads a few tags in them. The page's own script
never uses innerHTML.

Speed: aggregates come from DuckDB (leaderboard.data); Python only formats the aggregated rows,
and learning curves are drawn for each ranking's top configurations, at most 100 points each.
"""

from __future__ import annotations

import csv
import html
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import duckdb

from harness.atomic import write_text_atomic
from leaderboard import artifacts as artifact_store
from leaderboard import claims, data, regress
from leaderboard.stats import t_halfwidth

REFERENCES = Path(__file__).with_name("references.csv")
TOP_CURVES = 8  # configurations per ranking whose learning curves are drawn
TOP_SERIES = 10  # configurations per ranking drawn across commits
MAX_REGRESSION_ROWS = 300


def esc(value: Any) -> str:
    """Text for HTML (element content or a quoted attribute)."""
    return html.escape("" if value is None else str(value), quote=True)


def plot_text(value: Any) -> str:
    """Text for Plotly labels: Plotly interprets <br>, <b>, <a> ... in them, so escape."""
    return html.escape("" if value is None else str(value), quote=False)


def num(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def setting_label(row: dict[str, Any]) -> str:
    ratio = row.get("synthetic_ratio") or 0
    return (f"{row['method']} · {row['backbone']} · w={row['weighting']} · {row.get('positives') or 'none'} "
            f"r={ratio:g} · {row['epochs']}ep")


def table(headers: list[str], body: Iterable[str], css: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    # In a box that scrolls sideways, so that a wide table never runs off a narrow screen.
    return (f'<div class="scroll"><table class="{css}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def row_html(cells: list[tuple[str, Any]], attrs: dict[str, Any] | None = None) -> str:
    """A table row; each cell is (css class, text); text is escaped here."""
    a = "".join(f' data-{k}="{esc(v)}"' for k, v in (attrs or {}).items())
    return f'<tr class="f"{a}>' + "".join(f'<td class="{c}">{esc(v)}</td>' for c, v in cells) + "</tr>"


class Page:
    """Collects sections and figures, then writes the HTML."""

    def __init__(self) -> None:
        self.sections: list[str] = []
        self.figures: dict[str, dict[str, Any]] = {}

    def figure(self, traces: list[dict[str, Any]], layout: dict[str, Any]) -> str:
        fid = f"fig{len(self.figures)}"
        layout = {"height": 340, "margin": {"l": 60, "r": 20, "t": 40, "b": 50}, **layout}
        if "title" in layout:  # left-aligned, so that Plotly's toolbar (top right) does not cover it
            layout["title"] = {"x": 0.01, "xanchor": "left", **layout["title"]}
        self.figures[fid] = {"data": traces, "layout": layout}
        return f'<div class="plot" id="{fid}"></div>'


# ---------------------------------------------------------------------------------------------- sections
def hyper_parameters(configs: list[dict[str, Any]]) -> dict[str, str]:
    """config_key -> the values of the settings that differ between the configurations of one setting."""
    flats = {c["config_key"]: data.flatten(json.loads(c["identity"] or "{}")) for c in configs}
    seen: dict[str, set[str]] = defaultdict(set)
    for f in flats.values():
        for k, v in f.items():
            seen[k].add(repr(v))
    # A key missing from some configurations also varies (None stands for it).
    varying = sorted(k for k, values in seen.items() if len(values) > 1 or any(k not in f for f in flats.values()))
    out = {}
    for c in configs:
        f = flats[c["config_key"]]
        if varying:
            out[c["config_key"]] = ", ".join(f"{k}={f.get(k)}" for k in varying)
        else:  # one configuration tried: show the learning rate actually used and the batch
            out[c["config_key"]] = "" if c.get("lr") is None else f"lr={c['lr']:.4g}, bs={c['batch_size']}"
    return out


def claims_section(page: Page, con: duckdb.DuckDBPyConnection) -> None:
    """Each paper's claim beside what we measured: verdict, and the budget as its own badge. Claims this store
    has no runs for are listed once, folded, below the measured ones."""
    results = claims.check(con, claims.load())
    body, unmeasured = [], []
    for r, cells in zip(results, claims.text_rows(results)):
        if r["verdict"] == "not measured":
            unmeasured.append(row_html([
                ("claim", r["claim"]), ("paper", r["paper"]), ("what", r["claim_text"]), ("method", r["method"]),
                ("dataset", r["dataset"]), ("protocol", r["protocol"]), ("claimed", cells["claimed"])],
                {"dataset": r["dataset"], "verdict": r["verdict"]}))
            continue
        badge = {"matches": "budget matches", "differs": "budget differs", "unknown": "budget unknown"}[r["budget"]]
        body.append(row_html([
            ("claim", r["claim"]), ("paper", r["paper"]), ("what", r["claim_text"]), ("method", r["method"]),
            ("protocol", r["protocol"]), ("claimed", cells["claimed"]), ("measured", cells["measured"]),
            ("interval", cells["95% interval"]), ("n", r["n"]), ("verdict", r["reading"]),
            ("budget", badge), ("budgetnotes", "; ".join(r["budget_notes"] + claims.budget_words(r["our_budget"]))),
        ], {"dataset": r["dataset"], "verdict": r["verdict"], "budget": r["budget"]}))
    page.sections.append(
        "<p>Each claim of the papers (<code>leaderboard/claims.csv</code>) beside our measurement: for an add-on, "
        "the paired difference over seeds at the best configuration without it (as in the add-on table); "
        "95% t-interval. <b>reproduced</b>: the interval lies above what the claim asserts; <b>contradicted</b>: "
        "below it; otherwise not significant. A result at another budget is shown as such, not as a failed "
        "reproduction.</p>"
        + (table(["claim", "paper", "what the source says", "method", "protocol", "claimed (points)", "measured",
                  "95% interval", "n", "verdict", "budget", "budget: ours vs the claim's"], body, "claims")
           if body else "<p>No claim is measured by the runs in this store yet.</p>")
        + (f"<details><summary>{len(unmeasured)} claim(s) not measured in this store (no matching runs)</summary>"
           + table(["claim", "paper", "what the source says", "method", "dataset", "protocol", "claimed (points)"],
                   unmeasured, "claims-unmeasured") + "</details>" if unmeasured else ""))


def block_order(configs: list[dict[str, Any]]) -> tuple[list[tuple[str, str]], dict[str, str | None]]:
    """(every dataset x protocol, each dataset's primary protocol first; the primary protocol per dataset).

    A dataset's primary protocol is the one most of its configurations were run with as primary.
    """
    votes: dict[str, Counter] = defaultdict(Counter)
    protocols: dict[str, set[str]] = defaultdict(set)
    for c in configs:
        protocols[c["dataset"]].add(c["protocol"])
        if c["protocol"] == data.primary_protocol(c["identity"]):
            votes[c["dataset"]][c["protocol"]] += 1
    primary = {d: (votes[d].most_common(1)[0][0] if votes[d] else None) for d in protocols}
    order = [(d, p) for d in sorted(protocols) for p in sorted(protocols[d], key=lambda p: (p != primary[d], p))]
    return order, primary


def tie_ranks(members: list[dict[str, Any]]) -> list[str]:
    """Rank labels of rows sorted by mean. A row whose 95% interval overlaps its neighbour's is marked a tie
    and shares the rank of the row above it; without an interval (one seed) the order is not supported
    either, so such a row ties too."""
    labels, rank = [], 1
    for i, m in enumerate(members):
        above = i > 0 and _overlaps(members[i - 1], m)
        if i > 0 and not above:
            rank = i + 1
        below = i + 1 < len(members) and _overlaps(m, members[i + 1])
        labels.append(f"{rank} (tie)" if above or below else str(rank))
    return labels


def _overlaps(upper: dict[str, Any], lower: dict[str, Any]) -> bool:
    h1, h2 = t_halfwidth(upper["std"], upper["n"]), t_halfwidth(lower["std"], lower["n"])
    return h1 is None or h2 is None or upper["mean"] - h1 <= lower["mean"] + h2


def floor_text(m: dict[str, Any], floor: dict[str, Any] | None) -> str:
    """How far a trained row is above its backbone's untrained floor; 'not above ...' when the gap is within
    the row's own 95% interval (or below zero with one seed)."""
    if m["epochs"] == 0:
        return "random-init floor"
    if floor is None:
        return "no floor run for this backbone"
    diff = m["mean"] - floor["mean"]
    half = t_halfwidth(m["std"], m["n"]) or 0.0
    return f"{diff:+.2f}" if diff > half else f"not above the floor ({diff:+.2f}, interval ±{half:.2f})"


def addon_text(m: dict[str, Any], group: str) -> str:
    """The add-on's config option with its artifact's budget: 'scorecl_tiny (score net 1 ep, 16·32 ch)'."""
    name = str(m[group])
    if name == "none":
        return name
    flat = data.flatten(json.loads(m["identity"] or "{}"))
    net, what = ("weighting.score_net", "score net") if group == "weighting" else ("positives.diffusion", "DDPM")
    epochs, channels = flat.get(f"{net}.epochs"), flat.get(f"{net}.unet.block_out_channels")
    if epochs is None:
        return name
    width = f", {'·'.join(str(c) for c in channels)} ch" if isinstance(channels, list) else ""
    extra = f", K={flat['positives.candidates']}" if group == "positives" and "positives.candidates" in flat else ""
    return f"{name} ({what} {epochs} ep{width}{extra})"


def warmup_note(m: dict[str, Any]) -> str:
    """The peak learning rate the run actually reached, when a linear warm-up longer than the run cut it short."""
    flat = data.flatten(json.loads(m["identity"] or "{}"))
    try:
        warmup, epochs = float(flat.get("trainer.warmup_epochs") or 0), int(m["epochs"] or 0)
        start, lr = float(flat.get("trainer.warmup_start_lr") or 0), float(m["lr"])
    except (TypeError, ValueError):
        return ""
    if epochs <= 0 or warmup <= epochs:
        return ""
    reached = start + (lr - start) * epochs / warmup
    return f" ⚠ warm-up {warmup:g} ep > the {epochs}-ep run: peak lr reached {reached:.3g}, not {lr:.3g}"


def cost_text(m: dict[str, Any]) -> str:
    if m.get("device_hours") is None:
        return "–"
    shared = f" + {m['artifact_hours']:.3g} h artifacts (its share)" if m.get("artifact_hours") else ""
    return f"{m['device_hours']:.3g} h ({m['devices']}){shared}"


# Ranking columns: (header, cell class, value); a column whose text is the same in every row of a block
# is folded into the block's heading instead (FOLDABLE), an empty names column is left out.
RANK_COLUMNS = [
    ("method", "method", lambda m: m["method"]), ("weighting", "weighting", lambda m: addon_text(m, "weighting")),
    ("positives", "positives", lambda m: addon_text(m, "positives")),
    ("synthetic ratio", "ratio", lambda m: f"{m['synthetic_ratio'] or 0:g}"),
    ("backbone", "backbone", lambda m: m["backbone"]), ("epochs", "epochs", lambda m: m["epochs"]),
    ("top-1 mean ± std", "mean", lambda m: f"{num(m['mean'])} ± {num(m['std'])}"),
    ("n seeds", "n", lambda m: m["n"]), ("95% interval", "interval", lambda m: interval_of(m)),
    ("best hyper-parameters", "hparams", lambda m: m["hparams"]),
    ("configs tried", "tried", lambda m: m["tried"]),
    ("device-hours, all seeds (device)", "cost", cost_text),
    ("run names", "names", lambda m: m["names"] or ""),
]
FOLDABLE = {"method", "weighting", "positives", "ratio", "backbone", "epochs", "tried", "hparams", "cost"}


def interval_of(m: dict[str, Any]) -> str:
    half = t_halfwidth(m["std"], m["n"])
    return f"[{num(m['mean'] - half)}, {num(m['mean'] + half)}]" if half is not None else "one seed"


def rankings(page: Page, configs: list[dict[str, Any]], refs: list[dict[str, Any]],
             artifact_share: dict[str, float] | None = None) -> dict[tuple[str, str], list[dict[str, Any]]]:
    by_setting: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for c in configs:
        by_setting[(c["dataset"], c["protocol"], *(c[k] for k in data.SETTING))].append(c)
    best: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for members in by_setting.values():
        hp = hyper_parameters(members)
        top = min(members, key=lambda m: m["rank_in_setting"])
        best[(top["dataset"], top["protocol"])].append({
            **top, "hparams": hp[top["config_key"]] + warmup_note(top), "tried": len(members),
            "artifact_hours": (artifact_share or {}).get(top["config_key"], 0.0) * top["n"]})
    order, primary = block_order(configs)
    out = {}
    for i, (dataset, protocol) in enumerate(order):
        members = sorted(best[(dataset, protocol)], key=lambda m: -m["mean"])
        cells = [[(css, get(m)) for _, css, get in RANK_COLUMNS] for m in members]
        keep, folded = [], []
        for j, (header, css, _) in enumerate(RANK_COLUMNS):
            values = {str(row[j][1]) for row in cells}
            if css == "names" and values == {""}:
                continue
            if css in FOLDABLE and len(values) == 1 and len(members) > 1:
                folded.append(f"{header} {values.pop()}")
                continue
            keep.append(j)
        # Untrained backbones (epochs 0) are the floor of their backbone, not contestants: "floor" in the
        # rank column, and each trained row says how far above its backbone's floor it is.
        trained = [m for m in members if m["epochs"] != 0]
        ranks = dict(zip((m["config_key"] for m in trained), tie_ranks(trained)))
        floors = {}
        for m in members:
            if m["epochs"] == 0 and (m["backbone"] not in floors or m["mean"] > floors[m["backbone"]]["mean"]):
                floors[m["backbone"]] = m
        body = []
        for m, row in zip(members, cells):
            extra = [("floor", floor_text(m, floors.get(m["backbone"])))] if floors else []
            below = bool(extra) and extra[0][1].startswith("not above")
            body.append(row_html([("rank", ranks.get(m["config_key"], "floor"))] + [row[j] for j in keep] + extra,
                                 {"config": m["config_key"], "epochs": m["epochs"],
                                  **({"floor": "yes"} if m["epochs"] == 0 else {}),
                                  **({"below-floor": "yes"} if below else {})}))
        is_primary = protocol == primary[dataset]
        heading = (f"{esc(dataset)} — {esc(protocol)}" + (' <span class="badge primary">primary protocol</span>'
                                                          if is_primary else "") + " (test top-1 %)")
        page.sections.append(
            f'<section class="block f" data-dataset="{esc(dataset)}" data-protocol="{esc(protocol)}"'
            f' data-primary="{"yes" if is_primary else "no"}"><h3>{heading}</h3>'
            + (f'<p class="folded">In every row: {esc(" · ".join(folded))}</p>' if folded else "")
            + table(["#"] + [RANK_COLUMNS[j][0] for j in keep] + (["vs random-init floor"] if floors else []),
                    body, "ranking") + "</section>")
        out[(dataset, protocol)] = members
        if i + 1 == len(order) or order[i + 1][0] != dataset:  # the dataset's published numbers, once
            ours = [m for (d, _), ms in out.items() if d == dataset for m in ms]
            page.sections.append(beside(refs, dataset, ours))
    return out


def load_references(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """The published numbers shipped with the package plus any in the store's references table."""
    refs = list(csv.DictReader(REFERENCES.open()))
    stored = data.rows(con, 'SELECT * FROM "references"')
    return refs + [{k: ("" if v is None else v) for k, v in r.items()} for r in stored]


REF_HEADERS = ["source", "method", "backbone", "epochs", "batch", "top-1", "protocol", "note"]


def reference_rows(refs: list[dict[str, Any]]) -> list[str]:
    return [row_html([("source", r["source"]), ("method", r["method"]), ("backbone", r.get("backbone", "")),
                      ("epochs", r.get("epochs", "")), ("batch", r.get("batch_size", "")),
                      ("top1", r["top1"] or "claim"), ("protocol", r["protocol"]), ("note", r.get("note", ""))])
            for r in sorted(refs, key=lambda r: (r["protocol"], -float(r["top1"] or 0)))]


def beside(refs: list[dict[str, Any]], dataset: str, ours: list[dict[str, Any]]) -> str:
    """Published rows for the methods ranked on one dataset (a method also matches e.g. 'clsp-simclr'), once
    per dataset, each marked "budget differs" when no ranked row of ours ran its backbone and epochs."""
    methods = {str(m["method"]).lower() for m in ours}
    budgets = {(str(m["backbone"]), str(m["epochs"])) for m in ours if m["epochs"] != 0}  # not the floor
    chosen = [r for r in refs if r["dataset"] == dataset and any(m and m in r["method"] for m in methods)]
    if not chosen:
        return ""
    rows = []
    ours_text = ", ".join(f"{b} {e} ep" for b, e in sorted(budgets))
    for r in sorted(chosen, key=lambda r: (r["protocol"], -float(r["top1"] or 0))):
        same = (str(r.get("backbone", "")), str(r.get("epochs", ""))) in budgets
        rows.append(row_html([("source", r["source"]), ("method", r["method"]), ("backbone", r.get("backbone", "")),
                              ("epochs", r.get("epochs", "")), ("batch", r.get("batch_size", "")),
                              ("top1", r["top1"] or "claim"), ("protocol", r["protocol"]),
                              ("budget", "same budget" if same else "budget differs"),
                              ("note", r.get("note", ""))], {"budget": "same" if same else "differs"}))
    return (f'<section class="block f" data-dataset="{esc(dataset)}"><h3>{esc(dataset)}: published numbers for '
            f"these methods</h3><p>Their protocols, single runs, their budgets (ours: {esc(ours_text)}): not ranked "
            "with ours.</p>"
            + table([*REF_HEADERS[:-1], "comparable?", "note"], rows, "refs beside") + "</section>")


def all_references(page: Page, refs: list[dict[str, Any]], datasets: list[str]) -> None:
    by_dataset: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in refs:
        by_dataset[r["dataset"]].append(r)
    order = [d for d in datasets if d in by_dataset] + sorted(d for d in by_dataset if d not in datasets)
    for dataset in order:
        page.sections.append(
            f'<details class="block f" data-dataset="{esc(dataset)}"><summary>{esc(dataset)}: '
            f"{len(by_dataset[dataset])} published numbers</summary>"
            f"{table(REF_HEADERS, reference_rows(by_dataset[dataset]), 'refs')}</details>")


LOGREG = "logreg:lbfgs"  # harness/jobs/transfer.py's protocol name for the ssl-transfer recipe
METRIC_NAMES = {"top1": "top-1", "mean_per_class": "mean per-class acc.", "map11": "11-point mAP"}


def transfer_section(page: Page, con: duckdb.DuckDBPyConnection, refs: list[dict[str, Any]] | None = None) -> None:
    """The frozen backbones' probes on other datasets (eval.transfer, python -m harness.evaluate), and the
    ssl-transfer suite's table beside SCE's published row."""
    found = data.transfer(con)
    if not found:
        page.sections.append("<p>No transfer evaluations yet: set <code>eval.transfer</code> or run "
                             "<code>python -m harness.evaluate RUN dataset=NAME</code>.</p>")
        return
    suite_table(page, found, refs or [])
    body = [row_html([("transfer", r["transfer"]), ("protocol", r["protocol"]), ("trained", r["trained_on"]),
                      ("setting", f"{r['method']} · {r['backbone']} · {r['epochs']}ep"),
                      ("metric", METRIC_NAMES.get(r["metric"], r["metric"])),
                      ("mean", num(r["mean"]) + ("" if r["std"] is None else f" ± {num(r['std'])}")), ("n", r["n"]),
                      ("config", r["config_key"])],
                     {"dataset": r["trained_on"], "protocol": r["protocol"], "transfer": r["transfer"]})
            for r in found]
    page.sections.append("<p>Frozen backbone, probed on another dataset: k-NN with the transfer set's train split "
                         "as the bank, a linear probe fitted on it, or the ssl-transfer logistic regression "
                         "(<code>logreg:lbfgs</code>); the transfer set's test score in % (the metric column says "
                         "which), mean ± std over seeds.</p>"
                         + table(["transfer dataset", "protocol", "trained on", "setting", "metric", "test %", "n",
                                  "configuration"], body, "transfer"))


def suite_table(page: Page, found: list[dict[str, Any]], refs: list[dict[str, Any]]) -> None:
    """One row per configuration with logreg:lbfgs rows: its score on each set of the suite, and the average
    over the sets it measured, beside the published rows of the same protocol (references.csv, protocol
    transfer:logreg:<metric>) and their average over the same sets."""
    published = [r for r in refs if str(r.get("protocol", "")).startswith("transfer:logreg:")]
    sets = list(dict.fromkeys(r["dataset"] for r in published))
    ours: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in found:
        if r["protocol"] == LOGREG:
            ours[(r["trained_on"], r["method"], r["backbone"], r["epochs"], r["config_key"])][r["transfer"]] = r["mean"]
    if not ours:
        return
    sets += sorted({t for scores in ours.values() for t in scores} - set(sets))
    by_source: dict[str, dict[str, float]] = defaultdict(dict)
    for r in published:
        by_source[f"{r['source']} · {r['method']}"][r["dataset"]] = float(r["top1"])
    metric = {r["dataset"]: r["protocol"].rsplit(":", 1)[-1] for r in published}
    body = []
    for (trained, method, backbone, epochs, key), scores in sorted(ours.items()):
        measured = [t for t in sets if t in scores]
        cells = [(t, num(scores[t]) if t in scores else "–") for t in sets]
        refs_there = {name: [pub[t] for t in measured if t in pub] for name, pub in by_source.items()}
        beside_text = "; ".join(f"{name}: {num(sum(v) / len(v))}" for name, v in refs_there.items()
                                if len(v) == len(measured) and v)
        body.append(row_html([("setting", f"{trained} · {method} · {backbone} · {epochs}ep"), *cells,
                              ("average", f"{num(sum(scores[t] for t in measured) / len(measured))} "
                                          f"({len(measured)} of {len(sets)})"),
                              ("published on these sets", beside_text or "–"), ("config", key)]))
    for name, pub in by_source.items():
        body.append(row_html([("setting", f"published: {name}"), *[(t, num(pub[t]) if t in pub else "–")
                                                                     for t in sets],
                              ("average", f"{num(sum(pub.values()) / len(pub))} ({len(pub)} of {len(sets)})"),
                              ("published on these sets", ""), ("config", "")], {"published": "yes"}))
    heads = [f"{t} ({METRIC_NAMES.get(metric.get(t, 'top1'), metric.get(t, 'top1'))})" for t in sets]
    page.sections.append("<p>The ssl-transfer suite: L-BFGS logistic regression on frozen pooled features, C chosen "
                         "on a validation split, refit on train + val, each set's own metric on its test split "
                         "(%). The average is over the sets measured; each published row's average over the same "
                         "sets stands beside it. Published rows are single runs at their own budget "
                         "(ResNet-50, ImageNet-1k).</p>"
                         + table(["setting", *heads, "average", "published on these sets", "configuration"], body,
                                 "transfer suite"))


def lost_runs(page: Page, con: duckdb.DuckDBPyConnection) -> None:
    """Runs whose job died without a word (harness.store.mark_lost): listed, never ranked."""
    rows = data.rows(con, """SELECT run_key, method, dataset, backbone, seed, epochs_done, epochs, attempts,
                                    finished_at, error FROM runs WHERE status = 'lost' ORDER BY finished_at DESC""")
    if not rows:
        return
    body = [row_html([("run key", r["run_key"]), ("setting", f"{r['method']} · {r['backbone']} · {r['dataset']}"),
                      ("seed", r["seed"]), ("epochs", f"{r['epochs_done'] or 0}/{r['epochs']}"),
                      ("attempts", r["attempts"]), ("last heartbeat", r["finished_at"]), ("why", r["error"])],
                     {"dataset": r["dataset"]}) for r in rows]
    page.sections.append("<h2>Lost runs</h2><p>Their job died without a word (killed, out of memory, a node "
                         "failure): no heartbeat for longer than <code>store.lost_after_s</code>, or Slurm said the "
                         "job ended. Not counted as results; the same command resumes each from its checkpoint.</p>"
                         + table(["run key", "setting", "seed", "epochs", "attempts", "last heartbeat (UTC)", "why"],
                                 body, "lost"))


def effects(page: Page, con: duckdb.DuckDBPyConnection) -> None:
    rows = data.effects(con)
    if not rows:
        page.sections.append("<p>No add-on pairs yet: an effect needs a ScoreCL run and the same configuration "
                             "without weighting (or a CLSP run at ratio r and at ratio 0) with the same seed.</p>")
        return
    by_block: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_block[(r["dataset"], r["protocol"])].append(r)
    for (dataset, protocol), members in sorted(by_block.items()):
        body = []
        for r in members:
            half = t_halfwidth(r["std"], r["n"])
            interval = f"[{num(r['mean'] - half)}, {num(r['mean'] + half)}]" if half is not None else "one pair"
            other = "weighting " + str(r["weighting"]) if r["addon"] == "positives" else \
                f"{r['positives']} r={r['synthetic_ratio'] or 0:g}"
            body.append(row_html([("addon", r["addon"]), ("treatment", r["treatment"]), ("method", r["method"]),
                                  ("backbone", r["backbone"]), ("epochs", r["epochs"]), ("other", other),
                                  ("diff", f"{r['mean']:+.2f}"), ("interval", interval), ("n", r["n"]),
                                  ("configs", r["configs"]), ("overall", f"{r['mean_over_configs']:+.2f}"),
                                  ],
                                 # The configuration hashes stay in the row (for a script), not in the width.
                                 {"epochs": r["epochs"], "config": r["config_key"], "base": r["base_key"]}))
        page.sections.append(
            f'<section class="block f" data-dataset="{esc(dataset)}" data-protocol="{esc(protocol)}">'
            f"<h3>{esc(dataset)} — {esc(protocol)}: add-on minus the same run without it (points)</h3>"
            + "<p>At the best configuration of the run without the add-on; the last two columns average the "
            "effect over every configuration tried with and without it.</p>"
            + table(["add-on", "treatment", "method", "backbone", "epochs", "other add-on", "mean paired diff",
                     "95% interval", "n seed pairs", "configs paired", "mean over configs"], body, "effects")
            + "</section>")


def epoch_axis(series: list[dict[str, Any]]) -> dict[str, Any]:
    """An x axis with whole-epoch ticks (never 1.5), at most about 10 of them."""
    last = max((e for c in series for e in c["epochs"]), default=1)
    return {"title": {"text": "epoch"}, "tickmode": "linear", "tick0": 0, "dtick": max(1, math.ceil(last / 10)),
            "tickformat": "d"}


def metric_under(protocol: str, m: dict[str, Any], series: dict[tuple[str, str], Any]) -> str | None:
    """The per-epoch metric that measures `protocol` for configuration m, if it logs one."""
    if protocol == data.primary_protocol(m["identity"]):
        return "knn_top1"
    return f"{protocol}_top1" if (m["config_key"], f"{protocol}_top1") in series else None


def learning_curves(page: Page, con: duckdb.DuckDBPyConnection,
                    ranked: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    """Per ranking block: the loss of its top configurations, each divided by its first epoch's value (methods'
    losses differ in scale: SimCLR ~6, VICReg ~50), and the top-1 per epoch under THIS block's protocol: the
    per-epoch k-NN is the run's primary protocol, an add-on protocol (online_linear) logs its own."""
    chosen = {key: members[:TOP_CURVES] for key, members in ranked.items()}
    keys = sorted({m["config_key"] for members in chosen.values() for m in members})
    names = ("loss", "knn_top1", *sorted({f"{p}_top1" for _, p in chosen if not p.startswith(("knn:", "linear:"))}))
    series = {(c["config_key"], c["name"]): c for c in data.curves(con, keys, names)}
    for (dataset, protocol), members in chosen.items():  # in the rankings' order: primary protocol first
        plots = []
        losses = [(m, series[(m["config_key"], "loss")]) for m in members if (m["config_key"], "loss") in series]
        if losses:
            traces = [{"type": "scatter", "mode": "lines+markers", "name": plot_text(setting_label(m)),
                       "x": c["epochs"], "y": [v / c["values"][0] if c["values"][0] else v for v in c["values"]],
                       "text": [f"{v:.4g}" for v in c["values"]],
                       "hovertemplate": "epoch %{x}: %{y:.3f} of the first (loss %{text})<extra>"
                                        + plot_text(m["config_key"]) + "</extra>"} for m, c in losses]
            plots.append(page.figure(traces, {"title": {"text": "training loss ÷ its first-epoch value"},
                                              "xaxis": epoch_axis([c for _, c in losses]), "showlegend": True,
                                              "legend": {"font": {"size": 10}}}))
        tops = [(m, series[(m["config_key"], metric)]) for m in members
                if (metric := metric_under(protocol, m, series)) and (m["config_key"], metric) in series]
        if tops:
            traces = [{"type": "scatter", "mode": "lines+markers", "name": plot_text(setting_label(m)),
                       "x": c["epochs"], "y": c["values"],
                       "hovertemplate": "epoch %{x}: %{y:.2f}<extra>" + plot_text(m["config_key"]) + "</extra>"}
                      for m, c in tops]
            plots.append(page.figure(traces, {"title": {"text": plot_text(f"{protocol} top-1 per epoch (%)")},
                                              "xaxis": epoch_axis([c for _, c in tops]), "showlegend": True,
                                              "legend": {"font": {"size": 10}}}))
        note = "" if tops else ("<p>No per-epoch values under this protocol: during training only the primary "
                                "k-NN protocol (and add-on protocols such as online_linear) are evaluated.</p>")
        if plots:
            page.sections.append(
                f'<section class="block f" data-dataset="{esc(dataset)}" data-protocol="{esc(protocol)}">'
                f"<h3>{esc(dataset)} — top {len(members)} of the {esc(protocol)} ranking: mean over seeds</h3>"
                f'{note}<div class="row">{"".join(plots)}</div></section>')


def across_commits(page: Page, con: duckdb.DuckDBPyConnection) -> None:
    by_config: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in data.commit_series(con, TOP_SERIES):
        by_config[(r["dataset"], r["protocol"], r["config_key"])].append(r)
    by_block: dict[tuple[str, str], list[list[dict[str, Any]]]] = defaultdict(list)
    for (dataset, protocol, _), points in by_config.items():
        if len(points) >= 2:
            by_block[(dataset, protocol)].append(points)
    if not by_block:
        page.sections.append("<p>Every configuration has runs at one commit only: no series yet.</p>")
    for (dataset, protocol), series in sorted(by_block.items()):
        traces = [{"type": "scatter", "mode": "lines+markers", "name": plot_text(setting_label(s[0])),
                   "x": [data.short_commit(p["git_commit"]) for p in s], "y": [p["mean"] for p in s],
                   "error_y": {"type": "data", "array": [p["std"] or 0 for p in s], "visible": True},
                   "text": [f"n={p['n']}" for p in s],
                   "hovertemplate": "commit %{x}: %{y:.2f} (%{text})<extra></extra>"} for s in series]
        page.sections.append(
            f'<section class="block f" data-dataset="{esc(dataset)}" data-protocol="{esc(protocol)}">'
            f"<h3>{esc(dataset)} — {esc(protocol)}: test top-1 per commit (mean ± std over seeds)</h3>"
            + page.figure(traces, {"xaxis": {"type": "category", "title": {"text": "commit (oldest first)"}},
                                   "yaxis": {"title": {"text": "top-1 %"}}, "height": 380}) + "</section>")


def regressions(page: Page, con: duckdb.DuckDBPyConnection) -> None:
    commits = data.commits_in_order(con)
    if len(commits) < 2:
        page.sections.append("<p>One commit in the store: nothing to compare yet.</p>")
        return
    base, cand = commits[-2], commits[-1]
    base_side, cand_side, notes = regress.align(regress.side_from_commit(con, base),
                                                regress.side_from_commit(con, cand))
    results = regress.compare(base_side, cand_side, with_bound=False)
    results = [r for r in results if r["verdict"] not in ("missing", "new")]
    if not results:
        both = f"{esc(data.short_commit(base))}, {esc(data.short_commit(cand))}"
        page.sections.append(f"<p>No configuration has runs at both of the two newest commits ({both}): "
                             "nothing to compare.</p>")
        return
    n_bad = sum(r["verdict"] == "REGRESSED" for r in results)
    body = [row_html([("verdict", r["verdict"]), ("dataset", r["dataset"]), ("protocol", r["protocol"]),
                      ("label", r["label"]), ("base", f"{num(r['base'])} (n={r['n_base']})"),
                      ("cand", f"{num(r['cand'])} (n={r['n_cand']})"), ("diff", num(r["diff"])),
                      ("p", "" if r["p"] is None else f"{r['p']:.3g}"), ("rule", r["rule"])],
                     {"dataset": r["dataset"], "protocol": r["protocol"], "verdict": r["verdict"]})
            for r in results[:MAX_REGRESSION_ROWS]]
    page.sections.append(
        f'<p class="verdict {"bad" if n_bad else "good"}">{n_bad} of {len(results)} configurations regressed from '
        f"commit {esc(data.short_commit(base))} to {esc(data.short_commit(cand))} (the two newest commits; rule as in "
        "<code>python -m leaderboard regress</code>).</p>"
        + "".join(f'<p class="note">{esc(note)}</p>' for note in notes)
        + table(["verdict", "dataset", "protocol", "configuration", "baseline", "candidate", "diff", "p", "rule"],
                body, "regressions"))


def throughput(page: Page, con: duckdb.DuckDBPyConnection) -> None:
    groups, with_points = data.throughput(con)
    if not groups:
        page.sections.append("<p>No throughput recorded.</p>")
        return
    traces = []
    for g in groups:
        q = g["q"]
        trace = {"type": "box", "name": plot_text(g["grp"]), "q1": [q[1]], "median": [q[2]], "q3": [q[3]],
                 "lowerfence": [q[0]], "upperfence": [q[4]], "x": [plot_text(g["grp"])]}
        if with_points:  # each run a point, named in its hover text
            trace = {"type": "box", "name": plot_text(g["grp"]), "y": g["values"], "boxpoints": "all",
                     "jitter": 0.4, "pointpos": 0, "text": [plot_text(t) for t in g["labels"]],
                     "hovertemplate": "%{y:,.0f} img/s<br>%{text}<extra></extra>"}
        traces.append(trace)
    title = "median images/s per run" + (" (each point a run)" if with_points else " (quartiles over runs)")
    page.sections.append(page.figure(traces, {"title": {"text": title}, "yaxis": {"title": {"text": "images / s"}},
                                              "showlegend": False, "height": 420}))


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and accuracy (higher), cheapest first."""
    frontier, best = [], -math.inf
    for i in sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1])):
        if points[i][1] > best:
            frontier.append(i)
            best = points[i][1]
    return frontier


def accuracy_vs_cost(page: Page, ranked: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    """Per ranking block: each setting's mean top-1 against its device-hours per seed, Pareto frontier drawn."""
    drawn = False
    for (dataset, protocol), members in ranked.items():
        costed = [m for m in members if m.get("device_hours") is not None]
        if not costed:
            continue
        points = [(m["device_hours"] / m["n"], m["mean"]) for m in costed]
        front = pareto(points)
        spread = [x for x, _ in points if x > 0]
        log = len(spread) == len(points) and max(spread) > 100 * min(spread)
        traces = [{"type": "scatter", "mode": "markers", "name": "setting (best configuration)",
                   "x": [x for x, _ in points], "y": [y for _, y in points],
                   "text": [plot_text(f"{setting_label(m)} · {m['devices']}") for m in costed],
                   "hovertemplate": "%{x:.3g} device-h per seed: %{y:.2f}%<br>%{text}<extra></extra>"},
                  {"type": "scatter", "mode": "lines", "name": "Pareto frontier", "line": {"shape": "hv"},
                   "x": [points[i][0] for i in front], "y": [points[i][1] for i in front], "hoverinfo": "skip"}]
        page.sections.append(
            f'<section class="block f" data-dataset="{esc(dataset)}" data-protocol="{esc(protocol)}">'
            f"<h3>{esc(dataset)} — {esc(protocol)}: accuracy against cost</h3>"
            + page.figure(traces, {"xaxis": {"title": {"text": "device-hours per seed (wall-clock × devices)"},
                                             "type": "log" if log else "linear"},
                                   "yaxis": {"title": {"text": "test top-1 %"}}}) + "</section>")
        drawn = True
    if not drawn:
        page.sections.append("<p>No run has both a start and an end time: no cost to plot.</p>")


def artifacts(page: Page, found: list[dict[str, Any]]) -> None:
    """The built-once artifacts (score networks, diffusion models, synthetic sets) with their build time and
    how many completed runs share it: the rankings' cost column adds each run's even share."""
    body = [row_html([("kind", m.get("kind")), ("hash", m.get("hash")), ("built", m.get("built_at")),
                      ("hours", "–" if m.get("build_seconds") is None else f"{m['build_seconds'] / 3600:.3g}"),
                      ("runs", m.get("runs", 0)), ("root", m.get("root")),
                      ("config", json.dumps(m.get("config"), sort_keys=True)[:300])])
            for m in found]
    if body:
        page.sections.append("<p>Artifacts: built once, shared by every run with the same recipe and training split "
                             "(their build time is in no run's device-hours; the rankings add each run's share).</p>"
                             + table(["kind", "hash", "built at", "build hours", "runs sharing it", "folder",
                                      "config"], body, "artifacts"))


def optuna_studies(page: Page, db: Path) -> None:
    folder = db.with_name(db.name + ".optuna")
    logs = sorted(folder.glob("*.log")) if folder.is_dir() else []
    if not logs:
        return
    import optuna  # only when a study exists: optuna is slow to import and not needed otherwise

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    parts = []
    for log in logs:
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(log)))
        for name in optuna.get_all_study_names(storage):
            study = optuna.load_study(study_name=name, storage=storage)
            done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.values]
            if not done:
                continue
            maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
            best, best_so_far = None, []
            for t in done:
                v = t.values[0]
                best = v if best is None else (max(best, v) if maximize else min(best, v))
                best_so_far.append(best)
            history = page.figure([
                {"type": "scatter", "mode": "markers", "name": "trial", "x": [t.number for t in done],
                 "y": [t.values[0] for t in done],
                 "text": [plot_text(", ".join(f"{k}={v}" for k, v in t.params.items())) for t in done],
                 "hovertemplate": "trial %{x}: %{y:.3f}<br>%{text}<extra></extra>"},
                {"type": "scatter", "mode": "lines", "name": "best so far", "x": [t.number for t in done],
                 "y": best_so_far}],
                {"title": {"text": plot_text(f"study {name}: objective per trial")},
                 "xaxis": {"title": {"text": "trial"}}})
            try:
                importances = optuna.importance.get_param_importances(study) if len(done) >= 2 else {}
            except (RuntimeError, ValueError) as e:  # e.g. one distinct value per parameter
                importances, note = {}, f"no importances: {e}"
            else:
                note = "" if importances else "importances need at least two completed trials with varied parameters"
            imp = page.figure([{"type": "bar", "orientation": "h", "x": list(importances.values()),
                                "y": [plot_text(k) for k in importances]}],
                              {"title": {"text": "parameter importance (fANOVA)"}}) if importances else ""
            parts.append(f"<h3>study {esc(name)} ({len(done)} completed trials, {esc(log.name)})</h3>"
                         f'<div class="row">{history}{imp}</div><p>{esc(note)}</p>')
    page.sections.append("".join(parts) or "<p>Optuna journals found, but no completed trials.</p>")


# ---------------------------------------------------------------------------------------------- the page
CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px 24px;color:#222}
h1{margin:0 0 4px}h2{margin-top:28px;border-bottom:2px solid #ddd}h3{margin:18px 0 6px;font-size:15px}
table{border-collapse:collapse;margin:4px 0 12px;font-size:12.5px}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3;position:sticky;top:0}
td.mean,td.interval,td.diff{white-space:nowrap;font-variant-numeric:tabular-nums}
td.names,td.hparams,td.note{max-width:320px;overflow-wrap:anywhere}
.row{display:flex;flex-wrap:wrap;gap:8px}.row .plot{flex:1 1 600px;min-width:480px}
#filters{position:sticky;top:0;background:#fff;padding:6px 0;z-index:5;border-bottom:1px solid #eee}
#filters label{margin-right:14px}.verdict.bad{color:#b00;font-weight:600}.verdict.good{color:#070}
tr[data-verdict=REGRESSED] td{background:#fde8e8}
summary{cursor:pointer;margin:6px 0}
.scroll{overflow-x:auto;max-width:100%}.badge{font-size:11px;padding:1px 6px;border-radius:8px;background:#e6f0ff}
.badge.primary{background:#dff3df;color:#064}p.folded{margin:2px 0;color:#555}
tr[data-budget=differs] td.budget{background:#fff3cd}
tr[data-floor=yes] td{background:#f4f4f4;font-style:italic}tr[data-below-floor=yes] td.floor{color:#b00;font-weight:600}
tr[data-verdict=reproduced] td.verdict{color:#070;font-weight:600}
tr[data-verdict=contradicted] td.verdict{color:#b00;font-weight:600}
td.budget{white-space:nowrap}tr[data-budget=differs] td.budget{background:#fff3cd}
tr[data-floor=yes] td{background:#f4f4f4;font-style:italic}tr[data-below-floor=yes] td.floor{color:#b00;font-weight:600}
td.what,td.budgetnotes{max-width:260px;overflow-wrap:anywhere}
table.beside td.method{max-width:200px;overflow-wrap:anywhere}table.beside{font-size:11.5px;color:#444}
"""

SCRIPT = """
(function () {
  var figures = JSON.parse(document.getElementById('figures').textContent);
  Object.keys(figures).forEach(function (id) {
    Plotly.newPlot(id, figures[id].data, figures[id].layout, {responsive: true, displaylogo: false});
  });
  var selects = document.querySelectorAll('#filters select');
  function apply() {
    var want = {}, chosen = new URLSearchParams();
    selects.forEach(function (s) {
      want[s.name] = s.value;
      if (s.value !== '') chosen.set(s.name, s.value);
    });
    document.querySelectorAll('.f').forEach(function (el) {
      var show = Object.keys(want).every(function (k) {
        var have = el.dataset[k];
        return want[k] === '' || have === undefined || have === want[k];
      });
      el.style.display = show ? '' : 'none';
    });
    history.replaceState(null, '', '#' + chosen.toString());  // a link to this view
    window.dispatchEvent(new Event('resize'));  // plots that were hidden take their width again
  }
  // Filters can come in the link: leaderboard.html#dataset=cifar10&epochs=200
  var given = new URLSearchParams(location.hash.slice(1));
  selects.forEach(function (s) {
    if (given.has(s.name)) s.value = given.get(s.name);
    s.addEventListener('change', apply);
  });
  if (location.hash.length > 1) apply();
})();
"""


def select(name: str, title: str, values: Iterable[Any]) -> str:
    options = "".join(f'<option value="{esc(v)}">{esc(v)}</option>' for v in values)
    return f'<label>{esc(title)} <select name="{esc(name)}"><option value="">all</option>{options}</select></label>'


def render(con: duckdb.DuckDBPyConnection, db: Path, cdn: bool = False) -> str:
    """The whole page for an open store connection."""
    import plotly
    import plotly.offline

    data.prepare(con)
    page = Page()
    configs = data.configurations(con)
    datasets = sorted({c["dataset"] for c in configs})
    counts = con.execute("SELECT count(*), count(*) FILTER (WHERE status = 'completed'), "
                         "count(*) FILTER (WHERE status = 'lost') FROM runs").fetchone()

    page.sections.append("<h2>Claims checked</h2>")
    claims_section(page, con)
    page.sections.append("<h2>Rankings</h2><p>One row per setting: its best configuration by mean test top-1 "
                         "over seeds (newest run per seed); 95% interval is Student's t over seeds.</p>")
    refs = load_references(con)
    built, artifact_share = artifact_store.shares(con, Path(db))
    ranked = rankings(page, configs, refs, artifact_share)
    if not ranked:
        page.sections.append("<p>No completed runs with test evaluations yet.</p>")
    lost_runs(page, con)
    page.sections.append("<h2>Transfer</h2>")
    transfer_section(page, con, refs)
    page.sections.append("<h2>Add-on effects (paired over seeds)</h2>")
    effects(page, con)
    page.sections.append("<h2>Regressions</h2>")
    regressions(page, con)
    page.sections.append("<h2>Learning curves</h2>")
    learning_curves(page, con, ranked)
    page.sections.append("<h2>Each configuration across commits</h2>")
    across_commits(page, con)
    page.sections.append("<h2>Cost</h2>")
    accuracy_vs_cost(page, ranked)
    artifacts(page, built)
    page.sections.append("<h2>Throughput per run</h2>")
    throughput(page, con)
    studies_at = len(page.sections)
    optuna_studies(page, db)
    if len(page.sections) > studies_at:
        page.sections.insert(studies_at, "<h2>Optuna studies</h2>")
    page.sections.append("<h2>All published references</h2>")
    all_references(page, refs, datasets)

    filters = (select("dataset", "dataset", datasets)
               + select("protocol", "protocol", sorted({c["protocol"] for c in configs}))
               + select("epochs", "epochs", sorted({c["epochs"] for c in configs if c["epochs"] is not None})))
    figures = json.dumps(page.figures, separators=(",", ":"), allow_nan=False, default=_json_default)
    # Inside <script> a "</script>" in any string would end it: \\u-escape the characters HTML sees.
    figures = figures.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    plotly_js = (f'<script src="https://cdn.plot.ly/plotly-{plotly.offline.get_plotlyjs_version()}.min.js"></script>'
                 if cdn else f"<script>{plotly.offline.get_plotlyjs()}</script>")
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Leaderboard</title>"
            f"<style>{CSS}</style>{plotly_js}</head><body>"
            f"<h1>Leaderboard</h1><p>Store <code>{esc(db)}</code>: {counts[1]} completed of {counts[0]} runs"
            + (f" ({counts[2]} lost)" if counts[2] else "") + ", "
            f"{len(configs)} configuration × protocol groups.{rejected_note(db)}</p>"
            f'<div id="filters">{filters}</div>' + "".join(page.sections)
            + f'<script type="application/json" id="figures">{figures}</script><script>{SCRIPT}</script>'
            "</body></html>")


def rejected_note(db: Path) -> str:
    """A sentence on the spool files the store refused (quarantined, not ingested), or nothing."""
    from harness.store import Store

    store = Store(db)
    n = store.rejected()
    return (f" <strong>{n} spool file(s) rejected</strong> (not ingested): see <code>{esc(store.rejected_dir)}</code>,"
            " each with a <code>.why</code> line." if n else "")


def _json_default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def build(db: Path, out: Path, cdn: bool = False) -> int:
    """Write the page for store `db` to `out`; returns its size in bytes."""
    from harness.store import Store

    if not db.exists() and not Store(db).pending():
        raise SystemExit(f"error: --db = {db}: no such store")
    with Store(db).connect() as con:
        text = render(con, Path(db), cdn)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, text)  # a page being served is never seen half-written
    return len(text.encode())
