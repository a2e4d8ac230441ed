"""The papers' claims (claims.csv) checked against the store: measured effect, verdict, budget match.

A claim is data: which paper, which method(s), which add-on, dataset and protocol family, what it
claims and at what budget (epochs, backbone, training-set size, the artifact's training epochs and
channel widths, and the views: `2x224`, or SCE's multi-crop `2x224+192+160+128+96`, the view sizes
of the run's augment recipe in order). `?` in a budget field means the source does not state it; an empty field means it
does not apply (no artifact).

Two kinds of claim:
  effect  the add-on's gain over the same run without it, in points. Measured as the paired
          difference over seeds that the page's add-on table shows (leaderboard.data.effects).
          `claimed_min` is the smallest gain the claim asserts (0 for "up to +3": a gain at all).
  top1    an absolute test top-1 at the claim's budget; `claimed_min` is that value. With protocol
          `transfer:logreg` the claim's dataset is a transfer set and the value its ssl-transfer metric
          (mean per-class accuracy, 11-point mAP or top-1), measured by the runs' `logreg:lbfgs` rows.

Verdicts, from the 95% t-interval [lo, hi] of the measured value (the statistics alone):
  reproduced                      lo > claimed_min (top1: hi >= claimed_min, the claim is reached)
  contradicted                    hi < claimed_min
  consistent but not significant  otherwise, or one seed (no interval)
  not measured                    no run matches
The budget is reported beside the verdict, never folded into it: a result at a budget that differs
from the claim's reads "not run at the claim's budget", whatever the numbers say; where the source
does not state the budget it reads "budget unknown", not a mismatch. ScoreCL is that case: neither
../shared/docs/references.md nor methods.md (5.2 lists the training budget and the score network
as unconfirmed) states epochs, backbone, training images or the score network's size, so every
budget field of its claims is `?`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import duckdb

from leaderboard import data
from leaderboard.stats import t_halfwidth

CLAIMS = Path(__file__).with_name("claims.csv")
UNKNOWN = "?"
# Training-split sizes when a run used all of it (dataset.train_size null).
FULL_TRAIN = {"cifar10": 50000, "cifar100": 50000, "imagenet1k": 1281167, "imagenet100": 126689}
VERDICTS = ("reproduced", "consistent but not significant", "contradicted", "not measured")
FIELDS = ("id", "paper", "methods", "addon", "treatment", "dataset", "protocol", "kind", "claimed_min", "claimed",
          "claim_text", "epochs", "backbone", "train_size", "artifact_epochs", "artifact_channels", "source",
          "views")
BUDGET = ("epochs", "backbone", "train_size", "artifact_epochs", "artifact_channels", "views")
# Columns a claims file may leave out (read as empty: does not apply): views came after the others.
OPTIONAL = ("views",)
TRANSFER_LOGREG = "transfer:logreg"  # a top1 claim on a transfer set (harness/jobs/transfer.py's logreg rows)


def load(path: Path = CLAIMS) -> list[dict[str, str]]:
    """The claims of `path`; a missing column or a bad kind/number is one clear error line."""
    with path.open(newline="") as f:
        claims = list(csv.DictReader(f))
    for line, c in enumerate(claims, 2):
        for k in OPTIONAL:
            c[k] = c.get(k) or ""
        missing = [k for k in FIELDS if c.get(k) is None]
        if missing:
            raise SystemExit(f"error: {path}:{line}: column(s) {', '.join(missing)} missing; "
                             f"a claims file has the columns {', '.join(FIELDS)}")
        if c["kind"] not in ("effect", "top1"):
            raise SystemExit(f"error: {path}:{line}: kind = {c['kind']!r}; allowed: effect, top1")
        if c["kind"] == "effect" and c["addon"] not in ("weighting", "positives"):
            raise SystemExit(f"error: {path}:{line}: addon = {c['addon']!r}; an effect claim needs weighting or "
                             "positives")
        for k in ("claimed_min", "claimed"):
            try:
                float(c[k])
            except ValueError:
                raise SystemExit(f"error: {path}:{line}: {k} = {c[k]!r}; allowed: a number") from None
    return claims


def protocol_matches(family: str, protocol: str) -> bool:
    """'knn' matches every knn:... protocol, 'linear' every offline linear:... one."""
    return protocol == family or protocol.startswith(family + ":")


def verdict(kind: str, mean: float | None, half: float | None, n: int, claimed_min: float) -> str:
    if n == 0 or mean is None:
        return "not measured"
    if half is None:
        return "consistent but not significant"
    lo, hi = mean - half, mean + half
    if kind == "top1":
        return "reproduced" if hi >= claimed_min else "contradicted"
    if lo > claimed_min:
        return "reproduced"
    if hi < claimed_min:
        return "contradicted"
    return "consistent but not significant"


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def our_budget(identity: str | None, row: dict[str, Any], addon: str) -> dict[str, str]:
    """The budget of one configuration, as strings comparable with a claim's budget fields."""
    tree = json.loads(identity or "{}")
    train = _get(tree, "dataset.train_size")
    if train is None and row["dataset"] in FULL_TRAIN:
        train = FULL_TRAIN[row["dataset"]] - int(_get(tree, "dataset.val_size") or 0)
    net = {"weighting": "weighting.score_net", "positives": "positives.diffusion"}.get(addon)
    channels = _get(tree, f"{net}.unet.block_out_channels") if net else None
    artifact_epochs = _get(tree, f"{net}.epochs") if net else None
    return {"epochs": str(row["epochs"]), "backbone": str(row["backbone"]),
            "train_size": UNKNOWN if train is None else str(train),
            "artifact_epochs": UNKNOWN if artifact_epochs is None else str(artifact_epochs),
            "artifact_channels": ";".join(str(c) for c in channels) if channels else UNKNOWN,
            "views": view_sizes(tree)}


