"""Transfer evaluation: the frozen backbone's probes on other datasets.

``eval.transfer`` is a list; each entry names a dataset the way ``dataset=`` does:

- ``cifar10`` or ``cifar100``: that dataset's config (harness/conf/dataset/<name>.yaml);
- a mapping ``{name: imagefolder, root: PATH}`` (or ``name: cifar100`` with its own ``root``),
  with optional ``image_size``, ``train_size``, ``test_size``, ``subset_seed``, ``archive``,
  ``download`` and ``label`` (the name shown in the store and on the page; default ``cifar100``, or
  ``imagefolder:<folder name>``);
- a set of the ssl-transfer suite, ``{name: dtd, root: PATH}``: food101, sun397, cars, aircraft,
  voc2007, dtd, pets, caltech101, flowers (and cifar10, cifar100), each read from a local copy in
  its torchvision or official layout with its official splits (harness/core/data/transfer_sets.py).

``protocols`` chooses the probes per set: ``logreg`` (the ssl-transfer protocol: L-BFGS logistic
regression on frozen pooled features, C chosen on a validation split, refit on train + val, scored
with the set's metric: harness/core/logreg.py), ``knn`` and ``linear``. Default: ``[logreg]`` for the
suite's sets, ``[knn, linear]`` for cifar10, cifar100 and image folders (as before). ``metric`` may
be given to say which metric is expected; it must be the set's (top-1 for image folders). For
``logreg`` each split's features are extracted once, sharded over the ranks (``batch_size``,
``workers``: the decode processes per rank), from images resized and centre-cropped to the set's
``image_size`` (default: the pretraining image size; ssl-transfer uses 224).

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

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from harness.core.data.transfer_sets import METRICS  # the suite's names and metrics
from harness.errors import ConfigError

DATASET_NAMES = ("cifar10", "cifar100", "imagefolder")  # read as training datasets are (datasets.py)
SUITE = tuple(n for n in METRICS if n not in DATASET_NAMES)  # read by transfer_sets.py from `root`
NAMES = DATASET_NAMES + SUITE
PROTOCOLS = ("logreg", "knn", "linear")
KEYS = ("name", "root", "archive", "download", "image_size", "train_size", "test_size", "subset_seed", "label",
        "protocols", "metric", "batch_size", "workers")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "dataset"
SPLIT_PREFIX = "transfer:"
LOGREG_PROTOCOL = "logreg:lbfgs"
ALLOWED = ("cifar10, cifar100, a mapping {name: imagefolder, root: PATH} or {name: NAME, root: PATH} with NAME one of "
           + ", ".join(SUITE) + " (keys: " + ", ".join(KEYS) + ")")


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def entries(value: Any) -> list[dict[str, Any]]:
    """The eval.transfer list as mappings ({"name": ...}); assumes transfer_errors found nothing."""
    return [{"name": e} if isinstance(e, str) else dict(e) for e in (_plain(value) or [])]


def protocols(entry: dict[str, Any]) -> list[str]:
    """The probes of transfer `entry`: its `protocols`, else logreg for the suite and k-NN + linear for the rest."""
    if entry.get("protocols"):
        return list(entry["protocols"])
    return ["logreg"] if entry["name"] in SUITE else ["knn", "linear"]


def metric(entry: dict[str, Any]) -> str:
    """The metric logreg reports for `entry`: the suite's per-set metric, top-1 for image folders."""
    return METRICS.get(entry["name"], "top1")


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
        for key, low in (("batch_size", 1), ("workers", 0)):
            v = entry.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
                errors.append(ConfigError(f"{where}.{key}", v, f"an integer >= {low}"))
        chosen = entry.get("protocols")
        if chosen is not None and (not isinstance(chosen, list) or not chosen or set(chosen) - set(PROTOCOLS)):
            errors.append(ConfigError(f"{where}.protocols", chosen, "a list of " + ", ".join(PROTOCOLS)))
            continue
        if entry.get("metric") is not None and entry["metric"] != metric(entry):
            errors.append(ConfigError(f"{where}.metric", entry["metric"], f"{metric(entry)}, the metric of "
                                      f"{entry['name']} (the ssl-transfer protocol's; null: the set's own)"))
        if entry["name"] == "voc2007" and set(protocols(entry)) - {"logreg"}:
            errors.append(ConfigError(f"{where}.protocols", chosen, "[logreg]: voc2007 is multi-label (11-point "
                                      "mAP), which the k-NN and linear probes do not score"))
        if entry["name"] == "imagefolder" and not entry.get("root"):
            errors.append(ConfigError(f"{where}.root", entry.get("root"),
                                      "a directory with train/<class>/* and test/<class>/* images"))
            continue
        if entry["name"] in SUITE:
            unused = [k for k in ("archive", "download", "train_size", "test_size") if entry.get(k) is not None]
            if unused:  # the suite's splits are the official ones, read from `root` only
                errors.append(ConfigError(f"{where}.{unused[0]}", entry[unused[0]], f"null: {entry['name']} is read "
                                          "from `root` with its official splits (no subsets, archives or downloads)"))
            errors += _suite_errors(entry, where)
            continue
        errors += _source_errors(entry, where)
    return errors


