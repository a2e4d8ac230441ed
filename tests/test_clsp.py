"""CLSP: the interpolated sampler against diffusers' own DDIM, the synthetic set's determinism and
resumable shards, and the positives=clsp add-on (ratio 0 = base loss, DDP gradients, end to end)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from harness.core import tv  # noqa: F401  (before diffusers)
from harness.core.addons import Batch
from harness.core.data.datasets import ImageData, load_dataset
from harness.core.distributed import DistInfo
from harness.core.trainer import fit
from harness.jobs.config import ConfigError, build_addons, compose, instantiate, validate
from harness.store import Store
from methods.clsp.diffusion import build_scheduler, build_unet, ddim_scheduler, diffusion_model, load_model
from tests.conftest import REPO, TINY, harness_env, requires_cifar, run_harness
from tests.dist_utils import run_ranks
from tests.events import wait_for

# isort: split
from diffusers import DDIMPipeline, DDPMScheduler

from methods.all4one import All4One
from methods.clsp.addon import similarity_term
from methods.clsp.diffusion import sample_interpolated
from methods.clsp.generate import generate_candidates, shard_file, synthetic_path
from methods.common import synthetic_positive_pairs
from methods.nnclr import NNCLR, nnclr_pairs
from methods.simclr import SimCLR

# The tiny CLSP stages on 128 real CIFAR-10 training images: a DDPM trained for 2 steps (its samples
# are noise; these tests are about the stages, not the images), shared through the artifact folder.
CLSP_TINY = ("positives=clsp_tiny", "dataset.train_size=128", "dataset.test_size=100", "trainer.batch_size=32",
             "positives.diffusion.epochs=1")


def tiny_unet(seed: int = 0, attention: bool = True, size: int = 16):
    """A randomly initialised UNet2DModel, small enough for a quick test (16×16 images)."""
    torch.manual_seed(seed)
    return build_unet({"block_out_channels": [16, 32], "layers_per_block": 1, "attention_levels": [1] if attention
                       else [], "norm_num_groups": 8, "mid_attention": attention}, size).eval()


def generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


# ---------------------------------------------------------------------------------------- sampler
def test_sampler_with_w_1_is_diffusers_ddim_from_the_same_noise():
    unet = tiny_unet()
    scheduler = ddim_scheduler(build_scheduler({"timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}), {})
    anchors = torch.rand(3, 3, 16, 16) * 2 - 1
    ours = sample_interpolated(unet, scheduler, anchors, weight=1.0, steps=5, eta=0.1,
                               generators=generators([1, 2, 3]), anchor_generators=generators([7, 8, 9]))
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=3, generator=generators([1, 2, 3]), eta=0.1, num_inference_steps=5,
                  output_type="pt").images * 2 - 1
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)  # float32 rounding, different batch shapes
    # The anchors matter once w < 1: same noise, a different result.
    mixed = sample_interpolated(unet, scheduler, anchors, weight=0.1, steps=5, eta=0.1,
                                generators=generators([1, 2, 3]), anchor_generators=generators([7, 8, 9]))
    assert (mixed - ours).abs().max() > 1e-3


def test_ddim_timesteps_are_the_released_codes(tmp_path):
    # An older scheduler_config.json (as on the hub) lacks keys; diffusers then lists them in
    # `_use_default_values`, as it does for any scheduler built in memory.
    old_file = {"_class_name": "DDPMScheduler", "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
                "num_train_timesteps": 1000, "clip_sample": True, "variance_type": "fixed_small"}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(old_file))
    trained = [None, build_scheduler({"timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}),
               DDPMScheduler.from_pretrained(tmp_path)]
    for source in trained:
        scheduler = ddim_scheduler(source, {})
        scheduler.set_timesteps(100)
        assert scheduler.timesteps.tolist() == list(range(999, 0, -10))  # linspace(-1, 999, 101) without the -1
        assert scheduler.final_alpha_cumprod.item() == 1.0
        assert scheduler.config.clip_sample is False  # the released code clips only the final image


def test_candidates_depend_only_on_image_id_and_candidate():
    unet = tiny_unet(attention=False)
    scheduler = ddim_scheduler(None, {})
    sampler = OmegaConf.create({"steps": 2, "eta": 0.1, "weight": 0.1})
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    together = generate_candidates(unet, scheduler, images, [10, 11, 12], 2, sampler, seed=0)
    alone = generate_candidates(unet, scheduler, images[1:2], [11], 2, sampler, seed=0)
    assert together.shape == (3, 2, 16, 16, 3) and together.dtype == torch.uint8
    # Float rounding may differ with the batch size; the image may not.
    assert (together[1:2].int() - alone.int()).abs().max() <= 1
    assert (together[:, 0].int() - together[:, 1].int()).abs().float().mean() > 5  # candidates differ
    other_seed = generate_candidates(unet, scheduler, images[1:2], [11], 2, sampler, seed=1)
    assert (other_seed.int() - alone.int()).abs().float().mean() > 5


# ------------------------------------------------------------------------------------ config
def test_clsp_config_errors_name_field_value_and_allowed():
    cfg = compose(["positives=clsp", "positives.ratio=1.5", "positives.mode=both", "positives.sampler.eta=2",
                   "positives.diffusion.path=/no/such/dir", "positives.candidates=0", "positives.view=2"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    text = str(e.value)
    for needle in ("positives.ratio = 1.5", "positives.mode = 'both'", "positives.sampler.eta = 2",
                   "positives.diffusion.path = '/no/such/dir'", "positives.candidates = 0", "positives.view = 2"):
        assert needle in text
    with pytest.raises(ConfigError, match="synthetic_positive_loss"):
        validate(compose(["positives=clsp", "positives.mode=extra_positive"]))  # SimCLR has no such hook
    validate(compose(["positives=clsp"]))
    validate(compose(["positives=clsp_tiny"]))


# ------------------------------------------------------------------------------------- add-on
class LinearBackbone(torch.nn.Module):
    """No batch norm, so a batch split over ranks computes exactly what the whole batch does."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 32))
        self.feat_dim = 32

    def forward(self, x):
        return self.net(x)


