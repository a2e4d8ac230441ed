"""A finished run as its folder holds it (``<runs>/<run_key>/``): config, checkpoint, rows.

Read by ``python -m harness.export`` and ``python -m harness.evaluate``. The run folder is the
run's permanent record (harness.store), so nothing here needs the database except to turn a run
id of an older attempt into its run key. Checkpoints are read with ``weights_only=True`` only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.store import DONE_MARKER, ROWS_DIR, Store, merged_sources, read_done


class RunNotFound(ValueError):
    """The run named on the command line is not there (or cannot be used): one line says why."""


def default_store(db: Path | None, runs: Path | None) -> Store:
    return Store(db or Path("outputs/results.duckdb"), runs)


def find_run(ref: str, store: Store) -> Path:
    """The folder of the run named by `ref`: its run key (a folder name), or a run id."""
    roots = [r for r in (store.runs, *merged_sources(store)) if r.is_dir()]  # merged runs stay in their folders
    if not roots:
        raise RunNotFound(f"no run folders at {store.runs} (pass --db, or --runs for store.runs_dir)")
    for root in roots:
        if ref and "/" not in ref and (root / ref).is_dir():
            return root / ref
    for marker in (m for root in roots for m in root.glob("*/run_id")):  # the current attempt of every run
        try:
            if marker.read_text().strip() == ref:
                return marker.parent
        except OSError:
            continue
    if store.path.exists():  # an older attempt's id: the database knows its run key
        rows = store.query("SELECT run_key FROM runs WHERE run_id = ? LIMIT 1", [ref])
        if rows and rows[0]["run_key"] and (store.runs / rows[0]["run_key"]).is_dir():
            return store.runs / rows[0]["run_key"]
    raise RunNotFound(f"run {ref!r}: neither a run key (a folder under {store.runs}) nor a run id there")


def finished(folder: Path) -> dict[str, Any]:
    """The done marker of the run in `folder`; RunNotFound when the run has not completed."""
    done = read_done(folder)
    if done is None:
        raise RunNotFound(f"run {folder.name} has not completed (no {DONE_MARKER} in {folder})")
    return done


def run_config(folder: Path) -> DictConfig:
    """The resolved config the run trained with (written into its folder when it started)."""
    path = folder / "config.yaml"
    if not path.exists():
        raise RunNotFound(f"run {folder.name}: {path} is missing")
    return OmegaConf.load(path)  # type: ignore[return-value]


WEIGHTS = "backbone.pt"  # what a completed run keeps under store.keep_checkpoints=weights (harness/jobs/run.py)


def backbone_state(folder: Path) -> dict[str, Any]:
    """The backbone's weights from the run's checkpoint (its keys without the ``backbone.`` prefix), or
    from the exported weights a completed run kept instead of its checkpoint (store.keep_checkpoints)."""
    import torch

    from harness.core.checkpoint import has_checkpoint, load_checkpoint

    if not has_checkpoint(folder / "checkpoint.pt") and (folder / WEIGHTS).exists():
        weights = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
        if str(run_config(folder).backbone._target_).endswith(".ResNet"):  # torchvision's keys: back under .net
            weights = {f"net.{k}": v for k, v in weights.items()}
        return weights
    # main=False: read only; never move or delete anything in a run folder another job may use.
    state = load_checkpoint(folder / "checkpoint.pt", "cpu", "[export]", main=False, required=("model",))
    if state is None:
        raise RunNotFound(f"run {folder.name}: no readable checkpoint in {folder}")
    weights = {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
    if not weights:
        raise RunNotFound(f"run {folder.name}: its checkpoint holds no backbone.* weights")
    return weights


def load_backbone(folder: Path, cfg: DictConfig):
    """The run's trained backbone (a fresh module of its config with the checkpoint's weights), on CPU."""
    from harness.jobs.config import instantiate

    backbone = instantiate(cfg.backbone)
    backbone.load_state_dict(backbone_state(folder))
    return backbone


def _rows(folder: Path, table: str) -> list[dict[str, Any]]:
    """Every row the run wrote to `table`, in the order written (file names sort by time)."""
    out = []
    for path in sorted((folder / ROWS_DIR / table).glob("*.jsonl"), key=lambda p: p.name):
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a damaged line: the store rejects it too
            if isinstance(row, dict):
                row.pop("_order", None)
                out.append(row)
    return out


def run_row(folder: Path, run_id: str) -> dict[str, Any]:
    """The newest runs row of attempt `run_id` (status, cost, commit), from the run folder."""
    rows = [r for r in _rows(folder, "runs") if r.get("run_id") == run_id]
    return rows[-1] if rows else {}


def eval_rows(folder: Path, run_id: str) -> list[dict[str, Any]]:
    """The evals rows of attempt `run_id`, newest per (protocol, split), as the store keeps them."""
    newest: dict[tuple, dict[str, Any]] = {}
    for row in _rows(folder, "evals"):
        if row.get("run_id") == run_id:
            newest[(row.get("protocol"), row.get("split"))] = row
    return sorted(newest.values(), key=lambda r: (r.get("dataset") or "", str(r.get("split")), str(r.get("protocol"))))
