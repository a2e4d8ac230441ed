"""``python -m harness.export RUN --out DIR``: a finished run's backbone as plain weights, with a model card.

RUN is a run key or a run id. DIR receives:

- ``backbone.pt``: the backbone's state dict (tensors only; ``torch.load(..., weights_only=True)``).
  For resnet18/resnet50 its keys are torchvision's (``conv1.weight``, ``layer1.0.bn1.running_mean``,
  ...): it loads into ``torchvision.models.resnet18()`` / ``resnet50()`` after the stem change the
  run trained with (``cifar``: conv1 3×3 stride 1 padding 1 without bias and no max-pool; ``mid``:
  that conv1 with the max-pool kept; ``imagenet``: unchanged) and with ``fc`` replaced by
  ``nn.Identity()`` (the backbone outputs pooled features; the file holds no fc). For the small
  ``convnet`` backbone there is no torchvision model: the file is our own
  ``harness.core.backbones.ConvNet``'s state dict.
- ``README.md``: how to load it (a short example), the input normalisation and the stem change.
- ``model_card.json`` and ``MODEL_CARD.md``: config, code commit, data, protocol results, cost,
  read from the run folder (its config, checkpoint and rows, the run's permanent record).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.atomic import atomic_file, write_text_atomic

STEMS = {
    "cifar": "conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False); maxpool = nn.Identity()",
    "mid": "conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False); maxpool kept",
    "imagenet": "torchvision's own stem (7x7 stride-2 conv1 and max-pool), unchanged",
}


def torchvision_weights(cfg: DictConfig, state: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(the state dict to write, the torchvision model it loads into or None for our own ConvNet)."""
    if str(cfg.backbone._target_).endswith(".ResNet"):
        # harness ResNet keeps torchvision's model as `.net`, with fc = Identity (no weights).
        return {k[len("net."):]: v.contiguous() for k, v in state.items()}, f"resnet{int(cfg.backbone.depth)}"
    return {k: v.contiguous() for k, v in state.items()}, None


def fresh_torchvision(model: str, stem: str):
    """A torchvision ResNet with the stem change `stem` and fc = Identity: the model the weights load into."""
    from torch import nn

    from harness.core.tv import torchvision

    net = getattr(torchvision.models, model)(weights=None)
    if stem in ("cifar", "mid"):
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    if stem == "cifar":
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def loading_example(cfg: DictConfig, model: str | None) -> str:
    """The few lines that load backbone.pt, for the README."""
    if model is None:
        kwargs = ", ".join(f"{k}={cfg.backbone[k]}" for k in ("width", "feat_dim") if k in cfg.backbone)
        return ("import torch; from harness.core.backbones import ConvNet  # this repository's module\n"
                f"net = ConvNet({kwargs}); net.load_state_dict(torch.load('backbone.pt', weights_only=True))")
    stem = str(cfg.backbone.get("stem", "cifar"))
    change = {"cifar": "net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False); net.maxpool = nn.Identity(); ",
              "mid": "net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False); ", "imagenet": ""}[stem]
    return ("import torch, torchvision; from torch import nn\n"
            f"net = torchvision.models.{model}(); {change}net.fc = nn.Identity(); "
            "net.load_state_dict(torch.load('backbone.pt', weights_only=True))")


def _normalisation(cfg: DictConfig) -> dict[str, Any]:
    ds = cfg.dataset
    if "auto" not in (ds.get("mean"), ds.get("std")):
        return {"mean": list(ds.mean), "std": list(ds.std), "source": "dataset config"}
    try:
        from harness.core.data.normalization import normalization

        mean, std = normalization(ds, verbose=False)
        return {"mean": mean, "std": std, "source": "auto: computed from the training split"}
    except Exception as e:  # noqa: BLE001 - the dataset may not be on this machine; say so in the card
        return {"mean": OmegaConf.to_container(ds.mean) if OmegaConf.is_config(ds.mean) else ds.mean,
                "std": OmegaConf.to_container(ds.std) if OmegaConf.is_config(ds.std) else ds.std,
                "source": f"auto, not resolvable here ({type(e).__name__}: {e})"}