def _ddp_grads(rank, world, anchors, synthetic):
    torch.manual_seed(0)
    method = SimCLR(LinearBackbone(), proj_hidden_dim=16, proj_output_dim=8)
    model = torch.nn.parallel.DistributedDataParallel(method) if world > 1 else method
    n = len(anchors) // world
    part = slice(rank * n, (rank + 1) * n)
    views = [anchors[part], anchors[part].flip(-1)]
    loss = model(views).total() + 0.7 * similarity_term(method, views[0], synthetic[part])
    loss.backward()
    return [p.grad.clone() for p in method.parameters()]


def test_synthetic_term_outside_the_ddp_forward_still_averages_gradients():
    g = torch.Generator().manual_seed(0)
    anchors, synthetic = torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 3, 8, 8, generator=g)
    two = run_ranks(_ddp_grads, 2, anchors, synthetic)
    one = _ddp_grads(0, 1, anchors, synthetic)
    for a, b, whole in zip(two[0], two[1], one):
        torch.testing.assert_close(a, b)  # DDP made the ranks agree ...
        torch.testing.assert_close(a, whole, atol=1e-6, rtol=1e-4)  # ... on the whole batch's gradient


def test_a_synthetic_extra_positive_is_a_second_positive_beside_each_neighbour():
    """synthetic_positive_pairs is the stacked-positives loss minus the base: with every anchor given a
    synthetic embedding, ½·(NNCLR loss + synthetic term) = NNCLR's loss with (nn, z_syn) as positives."""
    g = torch.Generator().manual_seed(3)
    nn1, nn2, z_syn, p1, p2 = (torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1) for _ in range(5))
    every = torch.arange(6)
    stacked = nnclr_pairs(torch.stack([nn1, z_syn], 1), torch.stack([nn2, z_syn], 1), p1, p2, 0.2)
    base = nnclr_pairs(nn1, nn2, p1, p2, 0.2)
    torch.testing.assert_close(stacked, (base + synthetic_positive_pairs(z_syn, every, p1, p2, 0.2)) / 2)
    # A subset of anchors: each synthetic embedding picks out its own anchor's predictions among all 6.
    some = torch.tensor([4, 1])

    def slow(p):
        return torch.stack([-torch.log_softmax(z_syn[r] @ p.T / 0.2, dim=0)[some[r]] for r in range(2)])

    torch.testing.assert_close(synthetic_positive_pairs(z_syn[:2], some, p1, p2, 0.2), (slow(p1) + slow(p2)) / 2)
    validate(compose(["method=nnclr", "positives=clsp", "positives.mode=extra_positive"]))
    validate(compose(["method=all4one", "positives=clsp", "positives.mode=extra_positive"]))


def _addon_with(cfg_overrides, images, candidates, ratio):
    cfg = compose(["backbone=convnet", "positives=clsp", "positives.ratio=0", *cfg_overrides])
    addon = build_addons(cfg)[0]
    data = ImageData(images, torch.zeros(len(images), dtype=torch.long), images[:4], torch.zeros(4, dtype=torch.long),
                     ["a"], "test", train_index=torch.arange(len(images)))
    addon.setup(data, DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), host="h"))
    addon.ratio, addon.candidates = ratio, candidates  # given here instead of generated (see the stage tests)
    addon.row_of = torch.arange(len(candidates))  # the set's rows are the training images' positions
    return cfg, addon


@pytest.mark.parametrize("mode,method_cls", [("similarity", SimCLR), ("extra_positive", NNCLR),
                                             ("extra_positive", All4One)])
