"""Stages (harness/jobs/stages.py): what a sweep shares is declared once per distinct artifact, built
once before the points, and a job never waits on another's build without a limit.

The Slurm side (stage jobs, dependencies, a requeued stage) is in tests/test_slurm.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from harness.artifacts import LockWaitTimeout, build_once
from harness.core.data.datasets import balanced_subset
from harness.jobs.config import compose
from harness.jobs.stages import stages_of, sweep_stages
from tests.conftest import requires_cifar, run_harness


def test_a_sweep_declares_each_shared_artifact_once_in_the_order_it_is_built(tmp_path):
    common = ["backbone=convnet", "weighting=scorecl_tiny", "positives=clsp_tiny", f"store.path={tmp_path}/r.duckdb"]
    points = [compose([*common, f"seed={seed}", f"method={method}"])
              for seed in (0, 1) for method in ("simclr", "byol")]
    stages, needs = sweep_stages(points)
    assert [s.name for s in stages] == ["dataset-cache", "scorecl-score-net", "clsp-diffusion", "clsp-shards",
                                        "clsp-assemble"]
    assert all(keys == [s.key for s in stages] for keys in needs)  # every point needs all five
    by_name = {s.name: s for s in stages}
    assert by_name["clsp-shards"].shards == [0, 1] and by_name["clsp-diffusion"].resumable is False
    assert by_name["clsp-assemble"].after[-1] == by_name["clsp-shards"].key
    assert all(by_name["dataset-cache"].key in s.after for s in stages[1:])  # all need the decoded data
    # Another score-net setting is another artifact, so another stage; the ratio-0 CLSP point needs none.
    other = compose([*common, "weighting.score_net.epochs=2", "positives.ratio=0"])
    assert [s.name for s in stages_of(other)] == ["dataset-cache", "scorecl-score-net"]
    assert stages_of(other)[1].key != by_name["scorecl-score-net"].key


HOLD = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1]); lock.acquire(); print("held", flush=True); time.sleep(600)
"""


def test_a_job_waiting_for_a_build_held_by_another_gives_up_with_a_line_naming_the_lock(tmp_path):
    path = tmp_path / "score_net" / "0123456789abcdef"
    path.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, f"{path}.lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # another job builds it and never finishes
        with pytest.raises(LockWaitTimeout) as e:
            build_once(path, lambda tmp: (tmp / "x").write_text("1"), timeout_s=0.5)
    finally:
        holder.kill()
        holder.wait()
    assert f"{path}.lock" in str(e.value) and "artifacts.lock_timeout_min" in str(e.value)
    assert "\n" not in str(e.value)
    assert not path.exists()
    # Once the holder is gone the same call builds it.
    assert (build_once(path, lambda tmp: (tmp / "x").write_text("1"), timeout_s=0.5) / "x").read_text() == "1"


@requires_cifar
def test_a_cold_local_sweep_of_four_points_decodes_the_dataset_once(tmp_path, cifar10_cached):
    data = cifar10_cached
    for split, xs, ys, n in (("train", data.train_x, data.train_y, 6), ("test", data.test_x, data.test_y, 2)):
        for i in balanced_subset(ys, 10 * n, seed=0).tolist():
            file = tmp_path / "tree" / split / data.classes[int(ys[i])] / f"{i:05d}.png"
            file.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(xs[i].permute(1, 2, 0).numpy()).save(file)
    out = run_harness("sweep=smoke", "hydra.sweeper.params={}", "seed=0,1,2,3", "dataset=imagefolder",
                      f"dataset.root={tmp_path}/tree", "dataset.image_size=32", f"dataset.cache_dir={tmp_path}/cache",
                      "dataset.train_size=null", "dataset.test_size=null", "dataset.val_size=0",
                      "trainer.batch_size=20", "trainer.epochs=1", f"store.path={tmp_path}/r.duckdb",
                      f"hydra.sweep.dir={tmp_path}/sweep", "-m")
    assert "Sweep finished: 4 point(s): 4 completed." in out.stderr
    # The line that starts a decode (its progress lines repeat the label, not this line).
    assert out.stderr.count(f"[data] decoding imagefolder from {tmp_path}/tree into ") == 1
    assert out.stderr.count("[stage] dataset-cache: building in the sweep driver") == 1
    assert out.stderr.index("[data] decoding") < out.stderr.index("[train]")  # before the first point
    assert len(list(Path(tmp_path / "cache").glob("*.pt"))) == 1