def _suite_errors(entry: dict[str, Any], where: str) -> list[ConfigError]:
    """Whether a suite set's copy is there and complete, as one error naming all it lacks."""
    from harness.core.data.transfer_sets import missing

    if not entry.get("root"):
        return [ConfigError(f"{where}.root", entry.get("root"),
                            f"a directory with a {entry['name']} copy in its torchvision or official layout")]
    gone = missing(entry["name"], entry["root"])
    if gone:
        return [ConfigError(f"{where}.root", entry["root"], f"a {entry['name']} copy in its torchvision or official "
                            f"layout; missing: {', '.join(gone)}")]
    return []


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


def _pretrain_size(pretrain: DictConfig) -> int:
    """The backbone's pretraining resolution: the dataset's image_size, CIFAR's 32 px otherwise."""
    return int(pretrain.dataset.get("image_size") or 32)


def suite_set(entry: dict[str, Any], cfg: DictConfig):
    """Transfer `entry` as a TransferSet (train, val, test): a suite copy read from its files, or a
    dataset read as training data is (CIFAR, image folders) with ssl-transfer's 20 % validation hold-out."""
    from harness.core.data import transfer_sets

    if entry["name"] in SUITE:
        return transfer_sets.read(entry["name"], entry["root"], seed=int(entry.get("subset_seed") or 0))
    from harness.core.data.datasets import load_dataset

    data = load_dataset(dataset_config(entry, cfg))
    splits = {"train": transfer_sets.Split(data.train_x, data.train_y.numpy()),
              "test": transfer_sets.Split(data.test_x, data.test_y.numpy())}
    return transfer_sets.TransferSet(entry["name"], data.classes,
                                     transfer_sets.with_val(splits, int(entry.get("subset_seed") or 0)), metric(entry))


def split_features(backbone, images, size: int, mean, std, batch_size: int = 256, workers: int = 0,
                   what: str = "", verbose: bool = True) -> torch.Tensor:
    """Pooled features (N x D, float32, on the CPU) of a split's images resized and centre-cropped to
    `size`, normalised with `mean`/`std`. Each rank decodes and embeds its contiguous share; the shares
    are gathered, so every rank ends with all features at 1/world of the cost."""
    from harness.core import distributed
    from harness.core.data.transfer_sets import Images
    from harness.core.progress import Progress

    device = next(backbone.parameters()).device
    world, rank, n = distributed.world_size(), distributed.rank(), len(images)
    per_rank = -(-n // world)
    mine = range(rank * per_rank, min(n, (rank + 1) * per_rank))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(Images(images, size), mine), batch_size=batch_size,
                                         num_workers=workers)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    was_training = backbone.training
    backbone.eval()
    progress = Progress(f"[transfer] {what} features:", len(mine), every=10.0, enabled=verbose and rank == 0)
    out, done = [], 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.no_grad():
        for x in loader:
            x = (x.to(device, non_blocking=True).float().div_(255) - m) / s
            with autocast:
                out.append(backbone(x).float())
            done += len(x)
            progress.update(done, f"{done}/{len(mine)} images", final=done == len(mine))
    backbone.train(was_training)
    feats = torch.cat(out) if out else torch.zeros(0, backbone.feat_dim, device=device)
    if world > 1:
        padded = torch.zeros(per_rank, feats.shape[1], device=device)
        padded[: len(feats)] = feats
        feats = distributed.gather(padded, grad=False)[:n]
    return feats.cpu()


def _logreg_row(entry: dict[str, Any], tset, backbone, cfg: DictConfig, name: str, verbose: bool) -> dict | None:
    """The ssl-transfer protocol on one set: features of each split once, then (on the main rank) C
    chosen on val, refit on train + val, the set's metric on test. Other ranks return None."""
    from harness.core import distributed
    from harness.core.logreg import logreg_transfer

    size = int(entry.get("image_size") or _pretrain_size(cfg))
    feats = {split: (split_features(backbone, tset.splits[split].images, size, list(cfg.dataset.mean),
                                    list(cfg.dataset.std), int(entry.get("batch_size") or 256),
                                    int(entry.get("workers") or 0), f"{name} {split}", verbose).numpy(),
                     tset.splits[split].labels)
             for split in ("train", "val", "test")}
    if distributed.rank() != 0:
        return None
    out = logreg_transfer(feats["train"], feats["val"], feats["test"], tset.metric)
    if verbose:
        print(f"[transfer] {name}: logreg at {size} px, C={out['C']:.3g} chosen on val ({out['val']:.2f}); "
              f"test {tset.metric} {out['score']:.2f}", file=sys.stderr, flush=True)
    return {"dataset": name, "split": SPLIT_PREFIX + name, "protocol": LOGREG_PROTOCOL, "top1": out["score"],
            "top5": None, "metric": tset.metric}