def test_the_addon_gives_a_ratio_share_of_anchors_a_candidate(mode, method_cls):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    candidates = torch.randint(0, 256, (40, 3, 32, 32, 3), dtype=torch.uint8, generator=g)
    cfg, addon = _addon_with([f"positives.mode={mode}"], images, candidates, ratio=0.5)
    small = {"proj_hidden_dim": 32, "proj_output_dim": 16}
    if method_cls is not SimCLR:
        small |= {"pred_hidden_dim": 32, "queue_size": 64}
    method = method_cls(instantiate_backbone(cfg), **small)
    index = torch.arange(16) * 2
    views = [(images[index].float() / 255 - 0.5) for _ in range(2)]
    parts = method(views)
    out = addon.step(Batch(images[index], index, views, parts, method, 0, 0.0))
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    assert method.projector[0].weight.grad.abs().sum() > 0  # the term trains the encoder
    if mode == "extra_positive":
        assert method.predictor[0].weight.grad.abs().sum() > 0  # through the anchors' predictions
        method.after_step(0.5)
        assert method.predictions is None  # the step's graph is not kept past it
    assert out.logs["loss_synthetic"] > 0
    assert addon.epoch_metrics() == {"synthetic_share": 0.5}


def instantiate_backbone(cfg):
    return instantiate(cfg.backbone)


def _train_one_epoch(tmp_path, positives: list[str]) -> list[float]:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(64) % 2
    data = ImageData(images, labels, images[:8], labels[:8], ["a", "b"], "test", train_index=torch.arange(64))
    cfg = compose(["backbone=convnet", "trainer.batch_size=16", "trainer.epochs=1", "trainer.warmup_epochs=0",
                   "trainer.device=cpu", *positives])
    torch.manual_seed(0)
    model = instantiate(cfg.method, instantiate(cfg.backbone))
    losses = []
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), host="h")
    fit(cfg, model, data, info, tmp_path / f"{len(positives)}.pt", lambda e, m: losses.append(m["loss"]),
        build_addons(cfg))
    return losses


def test_ratio_zero_gives_exactly_the_base_methods_loss(tmp_path):
    plain = _train_one_epoch(tmp_path, [])
    with_clsp = _train_one_epoch(tmp_path, ["positives=clsp", "positives.ratio=0"])
    assert plain == with_clsp  # the same views, steps and loss, to the last bit


# ------------------------------------------------------------------------ stages on real CIFAR-10
@pytest.fixture(scope="session")
def clsp_stages(tmp_path_factory, cifar10_cached):
    """The tiny DDPM trained once on 128 real CIFAR-10 images, in an artifact folder the tests share."""
    root = tmp_path_factory.mktemp("clsp")
    cfg = compose([*CLSP_TINY, f"store.path={root}/r.duckdb", f"artifacts.dir={root}/artifacts"])
    data = load_dataset(cfg.dataset)
    model = diffusion_model(cfg, data.train_x, torch.device("cpu"))
    return root, cfg, data, model


# A DDPM trained here on 256 real CIFAR-10 images (tests/fixtures/clsp_ddpm_cifar10_256/README.md says
# how), or any other CIFAR-10 diffusers folder given as $HARNESS_CLSP_MODEL.
TRAINED_MODEL = os.environ.get("HARNESS_CLSP_MODEL") or str(REPO / "tests" / "fixtures" / "clsp_ddpm_cifar10_256")


def model_training_images(model: str, cifar10_cached: ImageData) -> torch.Tensor:
    """The images `model` was trained on: the split its artifact.json names, else all of CIFAR-10's training set.

    CLSP's anchors are always the DDPM's own training images (the model is trained on the split it
    makes positives for), so a model built on a subset is tested on that subset.
    """
    record = Path(model) / "artifact.json"
    if not record.exists():
        return cifar10_cached.train_x
    split = json.loads(record.read_text())["config"]["data"]
    assert split["name"] == "cifar10", f"{model} was trained on {split['name']}, not CIFAR-10"
    overrides = [f"dataset.{key}={value}" for key, value in split.items() if key != "name"]
    cfg = compose([*overrides, "dataset.download=false"])
    return load_dataset(cfg.dataset).train_x


