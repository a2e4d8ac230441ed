"""Transfer evaluation: the frozen backbone's k-NN and linear probe on other datasets.

``eval.transfer`` is a list; each entry names a dataset the way ``dataset=`` does:

- ``cifar10`` or ``cifar100``: that dataset's config (harness/conf/dataset/<name>.yaml);
- a mapping ``{name: imagefolder, root: PATH}`` (or ``name: cifar100`` with its own ``root``),
  with optional ``image_size``, ``train_size``, ``test_size``, ``subset_seed``, ``archive``,
  ``download`` and ``label`` (the name shown in the store and on the page; default ``cifar100``, or
  ``imagefolder:<folder name>``).

Each set is read like a training dataset (same cache), at the pretraining image size unless its
``image_size`` says otherwise (image folders), and normalised with the PRETRAINING dataset's
mean/std, the backbone's input normalisation. Probes: every ``eval.knn`` setting (the transfer set's
train split is the bank) and the linear probe with the ``eval.linear`` settings (run whether or not
``eval.linear.enabled``), fitted on the transfer train split and scored on its test split.

Rows go to ``evals`` with ``dataset`` = the label and ``split`` = ``transfer:<label>``: the split
keeps them apart from the run's own test/val rows (the table's key is run, protocol, split, and
every ranking reads split test/val), and the dataset column names the set for queries and the page.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.errors import ConfigError

NAMES = ("cifar10", "cifar100", "imagefolder")
KEYS = ("name", "root", "archive", "download", "image_size", "train_size", "test_size", "subset_seed", "label")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "dataset"
SPLIT_PREFIX = "transfer:"
ALLOWED = "cifar10, cifar100 or a mapping {name: imagefolder, root: PATH} (keys: " + ", ".join(KEYS) + ")"


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def entries(value: Any) -> list[dict[str, Any]]:
    """The eval.transfer list as mappings ({"name": ...}); assumes transfer_errors found nothing."""
    return [{"name": e} if isinstance(e, str) else dict(e) for e in (_plain(value) or [])]


def label(entry: dict[str, Any]) -> str:
    """The name a transfer set is stored and shown under."""
    if entry.get("label"):
        return str(entry["label"])
    if entry["name"] == "imagefolder":
        return f"imagefolder:{Path(str(entry['root'])).expanduser().resolve().name}"
    return str(entry["name"])


def dataset_config(entry: dict[str, Any], pretrain: DictConfig) -> DictConfig:
    """The dataset config of transfer `entry` for a run trained with config `pretrain`."""
    ds = OmegaConf.load(CONF_DIR / f"{entry['name']}.yaml")
    ds.merge_with({k: v for k, v in entry.items() if k != "label"})
    ds.val_size = 0
    if not ds.get("cache_dir"):
        ds.cache_dir = OmegaConf.select(pretrain, "dataset.cache_dir", default=None)
    if entry["name"] == "imagefolder" and "image_size" not in entry:
        # The backbone's pretraining resolution: CIFAR 32 px, or the pretraining folder's image_size.
        trained = pretrain.dataset
        ds.image_size = trained.get("image_size", 32) if trained.name == "imagefolder" else 32
    ds.mean, ds.std = list(pretrain.dataset.mean), list(pretrain.dataset.std)  # never auto here: see module doc
    return ds


def transfer_errors(value: Any, field: str = "eval.transfer") -> list[ConfigError]:
    """One ConfigError per bad entry of eval.transfer (empty when it is null or a good list)."""
    value = _plain(value)
    if value is None or value == []:
        return []
    if not isinstance(value, list):
        return [ConfigError(field, value, "a list of datasets, each " + ALLOWED)]
    errors: list[ConfigError] = []
    for i, entry in enumerate(value):
        where = f"{field}.{i}"
        if isinstance(entry, str):
            if entry not in ("cifar10", "cifar100"):
                errors.append(ConfigError(where, entry, ALLOWED))
            continue
        if not isinstance(entry, dict):
            errors.append(ConfigError(where, entry, ALLOWED))
            continue
        unknown = sorted(set(entry) - set(KEYS))
        if unknown:
            errors.append(ConfigError(f"{where}.{unknown[0]}", entry[unknown[0]], "one of the keys " + ", ".join(KEYS)))
            continue
        if entry.get("name") not in NAMES:
            errors.append(ConfigError(f"{where}.name", entry.get("name"), "one of " + ", ".join(NAMES)))
            continue
        for key in ("image_size", "train_size", "test_size"):
            v = entry.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                errors.append(ConfigError(f"{where}.{key}", v, "an integer >= 1 or null"))
        if entry["name"] == "imagefolder" and not entry.get("root"):
            errors.append(ConfigError(f"{where}.root", entry.get("root"),
                                      "a directory with train/<class>/* and test/<class>/* images"))
            continue
        errors += _source_errors(entry, where)
    return errors


def _source_errors(entry: dict[str, Any], where: str) -> list[ConfigError]:
    """Whether the entry's images can be found and its subset sizes fit them, as errors on `where`."""
    from harness.core.data.datasets import resolve_source, size_errors

    ds = OmegaConf.load(CONF_DIR / f"{entry['name']}.yaml")
    ds.merge_with({k: v for k, v in entry.items() if k != "label"})
    ds.val_size = 0
    try:
        resolve_source(ds)
        found = size_errors(ds, batch_size=1)
    except ConfigError as e:
        found = [e]
    # The dataset layer names its own fields (dataset.root): name the transfer entry's instead.
    return [ConfigError(f.replace("dataset.", f"{where}.", 1), v, a) for e in found for f, v, a in e.problems]


