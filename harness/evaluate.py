"""``python -m harness.evaluate RUN dataset=NAME [dataset.KEY=VALUE ...] [eval.KEY=VALUE ...]``:
transfer probes of a finished run's frozen backbone on other datasets.

RUN is a run key or a run id. Each ``dataset=NAME`` starts one transfer set (cifar10, cifar100,
imagefolder or a set of the ssl-transfer suite: food101, sun397, cars, aircraft, voc2007, dtd, pets,
caltech101, flowers) and the ``dataset.KEY=VALUE`` after it set that set's keys (root, image_size,
train_size, test_size, subset_seed, label, protocols, metric; see harness/jobs/transfer.py). ``eval.KEY=VALUE``
changes the probes' settings (e.g. ``eval.linear.epochs=10``; the protocol name records it). Runs
the k-NN settings and the linear probe of the run's config on each set and stores the rows in
``evals`` (dataset = the set's name, split = ``transfer:<name>``), from where the leaderboard page
shows them.

Examples::

    python -m harness.evaluate 3f2a9c01d4e5b6a7 dataset=cifar100
    python -m harness.evaluate 3f2a9c01d4e5b6a7 dataset=imagefolder dataset.root=~/data/stl10 dataset.image_size=32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from harness.errors import ConfigError


def parse_overrides(items: list[str]) -> tuple[list[dict], list[str]]:
    """(transfer entries, eval.* dotlist) from the command line's KEY=VALUE items."""
    sets: list[dict] = []
    dotlist: list[str] = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(item, None, "KEY=VALUE: dataset=NAME, dataset.KEY=VALUE or eval.KEY=VALUE")
        if key == "dataset":
            sets.append({"name": value})
        elif key.startswith("dataset."):
            if not sets:
                raise ConfigError(key, value, "after a dataset=NAME that it belongs to")
            sets[-1][key[len("dataset."):]] = yaml.safe_load(value) if value else None
        elif key.startswith("eval."):
            dotlist.append(item)
        else:
            raise ConfigError(key, value, "dataset=NAME, dataset.KEY=VALUE or eval.KEY=VALUE")
    if not sets:
        raise ConfigError("dataset", None, "at least one dataset=NAME (cifar10, cifar100, imagefolder or a transfer "
                          "suite set: food101, sun397, cars, aircraft, voc2007, dtd, pets, caltech101, flowers)")
    return sets, dotlist


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run key or run id")
    parser.add_argument("overrides", nargs="+", help="dataset=NAME [dataset.KEY=VALUE ...] [eval.KEY=VALUE ...]")
    parser.add_argument("--db", type=Path, default=None, help="the store (default outputs/results.duckdb)")
    parser.add_argument("--runs", type=Path, default=None, help="the run folders' root (store.runs_dir)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)

    from harness.jobs.saved import RunNotFound, default_store, find_run, finished, run_config
    from harness.jobs.transfer import transfer_errors

    store = default_store(args.db, args.runs)
    try:
        sets, dotlist = parse_overrides(args.overrides)
        # Bad sets are refused in one line each, before a checkpoint or image is read.
        errors = transfer_errors(sets, field="dataset")
        if errors:
            raise ConfigError(*errors[0].problems[0], more=errors[1:])
        folder = find_run(args.run, store)
        done = finished(folder)
        cfg = run_config(folder)
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
        cfg.eval.transfer = sets
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import torch

    from harness.core.data.normalization import resolve_normalization
    from harness.jobs.saved import load_backbone
    from harness.jobs.transfer import run_transfer

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    cfg = resolve_normalization(cfg)  # the pretraining normalisation, if it was auto
    backbone = load_backbone(folder, cfg).to(device)
    rows, failures = run_transfer(cfg, backbone)
    run_id = done["run_id"]
    if rows:
        store.write("evals", [{"run_id": run_id, "run_key": folder.name, "epoch": int(cfg.trainer.epochs), **row}
                              for row in rows], keep_in=folder)
    try:
        store.ingest(timeout=0)
    except Exception as e:  # noqa: BLE001 - the rows are safe in the spool and the run folder
        print(f"[evaluate] rows wait in {store.spool} ({type(e).__name__}); ingest with: {store.ingest_command()}",
              file=sys.stderr)
    for row in rows:
        top5 = f"\ttop-5 {row['top5']:.2f}" if row.get("top5") is not None else ""
        print(f"{row['dataset']}\t{row['protocol']}\t{row.get('metric') or 'top1'} {row['top1']:.2f}{top5}")
    print(f"stored {len(rows)} evals rows of run {folder.name} (run {run_id}) in {store.path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