@requires_cifar
@pytest.mark.slow
def test_w_01_samples_are_closer_to_their_anchor_than_w_1(cifar10_cached):
    unet, trained = load_model(TRAINED_MODEL)
    # x0 clipped at every step (diffusers' DDIM default) keeps a CPU-trained model's trajectory in
    # range; with the released code's final-only clip its samples saturate, which hides any pull
    # (benchmarks/RESULTS.md, "CLSP anchor pull").
    scheduler = ddim_scheduler(trained, {"clip_sample": True})
    images = model_training_images(TRAINED_MODEL, cifar10_cached)
    anchors = images[torch.linspace(0, len(images) - 1, 64).round().long()].float() / 127.5 - 1
    seeds = range(len(anchors))
    distance = {}
    for w in (0.1, 1.0):
        out = sample_interpolated(unet.eval(), scheduler, anchors, weight=w, steps=20, eta=0.1,
                                  generators=generators(seeds), anchor_generators=generators([s + 100 for s in seeds]))
        distance[w] = (out - anchors).pow(2).flatten(1).mean(1)
    print(f"w=0.1: {distance[0.1].mean():.4f}, w=1: {distance[1.0].mean():.4f}, "
          f"closer: {(distance[0.1] < distance[1.0]).float().mean():.2f}")
    assert distance[0.1].mean() < 0.8 * distance[1.0].mean()
    assert (distance[0.1] < distance[1.0]).float().mean() >= 0.75  # 48 of 64: a sign test's p is 3e-5


@requires_cifar
@pytest.mark.slow
def test_a_killed_generation_resumes_without_redoing_finished_shards(clsp_stages):
    root, cfg, data, _ = clsp_stages
    # Its own generation seed: a set apart from the one the end-to-end test makes.
    overrides = [*CLSP_TINY, f"store.path={root}/r.duckdb", f"artifacts.dir={root}/artifacts",
                 "positives.generate.shards=3", "positives.generate.workers=1", "positives.generate.seed=1"]
    cfg = compose(overrides)
    parts = synthetic_path(cfg).parent / f"{synthetic_path(cfg).name}.parts"
    cmd = [sys.executable, "-m", "methods.clsp.generate", *overrides, "shard=all"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=harness_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    # Killed once its first shard is written, two shards of sampling before its end.
    wait_for("the first shard", lambda: proc.poll() is not None or shard_file(parts, 0, 3).exists(), every=0.05)
    assert proc.poll() is None, "generation ended before it could be killed:\n" + proc.stderr.read()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, shard processes included, as a scheduler kills it
    proc.wait()
    first = shard_file(parts, 0, 3)
    done_before = {p.name: p.stat().st_mtime_ns for p in parts.glob("shard-*.npy")}
    assert first.name in done_before and len(done_before) < 3
    resumed = subprocess.run(cmd, cwd=REPO, env=harness_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{len(done_before)} of 3 shards already done" in resumed.stderr
    assert "[clsp] shard 0/3:" not in resumed.stderr  # not generated again
    folder = synthetic_path(cfg)
    candidates = np.load(folder / "candidates.npy")
    assert candidates.shape == (128, 2, 32, 32, 3)
    assert np.array_equal(np.load(folder / "index.npy"), data.train_index.numpy())
    assert (folder / "grid.png").exists() and not parts.exists()
    # Each candidate is what its (image id, candidate) seeds give, whichever job and shard made it.
    unet, trained = load_model(clsp_stages[3])
    rows = [0, 60, 127]  # one from each shard
    again = generate_candidates(unet.eval(), ddim_scheduler(trained, cfg.positives.sampler), data.train_x[rows],
                                data.train_index[rows].tolist(), 2, cfg.positives.sampler, seed=1)
    assert np.abs(again.numpy().astype(int) - candidates[rows].astype(int)).max() <= 1


@requires_cifar
@pytest.mark.slow
def test_training_with_synthetic_positives_end_to_end(clsp_stages):
    root = clsp_stages[0]
    method = "nnclr" if (REPO / "methods" / "nnclr.py").exists() else "simclr"
    db = root / "e2e.duckdb"
    tiny = [a for a in TINY if not a.startswith(("dataset.", "trainer.batch_size"))]
    args = (*tiny, *CLSP_TINY, f"method={method}", "positives.ratio=0.5", "trainer.batch_size=32",
            "trainer.epochs=2", f"store.path={db}", f"artifacts.dir={root}/artifacts")
    proc = run_harness(*args)
    assert "[artifact] building diffusion model" not in proc.stderr  # the session's model is reused
    store = Store(db)
    run = store.query("SELECT * FROM runs")[0]
    assert run["status"] == "completed" and run["positives"] == "clsp" and run["synthetic_ratio"] == 0.5
    share = store.query("SELECT epoch, value FROM metrics WHERE name = 'synthetic_share' ORDER BY epoch")
    assert [r["epoch"] for r in share] == [1, 2] and all(abs(r["value"] - 0.5) < 0.02 for r in share)
    losses = store.query("SELECT value FROM metrics WHERE name IN ('loss', 'loss_synthetic')")
    assert losses and all(np.isfinite(r["value"]) for r in losses)
    assert store.query("SELECT count(*) AS n FROM evals WHERE top1 > 0")[0]["n"] >= 1
    grid = db.parent / "e2e.duckdb.runs" / run["run_key"] / "clsp_grid.png"
    assert grid.exists() and grid.stat().st_size > 1000
