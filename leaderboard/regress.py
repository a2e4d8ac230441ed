"""Did anything get worse? Compare every configuration's test top-1 between a baseline and a candidate.

Each side is a git commit (runs recorded at that commit; a unique prefix is enough, and so is any
name `git rev-parse` understands in the current repository: HEAD, HEAD~1, main, a tag, printed with
the hash it resolved to; runs from a tree with uncommitted changes are the commit `<hash>+dirty`, so
by default the candidate is your uncommitted change when its runs are the newest) or, for the
baseline, a pinned file of expected values written by `--write-baseline`. Configurations are
matched by config_key (the config without seed and launch settings, see leaderboard.data), per
dataset and protocol.

The rule, per configuration:
- at least two seeds on both sides: Welch's one-sided t-test of "candidate mean < baseline mean".
  It regressed when p < alpha AND the drop is at least `min_effect` points: with many seeds a
  0.1-point drop can be significant without mattering, and the minimum keeps it from failing CI;
- fewer seeds on either side: no spread to test against, so it regressed when the candidate's mean
  is more than `tolerance` points below the baseline's (the file's per-entry tolerance if it has
  one, else --tolerance).
Exit status (a CI step reads it): 0 = compared, nothing regressed; 1 = at least one configuration
regressed; 2 = nothing could be compared (no configuration has runs on both sides, an unknown or
ambiguous commit, no other commit to compare with, a missing store or a bad baseline file) or bad
arguments. A misconfigured CI job therefore never reads as a regression, nor as a pass.

"Improved" is the mirror image; "missing" (baseline only) and "new" (candidate only) are reported
but never fail. Config fields that one side's runs all have and the other's lack (a field added by
the candidate's code) are left out of the match; see `align`.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import duckdb

from harness.atomic import write_text_atomic
from leaderboard import data
from leaderboard.stats import mean_std, welch
from leaderboard.text import format_table

BASELINE_VERSION = 1
# Exit statuses of `python -m leaderboard regress`.
NO_REGRESSION, REGRESSED, CANNOT_COMPARE = 0, 1, 2


class CannotCompare(Exception):
    """Bad input or nothing to compare: `regress` exits CANNOT_COMPARE (2) with this one line."""


TABLE_COLUMNS = ["verdict", "dataset", "protocol", "label", "n_base", "base", "n_cand", "cand", "diff", "bound",
                 "p", "rule"]


def git_commit(ref: str) -> str | None:
    """The commit hash `git rev-parse` gives for `ref` (HEAD, HEAD~1, main, a tag) in the current
    repository, or None: not a repository, no git, or not a name git knows."""
    if not ref or ref.startswith("-"):  # never an option to git
        return None
    try:
        proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def resolve_side(con: duckdb.DuckDBPyConnection, ref: str, side: str) -> str:
    """The store's commit that `ref` names: a hash or prefix in the store, else any name `git rev-parse`
    understands in the current repository (printed with what it resolved to)."""
    try:
        return resolve_commit(con, ref)
    except CannotCompare as not_in_store:
        commit = git_commit(ref)
        if commit is None or commit.startswith(ref):
            raise
        print(f"{side} {ref} = {commit} (git rev-parse)")
        try:
            return resolve_commit(con, commit)
        except CannotCompare:
            raise CannotCompare(f"{not_in_store}; git resolves {ref!r} to {commit}, which has no completed "
                                "runs in the store either") from None


def resolve_commit(con: duckdb.DuckDBPyConnection, ref: str) -> str:
    """The one commit in the store that `ref` (a full hash or a prefix) names."""
    commits = data.commits_in_order(con)
    prefixed = [c for c in commits if c.startswith(ref)]
    # A prefix names the clean commit when runs from its dirty tree are also in the store.
    found = [c for c in commits if c == ref] or [c for c in prefixed if not c.endswith(data.DIRTY)] or prefixed
    if len(found) == 1:
        return found[0]
    if not found:
        known = ", ".join(data.short_commit(c) for c in commits[-10:]) or "none"
        raise CannotCompare(f"no completed runs at commit {ref!r} in the store (newest commits: {known}); "
                         "a baseline file path must exist")
    raise CannotCompare(f"commit prefix {ref!r} is ambiguous: {', '.join(found)}")


def label(entry: dict[str, Any]) -> str:
    """A short human name for a configuration (its setting plus the start of its config key)."""
    ratio = entry.get("synthetic_ratio") or 0
    parts = [str(entry.get("method")), str(entry.get("backbone")), f"w={entry.get('weighting')}",
             f"r={ratio:g}" if isinstance(ratio, (int, float)) else f"r={ratio}", f"{entry.get('epochs')}ep",
             str(entry.get("config_key", ""))[:8]]
    return " ".join(parts)


def side_from_commit(con: duckdb.DuckDBPyConnection, commit: str) -> dict[tuple, dict[str, Any]]:
    return {(e["dataset"], e["protocol"], e["config_key"]): e for e in data.seeds_at(con, commit)}


def _fields(entry: dict[str, Any]) -> dict[str, Any] | None:
    identity = entry.get("identity")
    return data.flatten(json.loads(identity)) if identity else None


def align(base: dict[tuple, dict[str, Any]], cand: dict[tuple, dict[str, Any]]
          ) -> tuple[dict[tuple, dict[str, Any]], dict[tuple, dict[str, Any]], list[str]]:
    """Match configurations across a change of the config's schema; returns (base, cand, notes).

    A commit that adds a config field (say `trainer.sync_bn`) gives every configuration
    a new config_key, so nothing would match its baseline and nothing could ever regress. A field that
    every configuration on one side has and none on the other has is such a schema change: both sides
    are matched on the config without those fields, and the notes name them with their values. When
    leaving them out would merge two configurations of one side, nothing is aligned and a note says so.
    """
    fields = {"base": [_fields(e) for e in base.values()], "cand": [_fields(e) for e in cand.values()]}
    if not base or not cand or any(f is None for side in fields.values() for f in side):
        return base, cand, []
    every = {side: set.intersection(*(set(f) for f in fs)) for side, fs in fields.items()}
    some = {side: set.union(*(set(f) for f in fs)) for side, fs in fields.items()}
    only = {"cand": sorted(every["cand"] - some["base"]), "base": sorted(every["base"] - some["cand"])}
    if not only["cand"] and not only["base"]:
        return base, cand, []
    left_out = set(only["cand"]) | set(only["base"])
    aligned: dict[str, dict[tuple, dict[str, Any]]] = {}
    for side, entries in (("base", base), ("cand", cand)):
        keyed = {}
        for (dataset, protocol, _), entry, flat in zip(entries, entries.values(), fields[side]):
            rest = json.dumps({k: v for k, v in flat.items() if k not in left_out}, sort_keys=True, default=str)
            keyed[(dataset, protocol, "fields:" + rest)] = entry
        if len(keyed) < len(entries):
            return base, cand, [f"the config fields {', '.join(sorted(left_out))} are only on one side, and leaving "
                                "them out would merge configurations: matched on the full config"]
        aligned[side] = keyed
    notes = []
    for side, name in (("cand", "candidate"), ("base", "baseline")):
        for field in only[side]:
            values = sorted({json.dumps(f[field], default=str) for f in fields[side]})
            notes.append(f"config field {field} is only in the {name}'s runs (= {', '.join(values)}): "
                         "configurations are matched without it")
    return aligned["base"], aligned["cand"], notes


def read_baseline_file(path: Path) -> tuple[str, dict[tuple, dict[str, Any]]]:
    try:
        blob = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CannotCompare(f"--baseline = {path}: not a readable baseline file ({e})") from None
    entries_ok = isinstance(blob, dict) and isinstance(blob.get("entries"), list)
    if not entries_ok or blob.get("version") != BASELINE_VERSION:
        raise CannotCompare(f"{path} is not a baseline file (version {BASELINE_VERSION} with 'entries')")
    entries = {}
    for e in blob["entries"]:
        if "values" not in e:  # a hand-written entry may give only the expected mean
            e["values"] = [e["mean"]]
        if e.get("config") is not None:  # lets `align` match it across a change of the config's fields
            e["identity"] = json.dumps(e["config"], sort_keys=True)
        entries[(e["dataset"], e["protocol"], e["config_key"])] = e
    return f"file {path} (commit {data.short_commit(str(blob.get('commit')))})", entries


def write_baseline_file(path: Path, commit: str, side: dict[tuple, dict[str, Any]], tolerance: float) -> int:
    """Pin a commit's per-seed values (and a tolerance for single-seed entries) as a baseline file."""
    entries = []
    for e in side.values():
        mean, std = mean_std(e["values"])
        entries.append({"dataset": e["dataset"], "protocol": e["protocol"], "config_key": e["config_key"],
                        "label": label(e), "method": e["method"], "backbone": e["backbone"],
                        "weighting": e["weighting"], "synthetic_ratio": e["synthetic_ratio"], "epochs": e["epochs"],
                        "values": e["values"], "seeds": e["seeds"], "mean": mean, "std": std,
                        "tolerance": tolerance, "config": json.loads(e["identity"]) if e.get("identity") else None})
    write_text_atomic(path, json.dumps({"version": BASELINE_VERSION, "commit": commit, "metric": "top1",
                                        "split": "test", "entries": entries}, indent=1) + "\n")
    return len(entries)