def _probe_results(entry: dict[str, Any], chosen: list[str], cfg: DictConfig, backbone, linear_cfg,
                   verbose: bool) -> dict[str, tuple[float, float]]:
    """The k-NN and/or SGD linear probes of `entry` ({protocol: (top1, top5)}) on its train and test images."""
    from harness.core.data.augment import ViewMaker
    from harness.core.evaluate import knn_evaluate, linear_probe
    from harness.core.trainer import knn_settings

    device = next(backbone.parameters()).device
    mean, std = list(cfg.dataset.mean), list(cfg.dataset.std)  # the pretraining normalisation, as everywhere here
    if entry["name"] in SUITE:  # decoded whole at the set's size; train + val is the probes' train split
        from harness.core.data.transfer_sets import Images

        tset = suite_set(entry, cfg)
        size = int(entry.get("image_size") or _pretrain_size(cfg))
        decode = lambda split: torch.stack([Images(tset.splits[split].images, size)[i]
                                            for i in range(len(tset.splits[split].images))])
        train_x = torch.cat([decode("train"), decode("val")])
        train_y = torch.from_numpy(np.concatenate([tset.splits["train"].labels, tset.splits["val"].labels]))
        test_x, test_y, classes = decode("test"), torch.from_numpy(tset.splits["test"].labels), len(tset.classes)
    else:
        from harness.core.data.datasets import load_dataset

        data = load_dataset(dataset_config(entry, cfg))
        train_x, train_y, test_x, test_y, classes = data.train_x, data.train_y, data.test_x, data.test_y, \
            data.num_classes
    views = ViewMaker(cfg.augment, mean, std, device, seed=int(cfg.seed))
    queries = {"test": (test_x, test_y)}
    results: dict[str, tuple[float, float]] = {}
    if "knn" in chosen:
        results.update(knn_evaluate(backbone, train_x, train_y, queries, views.plain, knn_settings(cfg.eval),
                                    classes)["test"])
    if "linear" in chosen:
        results.update(linear_probe(backbone, train_x, train_y, queries, views.normalize, linear_cfg, classes,
                                    seed=int(cfg.seed), verbose=verbose)["test"])
    return results


def run_transfer(cfg: DictConfig, backbone, verbose: bool = True) -> tuple[list[dict[str, Any]], list[str]]:
    """The probes of the frozen `backbone` on every eval.transfer set of `cfg` (each set's `protocols`).

    `cfg.dataset.mean/std` must already be numbers (harness.core.data.normalization). Returns evals
    rows without run_id/run_key/epoch ({"dataset", "split", "protocol", "top1", "top5", "metric"}; a
    logreg row's top1 holds the set's metric, named in "metric") and one line per set that failed
    (e.g. a download without the internet): a set that fails after training is reported and skipped,
    never a reason to lose the trained run.
    """
    linear_cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR.parent / "eval" / "knn.yaml").linear,
                                 OmegaConf.select(cfg, "eval.linear", default={}) or {})
    rows, failures = [], []
    for entry in entries(OmegaConf.select(cfg, "eval.transfer", default=None)):
        name = label(entry)
        chosen = protocols(entry)
        if verbose:
            print(f"[transfer] {name}: {', '.join(chosen)} on the frozen backbone", file=sys.stderr, flush=True)
        try:
            found: list[dict[str, Any]] = []
            if "logreg" in chosen:
                row = _logreg_row(entry, suite_set(entry, cfg), backbone, cfg, name, verbose)
                found += [row] if row else []
            if set(chosen) & {"knn", "linear"}:
                for protocol, (top1, top5) in _probe_results(entry, chosen, cfg, backbone, linear_cfg,
                                                             verbose).items():
                    found.append({"dataset": name, "split": SPLIT_PREFIX + name, "protocol": protocol,
                                  "top1": top1, "top5": top5, "metric": "top1"})
                    if verbose:
                        print(f"[transfer] {name}: {protocol} top-1 {top1:.2f}%", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - one line per failed set; the others and the run go on
            first = (str(e).strip().splitlines() or [""])[0]
            failures.append(f"[transfer] {name} failed ({type(e).__name__}: {first}); nothing stored for it")
            if verbose:
                print(failures[-1], file=sys.stderr, flush=True)
            continue
        rows += found
    return rows, failures
