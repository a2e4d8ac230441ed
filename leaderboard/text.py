"""Plain text tables for terminals and logs."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from leaderboard.data import primary_protocol


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain aligned text table."""
    cells = [[("" if r.get(c) is None else (f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c])))
              for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def sweep_groups(points: list[dict[str, Any]]) -> str:
    """One line per group of a sweep's points that differ only in the seed: mean ± std of the objective over
    seeds, and n. Each point has `overrides`, `status`, `objective` and its run's `config` (JSON)."""
    groups: dict[str, list[float]] = {}
    protocols: set[str] = set()
    for p in points:
        if p["status"] not in ("completed", "skipped") or p["objective"] is None:
            continue
        key = " ".join(o for o in (p["overrides"] or "").split() if not re.match(r"^\+*seed=", o)) or "(defaults)"
        groups.setdefault(key, []).append(float(p["objective"]))
        config = json.loads(p["config"]) if p.get("config") else {}
        split = "val" if (config.get("dataset") or {}).get("val_size") else "test"
        protocols.add(f"{primary_protocol(p.get('config')) or 'primary k-NN'} on {split}")
    if not groups:
        return ""
    # Overrides every group shares are said once, above the table.
    common = set.intersection(*(set(k.split()) for k in groups)) if len(groups) > 1 else set()
    rows = []
    for key, values in groups.items():
        if common:
            key = " ".join(o for o in key.split() if o not in common) or "(only the shared overrides)"
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
        rows.append({"group (overrides but the seed)": key, "n": len(values),
                     "top-1 mean ± std": f"{mean:.2f} ± {'–' if std is None else f'{std:.2f}'}"})
    shared = f"Shared by every group: {' '.join(sorted(common))}\n" if common else ""
    return (f"Per group, over seeds (objective: top-1 under {', '.join(sorted(protocols))}):\n{shared}"
            + format_table(rows, ["group (overrides but the seed)", "n", "top-1 mean ± std"]))