def _seconds(row: dict[str, Any]) -> float | None:
    """The last attempt's wall time, from the run row's ISO timestamps."""
    from datetime import datetime

    try:
        return (datetime.fromisoformat(row["finished_at"]) - datetime.fromisoformat(row["started_at"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


def model_card(folder: Path, cfg: DictConfig, done: dict[str, Any], model: str | None, weights: dict[str, Any],
               digest: str) -> dict[str, Any]:
    """The card's content: what a reader needs to trust and reuse the weights."""
    from harness.jobs.saved import eval_rows, run_row

    run_id = done["run_id"]
    row = run_row(folder, run_id)
    ds = cfg.dataset
    image_size = ds.get("image_size") if ds.name == "imagefolder" else 32
    return {
        "run_key": folder.name,
        "run_id": run_id,
        "name": cfg.get("name"),
        "method": str(cfg.method.name),
        "backbone": {
            "name": str(cfg.backbone.name),
            "torchvision_model": model,
            "stem": str(cfg.backbone.get("stem")) if model else None,
            "stem_change": STEMS[str(cfg.backbone.get("stem", "cifar"))] if model else
            "not a torchvision model: harness.core.backbones.ConvNet",
            "fc": "nn.Identity(): the backbone outputs pooled features" if model else None,
            "parameters": int(sum(v.numel() for v in weights.values() if v.is_floating_point())),
        },
        "input": {"image_size": image_size, "channels": "RGB", "scale": "pixels / 255, then (x - mean) / std",
                  **_normalisation(cfg)},
        "data": {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in ds.items()
                 if k in ("name", "root", "archive", "image_size", "train_size", "test_size", "val_size",
                          "subset_seed", "num_classes")},
        "training": {"epochs": int(cfg.trainer.epochs), "batch_size": int(cfg.trainer.batch_size),
                     "optimizer": str(cfg.trainer.optimizer), "lr_used": row.get("lr"), "seed": int(cfg.seed)},
        "code": {"git_commit": row.get("git_commit"), "git_dirty": row.get("git_dirty")},
        # dataset: the transfer set, or (null in the store) the dataset trained on.
        "results": [{**{k: r.get(k) for k in ("split", "protocol", "top1", "top5", "epoch")},
                     "dataset": r.get("dataset") or str(ds.name)} for r in eval_rows(folder, run_id)],
        "cost": {**{k: row.get(k) for k in ("gpu_hours", "device_name", "world_size", "nodes", "started_at",
                                            "finished_at", "epochs_done")}, "wall_seconds": _seconds(row)},
        "weights": {"file": "backbone.pt", "sha256": digest, "tensors": len(weights)},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def card_markdown(card: dict[str, Any], example: str) -> str:
    b, i = card["backbone"], card["input"]
    results = "\n".join(f"| {r['dataset'] or card['data']['name']} | {r['split']} | {r['protocol']} | "
                        f"{_pct(r['top1'])} | {_pct(r['top5'])} |" for r in card["results"]) or "| – | – | – | – | – |"
    cost = card["cost"]
    return f"""# Model card: {card['method']} · {b['name']} · {card['data']['name']}

Run `{card['run_key']}` (run id `{card['run_id']}`), code commit `{card['code']['git_commit']}`\
{' (with uncommitted changes)' if card['code']['git_dirty'] else ''}.

## Backbone
- Model: {b['torchvision_model'] or 'harness.core.backbones.ConvNet (not a torchvision model)'}
- Parameters: {b['parameters']:,}
- Stem: {b['stem_change']}
- Head: {b['fc'] or 'pooled features (feat_dim outputs)'}

## Input
{i['image_size']} px RGB images; {i['scale']}, mean {i['mean']}, std {i['std']} ({i['source']}).

## Loading
```python
{example}
```

## Data
{json.dumps(card['data'])}

## Training
{json.dumps(card['training'])}

## Results (frozen backbone)
| dataset | split | protocol | top-1 % | top-5 % |
|---|---|---|---|---|
{results}

## Cost
GPU hours: {_pct(cost.get('gpu_hours'))} (none on CPU); wall time: {_pct(cost.get('wall_seconds'))} s;
device: {cost.get('device_name')}; processes: {cost.get('world_size')};
started {cost.get('started_at')}, finished {cost.get('finished_at')} (UTC).

The full config is in `model_card.json` (`config`); the weights' SHA-256 is `{card['weights']['sha256']}`.
"""


def readme(card: dict[str, Any], example: str) -> str:
    b, i = card["backbone"], card["input"]
    what = (f"the state dict of torchvision's `{b['torchvision_model']}` with fc replaced by `nn.Identity()` "
            f"(the file holds no fc weights). Stem: {b['stem_change']}." if b["torchvision_model"] else
            "the state dict of this repository's small `harness.core.backbones.ConvNet` (no torchvision "
            "equivalent): load it with that module.")
    return f"""# {card['method']} {b['name']} backbone (run {card['run_key']})

`backbone.pt` is {what}

```python
{example}
```

Inputs: {i['image_size']} px RGB, `x / 255`, then normalised with mean {i['mean']} and std {i['std']}.
The model outputs pooled features. Results, data, config and cost: `MODEL_CARD.md` / `model_card.json`.
"""


def write_weights(weights: dict[str, Any], path: Path) -> str:
    """Publish `weights` (a plain state dict) at `path` atomically; returns the file's SHA-256."""
    import torch

    buffer = io.BytesIO()
    torch.save(weights, buffer)
    with atomic_file(path) as f:
        f.write(buffer.getbuffer())
    return hashlib.sha256(buffer.getbuffer()).hexdigest()


def export(folder: Path, out: Path) -> dict[str, Any]:
    """Write backbone.pt, README.md, model_card.json and MODEL_CARD.md for the run in `folder` into `out`."""
    from harness.jobs.saved import backbone_state, finished, run_config

    done = finished(folder)
    cfg = run_config(folder)
    weights, model = torchvision_weights(cfg, backbone_state(folder))
    if model is not None:  # the promise the README makes, checked before anything is written
        fresh_torchvision(model, str(cfg.backbone.get("stem", "cifar"))).load_state_dict(weights, strict=True)
    out.mkdir(parents=True, exist_ok=True)
    digest = write_weights(weights, out / "backbone.pt")
    example = loading_example(cfg, model)
    card = model_card(folder, cfg, done, model, weights, digest)
    write_text_atomic(out / "model_card.json", json.dumps(card, indent=1, default=str) + "\n")
    write_text_atomic(out / "MODEL_CARD.md", card_markdown(card, example))
    write_text_atomic(out / "README.md", readme(card, example))
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.export",
                                     description="Export a finished run's backbone weights and model card.")
    parser.add_argument("run", help="run key or run id")
    parser.add_argument("--out", type=Path, required=True, help="folder to write backbone.pt, README.md and the card")
    parser.add_argument("--db", type=Path, default=None, help="the store (default outputs/results.duckdb)")
    parser.add_argument("--runs", type=Path, default=None, help="the run folders' root (store.runs_dir)")
    args = parser.parse_args(argv)
    from harness.jobs.saved import RunNotFound, default_store, find_run

    try:
        folder = find_run(args.run, default_store(args.db, args.runs))
        card = export(folder, args.out)
    except RunNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported run {card['run_key']} ({card['method']}, {card['backbone']['name']}) to {args.out}: "
          "backbone.pt, README.md, model_card.json, MODEL_CARD.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
