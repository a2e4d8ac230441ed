"""The papers' tables as sweep presets (issue 26): every point a table cell naming its claim, and the
bill dry_run=true prints from the store's measured runs, never an estimate without its measurement."""

from __future__ import annotations

import csv
import itertools
import re

from omegaconf import OmegaConf

from harness.jobs.bill import Measurement, nearest, point_bill, train_images
from harness.jobs.config import compose
from harness.jobs.sweeps import preset_points
from tests.conftest import REPO, run_harness
from tests.leaderboard_util import add_run

CLAIM_IDS = {row["id"] for row in csv.DictReader((REPO / "leaderboard" / "claims.csv").open())}


def points_of(preset: str, *extra: str) -> list:
    """The composed configs of a preset's points: its grid (hydra.sweeper.params) x its listed points."""
    node = OmegaConf.load(REPO / "sweeps" / f"{preset}.yaml")
    params = OmegaConf.select(node, "hydra.sweeper.params", default={}) or {}
    grid = [[f"{k}={v}" for k, v in zip(params, combo)]
            for combo in itertools.product(*(str(v).split(",") for v in params.values()))]
    return [compose([f"sweep={preset}", *extra, *point]) for point in preset_points(node, grid)]


def test_the_clsp_and_sce_presets_are_their_tables_cells_each_naming_its_claim():
    clsp = points_of("clsp_paper")
    cells = {(c.method.name, c.positives.name, c.dataset.name, c.dataset.get("image_size")) for c in clsp}
    assert len(clsp) == len(cells) == 16
    assert {(m, p) for m, p, _, _ in cells} == {(m, p) for m in ("nnclr", "all4one") for p in ("none", "clsp")}
    for c in clsp:
        assert c.eval.linear.enabled and c.trainer.epochs == (400 if c.dataset.get("image_size") == 224 else 1000)
        if c.dataset.name == "cifar10":
            assert c.claim == f"clsp-{c.method.name}-cifar10" and c.claim in CLAIM_IDS
        else:
            assert c.claim.startswith("none: ")
        if c.dataset.name == "stl10":
            assert c.dataset.image_size == 64  # CLSP's DDPM size
        transfer = [e.name for e in c.eval.transfer]
        assert len(transfer) == (11 if c.dataset.get("image_size") == 224 else 0)
    sce = points_of("sce_paper")
    assert [(c.dataset.name, c.backbone.name) for c in sce] == [
        ("cifar10", "resnet18"), ("cifar100", "resnet18"), ("stl10", "resnet18"), ("tinyimagenet", "resnet18"),
        ("imagefolder", "resnet50")]
    imagenet = sce[-1]
    assert imagenet.claim == "sce-imagenet-200ep" and imagenet.claim in CLAIM_IDS
    assert imagenet.trainer.batch_size == 4096 and imagenet.method.queue_size == 65536
    assert {e.name for e in imagenet.eval.transfer} == {"food101", "cifar10", "cifar100", "sun397", "cars",
                                                        "aircraft", "voc2007", "dtd", "pets", "caltech101", "flowers"}
    assert all(c.method.name == "sce" and c.trainer.epochs == 200 for c in sce)
    # Where the data sit is not part of a run's identity; the claim a point tests is a label, not a setting.
    from harness.jobs.config import run_key

    elsewhere = points_of("sce_paper", "paper_data=/elsewhere")[:4]  # (an image folder is keyed by its files)
    assert [run_key(c) for c in elsewhere] == [run_key(c) for c in sce[:4]]


def measured(run_id: str, method: str = "simclr", backbone: str = "resnet18", dataset: str = "cifar10",
             size: int = 32, ips: float = 500.0, weighting: str = "none") -> Measurement:
    return Measurement(run_id, f"k-{run_id}", method, weighting, "none", backbone, dataset, size, "NVIDIA H200", 1, ips)


def test_the_nearest_measurement_is_named_with_what_differs_and_none_is_never_guessed(tmp_path):
    cfg = compose(["method=vicreg", "backbone=resnet18", "dataset=cifar100", "trainer.epochs=10",
                   "dataset.train_size=1000"])
    found = [measured("other-backbone", "vicreg", backbone="resnet50", dataset="cifar100"),
             measured("other-method", "simclr", dataset="cifar100", ips=9000.0),
             measured("other-dataset", "vicreg", dataset="cifar10", ips=400.0)]
    match, differs = nearest(cfg, found)
    assert match.run_id == "other-dataset" and differs == ["dataset"]  # the method sets a step's cost first
    bill = point_bill(cfg, found, tmp_path, done=False)
    assert bill.wall_seconds == 10 * 1000 / 400.0 and "from run other-dataset" in bill.text
    assert "nearest: dataset cifar10 differs" in bill.text
    none = point_bill(cfg, [found[0]], tmp_path, done=False)
    assert none.device_seconds is None and none.text.startswith("no measurement of resnet18 at 32 px")
    assert point_bill(cfg, [], tmp_path, done=True).device_seconds == 0.0


def test_stl10_pretraining_images_count_the_unlabeled_split(tmp_path):
    from tests.test_official_data import write_stl10

    write_stl10(tmp_path / "stl", unlabeled=25)
    cfg = compose(["dataset=stl10", f"dataset.root={tmp_path / 'stl'}", f"dataset.cache_dir={tmp_path / 'c'}"])
    assert train_images(cfg) == 30 + 25
    cfg.dataset.unlabeled = False
    assert train_images(cfg) == 30


def test_scorecl_paper_previews_every_point_its_claim_and_a_bill_from_the_measured_runs(tmp_path):
    from harness.store import Store
    from tests.test_export_transfer import image_folder

    image_folder(tmp_path / "data" / "imagenet100", size=8, classes=2, train=3, test=1)
    store = Store(tmp_path / "results.duckdb")
    add_run(store, "base", 80.0, fields={"backbone.name": "resnet18"})
    add_run(store, "weighted", 81.0, weighting="scorecl", fields={"backbone.name": "resnet18"})
    add_run(store, "at224", 70.0, method="vicreg", dataset="imagefolder",
            fields={"backbone.name": "resnet18", "dataset.image_size": 224})
    store.ingest()
    proc = run_harness("-m", "sweep=scorecl_paper", "hydra.sweeper.params.method=simclr", "trainer.batch_size=4",
                       "dry_run=true", f"store.path={store.path}", f"paper_data={tmp_path / 'data'}",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}")
    out = proc.stdout
    assert "6 point(s), all valid" in out
    for claim in ("scorecl-cifar10", "scorecl-cifar100", "scorecl-imagenet100"):
        assert sum(claim + '"' in line for line in out.splitlines()) == 2  # without and with ScoreCL
    bill = {int(m.group(1)): m.group(2) for m in re.finditer(r"^  #(\d+): (.*)$", out, re.M)}
    assert len(bill) == 6
    assert "1000 ep x 50,000 img at 1,000 img/s per device, from run base" in bill[0] and "same setting" in bill[0]
    assert "from run weighted" in bill[3] and "nearest: dataset cifar10 differs" in bill[4]
    assert "400 ep x 6 img" in bill[2] and "from run at224" in bill[2] and "nearest: method vicreg differs" in bill[2]
    for line in bill.values():  # every estimate names the run it came from
        assert "from run " in line or line.startswith("no measurement")
    assert re.search(r"total: [\d.,]+ h device time, about [\d.,]+ h wall-clock at 1 point at once", out)
    assert "scorecl-score-net" in out and "no measurement: no score_net artifact" in out