def view_sizes(tree: dict[str, Any]) -> str:
    """The run's views as `2x224+192+160+128+96`: each view's size in order (its pipeline's `size`, else
    dataset.image_size), runs of one size counted; `?` when the config does not say."""
    views, pipelines = _get(tree, "augment.views"), _get(tree, "augment.pipelines")
    if not isinstance(views, list) or not isinstance(pipelines, dict):
        return UNKNOWN
    sizes = [_get(pipelines, f"{v}.size") or _get(tree, "dataset.image_size") for v in views]
    if not sizes or any(size is None for size in sizes):
        return UNKNOWN
    runs: list[list] = []
    for size in sizes:
        if runs and runs[-1][0] == size:
            runs[-1][1] += 1
        else:
            runs.append([size, 1])
    return "+".join(f"{n}x{size}" if n > 1 else str(size) for size, n in runs)


def compare_budget(claim: dict[str, str], ours: dict[str, str]) -> tuple[str, list[str]]:
    """('matches' | 'differs' | 'unknown', the differences and unstated fields as words)."""
    differs, unknown = [], []
    for k in BUDGET:
        want = claim[k].strip()
        if want == "":
            continue  # does not apply to this claim
        if want == UNKNOWN or ours[k] == UNKNOWN:
            unknown.append(k)
        elif want != ours[k]:
            differs.append(f"{k} {ours[k]} vs {want}")
    notes = differs + ([f"not stated: {', '.join(unknown)}"] if unknown else [])
    return ("differs" if differs else "unknown" if unknown else "matches"), notes


def budget_words(ours: dict[str, str] | None) -> list[str]:
    """Our budget in a few words (nothing for a claim we did not run)."""
    if not ours:
        return []
    artifact = "" if ours["artifact_epochs"] in ("", UNKNOWN) else \
        f", artifact {ours['artifact_epochs']} ep [{ours['artifact_channels']}]"
    views = "" if ours.get("views", UNKNOWN) == UNKNOWN else f", views {ours['views']}"
    return [f"ours: {ours['epochs']} ep, {ours['backbone']}, {ours['train_size']} train images{artifact}{views}"]


