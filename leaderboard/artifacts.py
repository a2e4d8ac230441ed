"""Built-once artifacts (score networks, diffusion models, synthetic sets) and the runs that share them.

An artifact's build time is in the wall-clock of the one run that built it and in no other, although
every run with the same recipe and training split uses it. Here it is split evenly over the completed
runs that use it. Which runs use an artifact is read from its manifest (`artifact.json`, written by
harness.artifacts.build_once with the config that keyed it): a run uses it when every value of that
config equals the run's own (a subset match, so that keys left out of the artifact's key do not count).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import duckdb

MANIFEST = "artifact.json"


def manifests(con: duckdb.DuckDBPyConnection, db: Path) -> list[dict[str, Any]]:
    """Every readable manifest under <db>.artifacts and under each artifacts.dir the store's runs named."""
    roots = {db.with_name(db.name + ".artifacts")}
    for (folder,) in con.execute("SELECT DISTINCT json_extract_string(config, '$.artifacts.dir') FROM runs "
                                 "WHERE config IS NOT NULL").fetchall():
        if folder:
            roots.add(Path(folder).expanduser())
    found = []
    for root in sorted(roots):
        for path in sorted(root.glob(f"*/*/{MANIFEST}")) if root.is_dir() else []:
            try:
                m = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(m, dict):
                found.append({**m, "root": str(root)})
    return found


def _within(part: Any, whole: Any) -> bool:
    """Every key of `part` is in `whole` with an equal value (recursively)."""
    if isinstance(part, dict):
        return isinstance(whole, dict) and all(k in whole and _within(v, whole[k]) for k, v in part.items())
    return part == whole


def model_view(diffusion: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The diffusion model a run's synthetic set was generated with, as methods/clsp/diffusion.py's
    model_identity names it: a given model by its path (absolute, as the job resolved it) or hub id,
    else the training recipe and data."""
    if diffusion.get("path"):
        return {"path": str(Path(str(diffusion["path"])).expanduser().absolute())}
    if diffusion.get("hub_id"):
        return {"hub_id": str(diffusion["hub_id"])}
    return {"train": diffusion, "data": data}


def run_view(kind: str, tree: dict[str, Any]) -> dict[str, Any] | None:
    """A run's config in the shape of the manifest config of an artifact of `kind` it might use."""
    data = tree.get("dataset") or {}
    weighting, positives = tree.get("weighting") or {}, tree.get("positives") or {}
    if kind == "score_net" and weighting.get("score_net") and weighting.get("mode", "pretrained") == "pretrained":
        return {"score_net": weighting["score_net"], "data": data}
    if kind == "diffusion" and positives.get("diffusion"):
        return {"train": positives["diffusion"], "data": data}
    if kind == "synthetic" and positives.get("diffusion"):
        return {"model": model_view(positives["diffusion"], data), "data": data,
                "candidates": positives.get("candidates"), "sampler": positives.get("sampler"),
                "seed": (positives.get("generate") or {}).get("seed")}
    return None


def shares(con: duckdb.DuckDBPyConnection, db: Path) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """(the manifests, each with `runs` = how many completed runs use it; config_key -> artifact hours per run).

    Needs data.prepare(con) first (run_ident).
    """
    found = manifests(con, db)
    runs = con.execute("""SELECT i.config_key, r.config FROM runs r JOIN run_ident i USING (run_id)
                          WHERE r.status = 'completed'""").fetchall()
    users: dict[int, list[str]] = defaultdict(list)
    for config_key, config in runs:
        try:
            tree = json.loads(config or "{}")
        except json.JSONDecodeError:
            continue
        for i, m in enumerate(found):
            view = run_view(str(m.get("kind")), tree)
            if view is not None and isinstance(m.get("config"), dict) and _within(m["config"], view):
                users[i].append(config_key)
    per_run: dict[str, float] = defaultdict(float)
    for i, m in enumerate(found):
        m["runs"] = len(users[i])
        hours = (m.get("build_seconds") or 0) / 3600
        for config_key in users[i]:
            per_run[config_key] += hours / len(users[i])
    # A configuration's runs all use the same artifacts: the total over its runs / their number.
    counts: dict[str, int] = defaultdict(int)
    for config_key, _ in runs:
        counts[config_key] += 1
    return found, {k: v / counts[k] for k, v in per_run.items()}