def run_transfer(cfg: DictConfig, backbone, verbose: bool = True) -> tuple[list[dict[str, Any]], list[str]]:
    """k-NN and linear probes of the frozen `backbone` on every eval.transfer set of `cfg`.

    `cfg.dataset.mean/std` must already be numbers (harness.core.data.normalization). Returns evals
    rows without run_id/run_key/epoch ({"dataset", "split", "protocol", "top1", "top5"}) and one line
    per set that failed (e.g. a download without the internet): a set that fails after training is
    reported and skipped, never a reason to lose the trained run.
    """
    from harness.core.data.augment import ViewMaker
    from harness.core.data.datasets import load_dataset
    from harness.core.evaluate import knn_evaluate, linear_probe
    from harness.core.trainer import knn_settings

    device = next(backbone.parameters()).device
    linear_cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR.parent / "eval" / "knn.yaml").linear,
                                 OmegaConf.select(cfg, "eval.linear", default={}) or {})
    rows, failures = [], []
    for entry in entries(OmegaConf.select(cfg, "eval.transfer", default=None)):
        name = label(entry)
        ds = dataset_config(entry, cfg)
        if verbose:
            print(f"[transfer] {name}: k-NN and {int(linear_cfg.epochs)}-epoch linear probe on the frozen backbone",
                  file=sys.stderr, flush=True)
        try:
            data = load_dataset(ds)
            views = ViewMaker(cfg.augment, ds.mean, ds.std, device, seed=int(cfg.seed))
            queries = {"test": (data.test_x, data.test_y)}
            results = knn_evaluate(backbone, data.train_x, data.train_y, queries, views.plain, knn_settings(cfg.eval),
                                   data.num_classes)["test"]
            results.update(linear_probe(backbone, data.train_x, data.train_y, queries, views.normalize, linear_cfg,
                                        data.num_classes, seed=int(cfg.seed), verbose=verbose)["test"])
        except Exception as e:  # noqa: BLE001 - one line per failed set; the others and the run go on
            first = (str(e).strip().splitlines() or [""])[0]
            failures.append(f"[transfer] {name} failed ({type(e).__name__}: {first}); nothing stored for it")
            if verbose:
                print(failures[-1], file=sys.stderr, flush=True)
            continue
        for protocol, (top1, top5) in results.items():
            rows.append({"dataset": name, "split": SPLIT_PREFIX + name, "protocol": protocol, "top1": top1,
                         "top5": top5})
            if verbose:
                print(f"[transfer] {name}: {protocol} top-1 {top1:.2f}%", file=sys.stderr, flush=True)
    return rows, failures