def _identities(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    return dict(con.execute("SELECT config_key, any_value(identity) FROM run_ident GROUP BY 1").fetchall())


def measured(con: duckdb.DuckDBPyConnection, claim: dict[str, str], effects: list[dict[str, Any]],
             configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Our values for one claim: one per matching setting and protocol (best configuration each)."""
    methods = {m.strip() for m in claim["methods"].split(";") if m.strip()}
    found = []
    if claim["kind"] == "effect":
        for e in effects:
            chosen = e["weighting"] if claim["addon"] == "weighting" else e["positives"]
            # A variant of the add-on (scorecl_tiny) is measured against the claim too; its budget tells it apart.
            variant_of = chosen == claim["treatment"] or str(chosen).startswith(claim["treatment"] + "_")
            if (e["addon"] == claim["addon"] and variant_of and e["method"] in methods
                    and e["dataset"] == claim["dataset"] and protocol_matches(claim["protocol"], e["protocol"])):
                found.append({**e, "label": e["treatment"]})
    elif claim["protocol"] == TRANSFER_LOGREG:
        for t in data.transfer(con):
            if t["protocol"] == "logreg:lbfgs" and t["transfer"] == claim["dataset"] and t["method"] in methods:
                found.append({**t, "dataset": t["trained_on"], "label": t["method"]})
    else:
        for c in configs:
            if (c["rank_in_setting"] == 1 and c["method"] in methods and c["dataset"] == claim["dataset"]
                    and c["weighting"] == "none" and not (c["synthetic_ratio"] or 0)
                    and protocol_matches(claim["protocol"], c["protocol"])):
                found.append({**c, "label": c["method"]})
    return found


def check(con: duckdb.DuckDBPyConnection, claims: list[dict[str, str]]) -> list[dict[str, Any]]:
    """One result per claim and matching measurement (one 'not measured' result for a claim without any).

    Needs data.prepare(con) first.
    """
    effects, configs, identities = data.effects(con), data.configurations(con), _identities(con)
    results = []
    for claim in claims:
        claimed_min, claimed = float(claim["claimed_min"]), float(claim["claimed"])
        base = {"claim": claim["id"], "paper": claim["paper"], "claim_text": claim["claim_text"],
                "kind": claim["kind"], "dataset": claim["dataset"], "claimed_min": claimed_min, "claimed": claimed,
                "source": claim["source"]}
        rows = measured(con, claim, effects, configs)
        if not rows:
            results.append({**base, "method": claim["methods"].replace(";", ", "), "protocol": claim["protocol"],
                            "mean": None, "std": None, "n": 0, "low": None, "high": None,
                            "verdict": "not measured", "budget": "not run", "budget_notes": [],
                            "reading": "not measured", "our_budget": None, "config_key": None})
            continue
        for r in rows:
            half = t_halfwidth(r["std"], r["n"])
            v = verdict(claim["kind"], r["mean"], half, r["n"], claimed_min)
            ours = our_budget(identities.get(r["config_key"]), r, claim["addon"])
            budget, notes = compare_budget(claim, ours)
            reading = v if budget == "matches" else (
                f"not run at the claim's budget (at ours: {v})" if budget == "differs"
                else f"{v} (budget unknown: the source does not state it)")
            results.append({**base, "method": r["method"], "protocol": r["protocol"], "treatment": r["label"],
                            "epochs": r["epochs"], "backbone": r["backbone"],
                            "mean": r["mean"], "std": r["std"], "n": r["n"],
                            "low": None if half is None else r["mean"] - half,
                            "high": None if half is None else r["mean"] + half,
                            "verdict": v, "budget": budget, "budget_notes": notes, "reading": reading,
                            "our_budget": ours, "config_key": r["config_key"]})
    return results


def interval_text(r: dict[str, Any], signed: bool) -> str:
    if r["low"] is None:
        return "one seed" if r["n"] == 1 else "–"
    f = "{:+.2f}" if signed else "{:.2f}"
    return f"[{f.format(r['low'])}, {f.format(r['high'])}]"


def value_text(value: float | None, signed: bool) -> str:
    if value is None:
        return "–"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def claimed_text(r: dict[str, Any]) -> str:
    if r["kind"] == "top1":
        return f"{r['claimed']:.2f}"
    if r["claimed_min"] == r["claimed"]:
        return f"> {r['claimed']:+.2f}"
    return f"{r['claimed']:+.2f}" + (" (gain > 0)" if r["claimed_min"] == 0 else f" (> {r['claimed_min']:+.2f})")


# How a budget comparison reads. "unknown" (the source states the field, ours or the claim's, not at all) is
# never a mismatch: ScoreCL's sources state no budget (methods.md 5.2), so its claim can only read this way.
BUDGET_WORDS = {"matches": "budget matches", "differs": "budget differs", "unknown": "budget unknown",
                "not run": "not run"}


def text_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results as the text table's cells."""
    return [{"claim": r["claim"], "method": r["method"], "protocol": r["protocol"], "claimed": claimed_text(r),
             "measured": value_text(r["mean"], r["kind"] == "effect"),
             "95% interval": interval_text(r, r["kind"] == "effect"), "n": r["n"], "verdict": r["verdict"],
             "budget": BUDGET_WORDS[r["budget"]] + (": " + "; ".join(r["budget_notes"]) if r["budget_notes"] else "")}
            for r in results]


def run(db: Path, claims_file: Path, as_json: bool) -> str:
    from harness.store import Store
    from leaderboard.text import format_table

    claims = load(claims_file)
    if not db.exists() and not Store(db).pending():
        raise SystemExit(f"error: --db = {db}: no such store (run a job first, or pass the store.path it used)")
    with Store(db).connect() as con:
        data.prepare(con)
        results = check(con, claims)
    if as_json:
        return json.dumps({"claims": results}, indent=1, default=str)
    return format_table(text_rows(results), ["claim", "method", "protocol", "claimed", "measured", "95% interval",
                                             "n", "verdict", "budget"])