def compare_one(base: dict[str, Any], cand: dict[str, Any], alpha: float, min_effect: float,
                tolerance: float, with_bound: bool = True) -> dict[str, Any]:
    """The verdict for one configuration present on both sides."""
    b, c = list(base["values"]), list(cand["values"])
    out: dict[str, Any] = {"n_base": len(b), "n_cand": len(c), "base": mean_std(b)[0], "cand": mean_std(c)[0]}
    out["diff"] = out["cand"] - out["base"]
    if len(b) >= 2 and len(c) >= 2:
        w = welch(b, c, alpha, with_bound)
        worse = w["p"] < alpha and -w["diff"] >= min_effect
        better = (1.0 - w["p"]) < alpha and w["diff"] >= min_effect
        out.update(rule=f"welch a={alpha:g} min={min_effect:g}", p=w["p"], bound=w["upper"], df=w["df"])
    else:
        tol = float(base.get("tolerance", tolerance))
        worse, better = out["diff"] < -tol, out["diff"] > tol
        out.update(rule=f"tolerance {tol:g}", p=None, bound=None, df=None)
    out["verdict"] = "REGRESSED" if worse else ("improved" if better else "ok")
    return out


def compare(base: dict[tuple, dict[str, Any]], cand: dict[tuple, dict[str, Any]], alpha: float = 0.05,
            min_effect: float = 0.5, tolerance: float = 1.0, with_bound: bool = True) -> list[dict[str, Any]]:
    """Verdicts for every configuration on either side, regressions first (bounds cost a t quantile each)."""
    results = []
    for key in sorted(set(base) | set(cand), key=lambda k: tuple(str(x) for x in k)):
        entry = cand.get(key) or base[key]
        row: dict[str, Any] = {"dataset": key[0], "protocol": key[1], "config_key": entry["config_key"],
                               "label": label(entry)}
        if key in base and key in cand:
            row.update(compare_one(base[key], cand[key], alpha, min_effect, tolerance, with_bound))
        else:
            side = base.get(key) or cand[key]
            row.update(verdict="missing" if key in base else "new", rule="", p=None, bound=None, df=None,
                       diff=None, **{"n_base" if key in base else "n_cand": len(side["values"]),
                                     "base" if key in base else "cand": mean_std(side["values"])[0]})
        results.append(row)
    order = {"REGRESSED": 0, "improved": 1, "ok": 2, "missing": 3, "new": 4}
    return sorted(results, key=lambda r: order[r["verdict"]])


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def run(db: Path, baseline: str, candidate: str | None, json_out: Path | None, alpha: float, min_effect: float,
        tolerance: float, write_baseline: Path | None = None) -> int:
    """The `regress` command: prints the table, writes JSON, returns the exit status (0 or 1; see the module's
    doc). Raises CannotCompare when nothing could be compared."""
    from harness.store import Store

    if not db.exists() and not Store(db).pending():
        raise CannotCompare(f"--db = {db}: no such store")
    with Store(db).connect() as con:
        data.prepare(con)
        if Path(baseline).is_file():
            if write_baseline:
                raise CannotCompare("--write-baseline needs --baseline to be a commit, not a file")
            base_label, base = read_baseline_file(Path(baseline))
            base_commit = None
        else:
            base_commit = resolve_side(con, baseline, "baseline")
            base_label, base = f"commit {data.short_commit(base_commit)}", side_from_commit(con, base_commit)
            if write_baseline:
                n = write_baseline_file(write_baseline, base_commit, base, tolerance)
                print(f"wrote {n} configurations at commit {data.short_commit(base_commit)} to {write_baseline}")
                return NO_REGRESSION
        if candidate is None:
            later = [c for c in data.commits_in_order(con) if c != base_commit]
            if not later:
                raise CannotCompare("no candidate: the store holds no other commit than the baseline")
            candidate = later[-1]
        cand_commit = resolve_side(con, candidate, "candidate")
        cand = side_from_commit(con, cand_commit)
    base, cand, notes = align(base, cand)
    results = compare(base, cand, alpha, min_effect, tolerance)
    regressed = sum(r["verdict"] == "REGRESSED" for r in results)
    print(f"baseline: {base_label}   candidate: commit {data.short_commit(cand_commit)}")
    for note in notes:
        print(f"note: {note}")
    compared = any(r["verdict"] not in ("missing", "new") for r in results)
    shown = [{**r, "p": None if r["p"] is None else f"{r['p']:.3g}"} for r in results]
    print(format_table(shown, TABLE_COLUMNS) if results else "nothing to compare")
    print(f"{regressed} regressed, {sum(r['verdict'] == 'improved' for r in results)} improved, "
          f"{sum(r['verdict'] == 'ok' for r in results)} unchanged of {len(results)} configurations")
    if json_out:
        write_text_atomic(json_out, json.dumps({
            "baseline": base_label, "candidate": cand_commit, "alpha": alpha, "min_effect": min_effect,
            "tolerance": tolerance, "regressed": regressed, "notes": notes,
            "results": [{k: _clean(v) for k, v in r.items()} for r in results]}, indent=1) + "\n")
    if not compared:
        raise CannotCompare(f"no configuration has runs on both sides ({base_label} and commit "
                            f"{data.short_commit(cand_commit)}), so nothing was compared")
    return REGRESSED if regressed else NO_REGRESSION
