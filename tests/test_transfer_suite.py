"""The transfer suite (issue 26): each set's reader on a copy written here in its official or
torchvision layout (a few images each), transfer:logreg run on two small sets with the rows stored
under their metric names, and the bad-input lines (unknown name, missing copy, wrong metric) all at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.core.data import transfer_sets
from harness.jobs.transfer import run_transfer, transfer_errors


def jpeg(path: Path, value: int, size: tuple[int, int] = (12, 10)) -> None:
    """A flat grey JPEG of `value`: its class shows in its pixels, so the probes can separate classes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path, format="JPEG")


def write_dtd(root: Path, classes=("banded", "dotted", "zigzagged"), per_split=(4, 2, 3)) -> Path:
    base = root / "dtd" / "dtd"
    for split, n in zip(("train", "val", "test"), per_split):
        lines = []
        for c, name in enumerate(classes):
            for i in range(n):
                rel = f"{name}/{name}_{split}{i}.jpg"
                jpeg(base / "images" / rel, 30 + 90 * c + 3 * i)
                lines.append(rel)
        (base / "labels").mkdir(parents=True, exist_ok=True)
        (base / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
    return root


def write_pets(root: Path, breeds=("Abyssinian", "basset_hound"), trainval=10, test=4) -> Path:
    base = root / "oxford-iiit-pet"
    for file, n in (("trainval.txt", trainval), ("test.txt", test)):
        lines = []
        for c, breed in enumerate(breeds):
            for i in range(n):
                name = f"{breed}_{file[:4]}{i}"
                jpeg(base / "images" / f"{name}.jpg", 40 + 150 * c + 2 * i)
                lines.append(f"{name} {c + 1} {c + 1} {c + 1}")
        (base / "annotations").mkdir(parents=True, exist_ok=True)
        (base / "annotations" / file).write_text("\n".join(lines) + "\n")
    return root


def write_food101(root: Path) -> Path:
    base = root / "food-101"
    (base / "meta").mkdir(parents=True)
    (base / "meta" / "classes.txt").write_text("apple_pie\nbaby_back_ribs\n")
    for split, n in (("train", 5), ("test", 2)):
        lines = [f"{c}/{split}{i}" for c in ("apple_pie", "baby_back_ribs") for i in range(n)]
        for line in lines:
            jpeg(base / "images" / f"{line}.jpg", 50)
        (base / "meta" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def write_aircraft(root: Path) -> Path:
    base = root / "fgvc-aircraft-2013b" / "data"
    (base / "images").mkdir(parents=True)
    (base / "variants.txt").write_text("707-320\nA300B4\nF/A-18\n")
    number = 1000
    for split in ("train", "val", "test"):
        lines = []
        for variant in ("707-320", "A300B4", "F/A-18"):
            for _ in range(2):
                jpeg(base / "images" / f"{number}.jpg", 60)
                lines.append(f"{number} {variant}")
                number += 1
        (base / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def write_voc2007(root: Path) -> Path:
    base = root / "VOCdevkit" / "VOC2007"
    objects = {"000001": [("dog", 0), ("person", 0)], "000002": [("car", 1)], "000003": [("car", 0), ("car", 1)],
               "000004": [("cat", 0)]}
    for image, objs in objects.items():
        jpeg(base / "JPEGImages" / f"{image}.jpg", 70)
        body = "".join(f"<object><name>{n}</name><difficult>{d}</difficult></object>" for n, d in objs)
        (base / "Annotations").mkdir(parents=True, exist_ok=True)
        (base / "Annotations" / f"{image}.xml").write_text(f"<annotation>{body}</annotation>")
    (base / "ImageSets" / "Main").mkdir(parents=True)
    for split, ids in (("train", ["000001", "000002"]), ("val", ["000003"]), ("test", ["000004"])):
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def write_caltech101(root: Path, per_class=(33, 31)) -> Path:
    for c, n in zip(("accordion", "airplanes"), per_class):
        for i in range(n):
            jpeg(root / "caltech101" / "101_ObjectCategories" / c / f"image_{i:04d}.jpg", 80, size=(6, 6))
    return root


def write_sun397(root: Path) -> Path:
    base = root / "SUN397"
    base.mkdir(parents=True)
    (base / "ClassName.txt").write_text("/a/abbey\n/b/bakery/shop\n")
    train, test = [], []
    for cls in ("/a/abbey", "/b/bakery/shop"):
        for i in range(3):
            for lines, kind in ((train, "tr"), (test, "te")):
                rel = f"{cls}/sun_{kind}{i}.jpg"
                jpeg(base / rel.lstrip("/"), 90)
                lines.append(rel)
    (base / "Training_01.txt").write_text("\n".join(train) + "\n")
    (base / "Testing_01.txt").write_text("\n".join(test) + "\n")
    return root


def write_flowers(root: Path) -> Path:
    from scipy.io import savemat

    base = root / "flowers-102"
    labels = np.array([1, 1, 2, 2, 3, 3, 1, 2, 3])
    for i in range(len(labels)):
        jpeg(base / "jpg" / f"image_{i + 1:05d}.jpg", 100)
    savemat(base / "imagelabels.mat", {"labels": labels[None]})
    savemat(base / "setid.mat", {"trnid": np.array([[1, 3, 5]]), "valid": np.array([[2, 4, 6]]),
                                 "tstid": np.array([[7, 8, 9]])})
    return root


def write_cars(root: Path) -> Path:
    from scipy.io import savemat

    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([["AM General Hummer SUV 2000",
                                                                           "Acura RL Sedan 2012"]], dtype=object)})
    kind = [("fname", "O"), ("class", "O")]
    for split, file, n in (("train", "devkit/cars_train_annos.mat", 4), ("test", "cars_test_annos_withlabels.mat", 2)):
        annos = np.zeros((1, n), dtype=kind)
        for i in range(n):
            annos[0, i] = (f"{i:05d}.jpg", np.array([[i % 2 + 1]]))
            jpeg(base / f"cars_{split}" / f"{i:05d}.jpg", 110)
        savemat(base / file, {"annotations": annos})
    return root


WRITERS = {"dtd": write_dtd, "pets": write_pets, "food101": write_food101, "aircraft": write_aircraft,
           "voc2007": write_voc2007, "caltech101": write_caltech101, "sun397": write_sun397,
           "flowers": write_flowers, "cars": write_cars}
# name -> (classes, train, val, test) of the copies written above
EXPECTED = {"dtd": (3, 12, 6, 9), "pets": (2, 16, 4, 8), "food101": (2, 8, 2, 4), "aircraft": (3, 6, 6, 6),
            "voc2007": (20, 2, 1, 1), "caltech101": (2, 48, 12, 4), "sun397": (2, 5, 1, 6), "flowers": (3, 3, 3, 3),
            "cars": (2, 4, 0, 2)}  # cars: 20 % of 4 training images rounds down to no val image


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_each_suite_set_is_read_with_its_official_splits(tmp_path, name):
    root = WRITERS[name](tmp_path / name)
    assert transfer_sets.missing(name, root) == []
    tset = transfer_sets.read(name, root)
    classes, train, val, test = EXPECTED[name]
    assert len(tset.classes) == classes
    assert [len(tset.splits[s].labels) for s in ("train", "val", "test")] == [train, val, test]
    for split in tset.splits.values():
        assert len(split.images) == len(split.labels) and all(Path(f).is_file() for f in split.images)
    assert tset.metric == transfer_sets.METRICS[name]


def test_labels_follow_each_layouts_rules(tmp_path):
    dtd = transfer_sets.read("dtd", write_dtd(tmp_path / "dtd"))
    assert dtd.classes == ["banded", "dotted", "zigzagged"]
    assert dtd.splits["test"].labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    pets = transfer_sets.read("pets", write_pets(tmp_path / "pets"))
    assert pets.classes == ["Abyssinian", "basset_hound"]
    voc = transfer_sets.read("voc2007", write_voc2007(tmp_path / "voc"))
    car, dog, person = (transfer_sets.VOC_CLASSES.index(c) for c in ("car", "dog", "person"))
    assert voc.splits["train"].labels[0, [dog, person]].tolist() == [1, 1]
    assert voc.splits["train"].labels[1, car] == -1  # only a difficult car
    assert voc.splits["val"].labels[0, car] == 1  # a difficult car beside a plain one
    flowers = transfer_sets.read("flowers", write_flowers(tmp_path / "flowers"))
    assert flowers.splits["test"].labels.tolist() == [0, 1, 2]
    assert flowers.splits["test"].images[0].endswith("image_00007.jpg")
    cars = transfer_sets.read("cars", write_cars(tmp_path / "cars"))
    assert cars.classes[1] == "Acura RL Sedan 2012" and cars.splits["test"].labels.tolist() == [0, 1]
    aircraft = transfer_sets.read("aircraft", write_aircraft(tmp_path / "aircraft"))
    assert aircraft.classes[2] == "F/A-18" and aircraft.splits["train"].labels.tolist() == [0, 0, 1, 1, 2, 2]
    caltech = transfer_sets.read("caltech101", write_caltech101(tmp_path / "caltech"))
    assert np.bincount(caltech.splits["test"].labels).tolist() == [3, 1]  # 30 per class train + val, the rest test
    sun = transfer_sets.read("sun397", write_sun397(tmp_path / "sun"))
    assert sun.classes == ["abbey", "shop"] and sun.splits["test"].labels.tolist() == [0, 0, 0, 1, 1, 1]


def pretrain_cfg(tmp_path, transfer):
    from harness.jobs.config import compose

    cfg = compose(["backbone=convnet", "backbone.width=8", "trainer.device=cpu"])
    cfg.dataset.mean, cfg.dataset.std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    cfg.eval.transfer = transfer
    return cfg


def test_logreg_transfer_on_two_small_sets_stores_rows_with_their_metric_names(tmp_path):
    from harness.jobs.config import instantiate
    from harness.store import Store

    dtd, pets = write_dtd(tmp_path / "dtd"), write_pets(tmp_path / "pets")
    transfer = [{"name": "dtd", "root": str(dtd), "image_size": 16},
                {"name": "pets", "root": str(pets), "image_size": 16, "protocols": ["logreg", "knn"]}]
    cfg = pretrain_cfg(tmp_path, transfer)
    assert transfer_errors(cfg.eval.transfer) == []
    torch.manual_seed(0)
    backbone = instantiate(cfg.backbone)
    rows, failures = run_transfer(cfg, backbone, verbose=False)
    assert failures == []
    by = {(r["dataset"], r["protocol"]): r for r in rows}
    assert set(by) == {("dtd", "logreg:lbfgs"), ("pets", "logreg:lbfgs"), ("pets", "knn:cosine:k=200:T=0.1"),
                       ("pets", "knn:cosine:k=20:T=0.07")}
    assert by[("dtd", "logreg:lbfgs")]["metric"] == "top1"
    assert by[("pets", "logreg:lbfgs")]["metric"] == "mean_per_class"
    # Flat images whose brightness is their class: even a random backbone's features separate them.
    assert by[("dtd", "logreg:lbfgs")]["top1"] == 100.0 and by[("pets", "logreg:lbfgs")]["top1"] == 100.0
    store = Store(tmp_path / "results.duckdb")
    store.write("evals", [{"run_id": "r1", "run_key": "k1", "epoch": 1, **r} for r in rows])
    store.ingest()
    with store.connect() as con:
        stored = con.execute("SELECT dataset, protocol, metric FROM evals WHERE protocol = 'logreg:lbfgs' "
                             "ORDER BY dataset").fetchall()
    assert stored == [("dtd", "logreg:lbfgs", "top1"), ("pets", "logreg:lbfgs", "mean_per_class")]


def test_bad_transfer_entries_are_one_line_each_all_at_once(tmp_path):
    dtd = write_dtd(tmp_path / "dtd")
    (dtd / "dtd" / "dtd" / "labels" / "test1.txt").unlink()
    errors = transfer_errors([{"name": "imagenet-r", "root": str(tmp_path)},
                              {"name": "dtd", "root": str(dtd)},
                              {"name": "flowers", "root": str(tmp_path / "nowhere")},
                              {"name": "pets", "root": str(write_pets(tmp_path / "pets")), "metric": "map11"},
                              {"name": "voc2007", "root": str(tmp_path), "protocols": ["knn"]},
                              {"name": "pets", "root": str(tmp_path / "pets"), "train_size": 10}])
    lines = [str(e) for e in errors]
    assert all("\n" not in line for line in lines)
    assert any("eval.transfer.0.name" in x and "'imagenet-r'" in x and "dtd" in x for x in lines)
    assert any("eval.transfer.1.root" in x and "labels/test1.txt" in x for x in lines)
    assert any("eval.transfer.2.root" in x and "nowhere" in x for x in lines)
    assert any("eval.transfer.3.metric" in x and "mean_per_class" in x for x in lines)
    assert any("eval.transfer.4.protocols" in x and "multi-label" in x for x in lines)
    assert any("eval.transfer.5.train_size" in x and "official splits" in x for x in lines)
    assert len(errors) >= 6


def test_the_page_shows_the_suite_table_with_its_average_beside_sces_published_row(tmp_path):
    from harness.store import Store
    from leaderboard.__main__ import main as leaderboard_main
    from tests.leaderboard_util import add_run

    store = Store(tmp_path / "results.duckdb")
    add_run(store, "r0", 80.0, seed=0)
    store.write("evals", [{"run_id": "r0", "run_key": "k-r0", "protocol": "logreg:lbfgs", "split": f"transfer:{d}",
                           "dataset": d, "top1": v, "top5": None, "metric": m, "epoch": 10}
                          for d, v, m in (("dtd", 60.0, "top1"), ("pets", 70.0, "mean_per_class"))])
    page = tmp_path / "page.html"
    assert leaderboard_main(["build", "--db", str(store.path), "--out", str(page), "--cdn"]) == 0
    html = page.read_text()
    section = html[html.index("<h2>Transfer</h2>"):html.index("<h2>Add-on effects")]
    assert "pets (mean per-class acc.)" in section and "voc2007 (11-point mAP)" in section
    assert "65.00 (2 of 11)" in section  # our average over the two sets measured
    assert "84.00" in section and "80.39 (11 of 11)" in section  # SCE's row: VOC2007 and its 11-set average
    assert "SCE README (ssl-transfer protocol) · sce: 84.00" in section  # SCE's (77.1 + 90.9) / 2 on the same sets
    assert ">mean per-class acc.<" in section  # the metric named in the per-row table


def _features_on_rank(rank: int, world: int, images: torch.Tensor) -> tuple[torch.Tensor, int]:
    from harness.jobs.config import compose, instantiate
    from harness.jobs.transfer import split_features

    torch.manual_seed(0)
    backbone = instantiate(compose(["backbone=convnet", "backbone.width=8"]).backbone)
    calls = []
    backbone.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    feats = split_features(backbone, images, 16, [0.5] * 3, [0.25] * 3, batch_size=4, verbose=False)
    return feats, sum(calls)


def test_features_are_sharded_over_ranks_and_gathered_whole_on_each(tmp_path):
    from tests.dist_utils import run_ranks

    images = torch.randint(0, 256, (11, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    alone, _ = _features_on_rank(0, 1, images)
    (rank0, seen0), (rank1, seen1) = run_ranks(_features_on_rank, 2, images)
    assert (seen0, seen1) == (6, 5)  # each rank embeds its own share only
    assert torch.allclose(rank0, alone, atol=1e-5) and torch.allclose(rank1, alone, atol=1e-5)


def test_sces_transfer_claims_are_checked_against_the_logreg_rows(tmp_path):
    from harness.store import Store
    from leaderboard import claims, data
    from tests.leaderboard_util import add_run

    store = Store(tmp_path / "results.duckdb")
    for seed, score in ((0, 60.0), (1, 61.0)):
        add_run(store, f"s{seed}", 50.0, seed=seed, method="sce")
        store.write("evals", [{"run_id": f"s{seed}", "run_key": f"k-s{seed}", "protocol": "logreg:lbfgs",
                               "split": "transfer:dtd", "dataset": "dtd", "top1": score, "top5": None,
                               "metric": "top1", "epoch": 10}])
    with store.connect() as con:
        data.prepare(con)
        results = {r["claim"]: r for r in claims.check(con, claims.load())}
    dtd = results["sce-transfer-dtd"]
    assert (dtd["mean"], dtd["n"], dtd["claimed"]) == (60.5, 2, 77.1)
    assert dtd["verdict"] == "contradicted"  # the interval's top, about 66.9, is below 77.1
    assert results["sce-transfer-pets"]["verdict"] == "not measured"
    assert len([c for c in results if c.startswith("sce-transfer-")]) == 11
