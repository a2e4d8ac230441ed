"""ScoreCL's founding observation, measured: the stronger the augmentation, the larger the score
difference between an image and its augmented view.

A score network is trained here by DSM on real CIFAR-10 (the same artifact a training job with
the same weighting config would use, so it is trained once), then for held-out test images x
and views v at increasing strength, d(x, v) is measured with both statistics of
methods/scorecl/addon.py. Two strength axes, each alone: crop area (RandomResizedCrop at a fixed scale,
no jitter) and colour-jitter strength (p = 1, brightness/contrast/saturation 0.8·k, hue 0.2·k,
no crop). Reported per level: mean d; per axis: Spearman's ρ between level and d over all
(image, level) pairs. Controls: the same with an untrained network of the same architecture,
and the plain pixel distance ‖x − v‖/√D, to show how much of the trend the trained score adds.

    python benchmarks/scorecl_observation.py [HYDRA OVERRIDES] [--images N] [--no-report]
    e.g. python benchmarks/scorecl_observation.py weighting=scorecl_tiny dataset.train_size=5000 \\
             weighting.score_net.epochs=3 store.path=/tmp/obs/results.duckdb
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python benchmarks/x.py`

import torch  # noqa: E402

from harness.core.data.augment import Pipeline, augment  # noqa: E402
from methods.scorecl.addon import score_difference  # noqa: E402
from methods.scorecl.score_net import ScoreNet  # noqa: E402

# Weakest first, none of them the identity (a zero-strength level would make ρ trivially positive).
CROP_SCALES = (0.85, 0.6, 0.4, 0.2, 0.08)  # fraction of the image area kept
JITTER_STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)


def pipelines(levels_crop=CROP_SCALES, levels_jitter=JITTER_STRENGTHS) -> dict[str, list[tuple[float, Pipeline]]]:
    """The two strength axes: a list of (level, pipeline), weakest first."""
    plain = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=0.0, jitter_p=0.0, grayscale=0.0)
    crop = [(s, Pipeline(**{**plain, "crop_scale": (s, s), "crop_ratio": (3 / 4, 4 / 3)})) for s in levels_crop]
    jitter = [(k, Pipeline(**{**plain, "jitter_p": 1.0, "brightness": 0.8 * k, "contrast": 0.8 * k,
                              "saturation": 0.8 * k, "hue": 0.2 * k})) for k in levels_jitter]
    return {"crop": crop, "jitter": jitter}


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation (ties get their average rank)."""
    def ranks(v: torch.Tensor) -> torch.Tensor:
        v = v.double()
        order = torch.argsort(v)
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in torch.unique(v):  # average ranks within ties
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


@torch.no_grad()
def measure(net: ScoreNet | None, images: torch.Tensor, sigma: float, seed: int = 0,
            axes: dict[str, list[tuple[float, Pipeline]]] | None = None, batch: int = 256) -> dict[str, dict]:
    """For each axis: per-level mean d for 'vector' and 'norm' and Spearman ρ of level vs d.

    `images` uint8 N×3×H×W. With `net=None`, d is the pixel distance ‖x − v‖/√D (a control).
    """
    axes = axes or pipelines()
    x_all = images.float() / 127.5 - 1
    chunks = range(0, len(images), batch)
    sx_all = torch.cat([net.score(x_all[i:i + batch], sigma) for i in chunks]) if net is not None else None
    out = {}
    for axis, levels in axes.items():
        diffs: dict[str, list[torch.Tensor]] = {"vector": [], "norm": []} if net is not None else {"pixel": []}
        for i, (_, pipe) in enumerate(levels):
            g = torch.Generator().manual_seed(seed * 1000 + i)
            v_all = augment(images, pipe, g) * 2 - 1
            if net is None:
                diffs["pixel"].append((x_all - v_all).flatten(1).norm(dim=1) / (x_all[0].numel() ** 0.5))
                continue
            sv_all = torch.cat([net.score(v_all[j:j + batch], sigma) for j in chunks])
            for stat in diffs:
                diffs[stat].append(score_difference(sx_all, sv_all, stat))
        level_of = torch.arange(len(levels), dtype=torch.float64).repeat_interleave(len(images))
        out[axis] = {stat: {"means": [float(d.mean()) for d in ds], "rho": spearman(level_of, torch.cat(ds))}
                     for stat, ds in diffs.items()}
    return out


def rows_for(results: dict[str, dict], name: str, axes) -> list[dict]:
    rows = []
    for axis, by_stat in results.items():
        for stat, r in by_stat.items():
            row = {"net": name, "axis": axis, "statistic": stat, "spearman": f"{r['rho']:+.3f}"}
            for i, mean in enumerate(r["means"]):
                row[f"L{i}"] = f"{mean:.4g}"
            rows.append(row)
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="held-out test images to measure on")
    parser.add_argument("--no-report", action="store_true", help="print only; do not append to RESULTS.md")
    args, overrides = parser.parse_known_args(argv)

    from benchmarks.common import report
    from harness.core import distributed
    from harness.core.data.datasets import load_dataset
    from harness.jobs.config import compose, instantiate, validate

    cfg = compose(["weighting=scorecl", *overrides])
    validate(cfg)
    if cfg.trainer.get("num_threads"):
        torch.set_num_threads(int(cfg.trainer.num_threads))
    data = load_dataset(cfg.dataset)
    info = distributed.DistInfo(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    addon = instantiate(cfg.weighting, cfg)
    addon.setup(data, info)  # trains the score network once (an artifact), or loads it
    trained = addon._frozen[0].cpu()
    torch.manual_seed(12345)
    untrained = ScoreNet.create(cfg.weighting.score_net, int(data.train_x.shape[-1])).eval()
    images = data.test_x[:args.images]
    sigma = float(cfg.weighting.sigma)
    axes = pipelines()
    rows = (rows_for(measure(trained, images, sigma, axes=axes), "trained", axes)
            + rows_for(measure(untrained, images, sigma, axes=axes), "untrained", axes)
            + rows_for(measure(None, images, sigma, axes=axes), "pixels", axes))
    levels = "; ".join(f"{axis}: " + ", ".join(f"L{i}={lv:g}" for i, (lv, _) in enumerate(ls))
                       for axis, ls in axes.items())
    net = cfg.weighting.score_net
    seen = min(len(data.train_x), int(net.get("max_images") or len(data.train_x)))
    notes = (f"Score difference d(x, aug(x)) on {len(images)} CIFAR-10 test images; score net trained by DSM on "
             f"{seen} training images, {net.epochs} epochs, UNet channels "
             f"{list(net.unet.block_out_channels)}, σ set {net.num_sigmas} levels in [{net.sigma_min}, "
             f"{net.sigma_max}], scores at σ={sigma}. Levels (weakest first) — {levels} (crop: fraction of "
             f"area kept; jitter: strength k). Spearman ρ between level and d over all (image, level) pairs. "
             f"Artifact: {addon.artifact}. Command: python benchmarks/scorecl_observation.py {' '.join(argv)}")
    columns = ["net", "axis", "statistic", "spearman"] + [f"L{i}" for i in range(len(CROP_SCALES))]
    if args.no_report:
        from leaderboard.text import format_table

        print(format_table(rows, columns))
        print(notes)
    else:
        report("ScoreCL founding observation", rows, columns, notes)


if __name__ == "__main__":
    main(sys.argv[1:])
