"""Sweeps on this machine (launcher=local): failures reported, bad sweeps refused, Optuna tuning.

The Slurm side of the same behaviour is in test_slurm.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import optuna
import pytest
from PIL import Image

from harness.jobs import tuning
from harness.store import Store
from tests.conftest import Holder, requires_cifar, run_harness

pytestmark = [requires_cifar, pytest.mark.slow]

# The smoke preset made smaller still: 256 training images (128 held out), 1 epoch, one seed (its
# seed grid cleared so that each test's own grid is the sweep).
SMALL = ("sweep=smoke", "dataset.train_size=256", "trainer.epochs=1", "hydra.sweeper.params={}", "seed=0")


def sweep(tmp_path, name: str, *overrides: str):
    return run_harness(*SMALL, f"store.path={tmp_path}/r.duckdb", f"hydra.sweep.dir={tmp_path}/{name}", *overrides,
                       "-m", check=False)


def mixed_size_image_tree(root) -> None:
    """Enough images for SMALL, of two sizes: fine with dataset.image_size set (all are resized), a
    failure inside the job with image_size=null, found only as the images decode."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 40), ("test", 13)):
        for c in range(10):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(per_class):
                side = 24 if i == 0 else 32
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
                    root / split / f"c{c}" / f"{i}.png")


def test_a_failing_point_is_listed_with_its_error_and_the_others_still_run(tmp_path):
    mixed_size_image_tree(tmp_path / "tree")
    grid = ("dataset=imagefolder", f"dataset.root={tmp_path}/tree", "dataset.image_size=null,32")
    first = sweep(tmp_path, "a", *grid)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "Sweep finished: 2 point(s): 1 completed, 1 failed." in first.stderr
    failed = [line for line in first.stderr.splitlines() if "image_size=null" in line and " failed " in line]
    assert failed and "images of different sizes" in failed[0] and f"{tmp_path}/a/0" in failed[0]
    store = Store(tmp_path / "r.duckdb")
    assert sorted(r["status"] for r in store.query("SELECT status FROM runs")) == ["completed", "failed"]

    # Again, with the database held by another process the whole time (a user's duckdb shell): the summary
    # cannot be read, and the exit status still says that a point failed.
    holder = Holder(tmp_path / "r.duckdb")
    try:
        again = sweep(tmp_path, "b", *grid, "store.summary_wait_s=0")
    finally:
        holder.release()
    assert again.returncode == 1, again.stderr[-3000:]
    assert "Sweep finished; no summary: store " in again.stderr and "1 point(s) failed" in again.stderr
    # The failed point was tried again (a new run), the completed one was not.
    points = store.query("SELECT overrides, status FROM sweep_points WHERE sweep_id = ?", [f"{tmp_path}/b"])
    size = lambda overrides: next(o for o in overrides.split() if o.startswith("dataset.image_size="))  # noqa: E731
    assert sorted((size(r["overrides"]), r["status"]) for r in points) == [
        ("dataset.image_size=32", "skipped"), ("dataset.image_size=null", "failed")]
    assert sorted(r["status"] for r in store.query("SELECT status FROM runs")) == ["completed", "failed", "failed"]


def test_a_bad_sweep_is_refused_before_any_point_runs(tmp_path):
    bad = sweep(tmp_path, "a", "trainer.lr=0.1,-1", "positives.ratio=1.5", f"dataset.root={tmp_path}/nowhere")
    assert bad.returncode == 2
    assert "sweep refused, nothing was run or submitted (2 of 2 points invalid)" in bad.stderr
    for text in ("trainer.lr = -1", "positives.ratio = 1.5", "dataset.root = ", "point #1 (", "trainer.lr=-1"):
        assert text in bad.stderr
    assert "[train]" not in bad.stderr and not (tmp_path / "r.duckdb.runs").exists()
    unknown = sweep(tmp_path, "b", "method=simclr,nope")  # an option the group lacks: one line, as any bad value
    assert unknown.returncode == 2 and unknown.stderr.strip().splitlines() == [
        "error: invalid config: method = 'nope' is not allowed: expected one of all4one, byol, mocov2, nnclr, sce, "
        "simclr, simsiam, vicreg, wmse"]
    tuned = sweep(tmp_path, "c", "hydra/sweeper=harness_optuna", "trainer.lr=interval(-1.0,0.5)")
    assert tuned.returncode == 2 and "trainer.lr = -1.0 is not allowed" in tuned.stderr
    assert not (tmp_path / "r.duckdb.runs").exists()


def _trials(tmp_path, study: str) -> list:
    path = tuning.journal_path(tmp_path / "r.duckdb", study)
    assert path == tmp_path / "r.duckdb.optuna" / f"{study}.log"  # the leaderboard reads it there
    return optuna.load_study(study_name=study, storage=tuning.storage(path)).trials


def test_grid_sampler_runs_each_grid_point_once(tmp_path, cifar10_cached):
    out = sweep(tmp_path, "a", "hydra/sweeper=harness_optuna",
                "hydra.sweeper.sampler=grid", "hydra.sweeper.n_trials=10", "hydra.sweeper.study_name=grid",
                "trainer.lr=choice(0.1,0.4)", "method.temperature=0.2,0.5")
    assert out.returncode == 0, out.stderr[-3000:]
    trials = _trials(tmp_path, "grid")
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert {(t.params["trainer.lr"], t.params["method.temperature"]) for t in trials} == {
        (0.1, 0.2), (0.1, 0.5), (0.4, 0.2), (0.4, 0.5)}
    # The told values are the jobs' objectives: k-NN top-1 on the validation split.
    evals = Store(tmp_path / "r.duckdb").query(
        "SELECT r.objective AS o FROM runs r WHERE status = 'completed' ORDER BY o")
    assert sorted(t.value for t in trials) == pytest.approx([e["o"] for e in evals])
    assert "val" in {e["split"] for e in Store(tmp_path / "r.duckdb").query("SELECT split FROM evals")}


def test_tpe_study_resumes_from_its_journal_and_prunes(tmp_path, cifar10_cached):
    args = ("hydra/sweeper=harness_optuna", "trainer.epochs=2",
            "hydra.sweeper.study_name=tpe", "hydra.sweeper.n_jobs=1", "trainer.lr=tag(log,interval(0.01,1.0))",
            # keep only the top 0%: prune a trial whose best k-NN so far is below every earlier trial's at that epoch
            "hydra.sweeper.pruner=percentile", "hydra.sweeper.percentile=0", "hydra.sweeper.n_startup_trials=1",
            "hydra.sweeper.n_warmup_steps=0")
    first = sweep(tmp_path, "a", *args, "hydra.sweeper.n_trials=3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(_trials(tmp_path, "tpe")) == 3
    second = sweep(tmp_path, "b", *args, "hydra.sweeper.n_trials=6")  # a new driver: the study goes on
    assert second.returncode == 0, second.stderr[-3000:]
    trials = _trials(tmp_path, "tpe")
    assert [t.number for t in trials] == list(range(6))
    states = [t.state for t in trials]
    assert optuna.trial.TrialState.RUNNING not in states
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, states
    assert all(t.intermediate_values for t in trials)  # every trial reported its per-epoch k-NN
    runs = Store(tmp_path / "r.duckdb").query("SELECT status, epochs_done FROM runs WHERE status = 'pruned'")
    assert len(runs) == len(pruned) and all(r["epochs_done"] < 2 for r in runs)


def test_a_dry_run_previews_every_point_of_scorecl_all_and_runs_nothing(tmp_path):
    from harness.jobs.config import compose, run_key
    from harness.store import write_done

    db = tmp_path / "r.duckdb"
    # One point already completed: the preview says it would be skipped.
    done = compose(["sweep=scorecl_all", "method=vicreg", "weighting=scorecl", "dataset=cifar100", "seed=2",
                    f"store.path={db}"])
    (Store(db).runs / run_key(done)).mkdir(parents=True)
    write_done(Store(db).runs / run_key(done), "r1", 50.0)
    proc = run_harness("sweep=scorecl_all", "dry_run=true", f"store.path={db}", f"hydra.sweep.dir={tmp_path}/s",
                       "-m", check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "Sweep preview (dry_run=true): 48 point(s), all valid; nothing was run or submitted."
    header = lines[2].split()
    assert header == ["#", "method", "weighting", "dataset", "seed", "run_key", "would"]  # only what differs
    points = [line.split() for line in lines[4:4 + 48]]
    assert [p[0] for p in points] == [str(i) for i in range(48)]
    assert {(p[1], p[2], p[3], p[4]) for p in points} == {
        (m, w, d, s) for m in ("simclr", "simsiam", "wmse", "vicreg") for w in ("none", "scorecl")
        for d in ("cifar10", "cifar100") for s in "012"}
    skipped = [p for p in points if p[-1] != "run"]
    assert [(p[1:5], p[5]) for p in skipped] == [(["vicreg", "scorecl", "cifar100", "2"], run_key(done))]
    assert "53 would run, 1 already completed" in proc.stdout  # 47 points and the 6 floor points
    assert "Random-init floor (sweep_floor: true): 6 more point(s)" in proc.stdout
    # Nothing ran: no database, no run folder but the planted one, no summary of a finished sweep.
    assert not db.exists() and [p.name for p in Store(db).runs.iterdir()] == [run_key(done)]
    assert "Sweep finished" not in proc.stderr and "[train]" not in proc.stderr

    # What `python -m harness.store prune --keep` keeps comes from the same points (harness/jobs/needed.py):
    # the same run keys in the same order (the grid, then the 6 floor points) and the same score nets.
    from harness.jobs.needed import sweep_configs
    from harness.jobs.stages import stages_of

    previewed = re.findall(r"^\d+ .* ([0-9a-f]{16})  (?:run|skip)", proc.stdout, re.M)
    score_nets = set(re.findall(r"scorecl-score-net ([0-9a-f]{16})", proc.stdout))
    assert len(previewed) == 54 and len(score_nets) == 2
    configs, spans = sweep_configs(["sweep=scorecl_all", f"store.path={db}"])
    assert [run_key(c) for c in configs] == previewed and spans == []
    keys = {stage.key for c in configs for stage in stages_of(c)}
    assert {Path(k).name for k in keys if "/score_net/" in k} == score_nets


def test_a_preset_with_sweep_floor_gains_one_shared_floor_point_per_dataset_and_seed():
    """scorecl_all's 48 points (4 methods × 2 weightings × 2 datasets × 3 seeds) gain 6 floor points: the
    untrained backbone does not depend on the method or the add-on, so all of them share one per dataset × seed."""
    import itertools

    from harness.jobs.config import compose, run_key
    from harness.jobs.sweeps import floor_points

    preset = compose(["sweep=scorecl_all"])
    grid = [[f"method={m}", f"weighting={w}", f"dataset={d}", f"seed={s}", "trainer.lr=0.3"]
            for m, w, d, s in itertools.product(("simclr", "simsiam", "wmse", "vicreg"), ("none", "scorecl"),
                                                ("cifar10", "cifar100"), (0, 1, 2))]
    floors = floor_points(preset, grid)
    assert len(floors) == 6
    assert {(f[0], f[1]) for f in floors} == {(f"dataset={d}", f"seed={s}") for d in ("cifar10", "cifar100")
                                              for s in (0, 1, 2)}
    for point in floors:
        cfg = compose(["sweep=scorecl_all", *point])
        assert cfg.trainer.epochs == 0 and cfg.weighting.name == "none" and cfg.method.name == "simclr"
    # Its run key is the ordinary one: asked for from another method's point, the same floor run.
    via_vicreg = floor_points(preset, [["method=vicreg", "weighting=scorecl", "dataset=cifar10", "seed=0"]])[0]
    assert run_key(compose(["sweep=scorecl_all", *via_vicreg])) == run_key(compose(["sweep=scorecl_all", *floors[0]]))
    # Without the flag (quickstart, smoke, the tuned presets) no point is added.
    assert floor_points(compose(["sweep=smoke"]), grid) == []


def test_sweep_floor_runs_the_floor_beside_the_sweep_and_the_page_ranks_against_it(tmp_path):
    from leaderboard.data import configurations, prepare

    out = sweep(tmp_path, "a", "sweep_floor=true", "method=byol")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Sweep finished: 2 point(s): 2 completed." in out.stderr
    store = Store(tmp_path / "r.duckdb")
    runs = store.query("SELECT method, weighting, epochs, status FROM runs ORDER BY epochs")
    assert runs == [{"method": "simclr", "weighting": "none", "epochs": 0, "status": "completed"},
                    {"method": "byol", "weighting": "none", "epochs": 1, "status": "completed"}]
    with store.connect() as con:
        prepare(con)
        # The floor row beside the trained one in the ranking (one protocol, the smoke preset's k=20).
        assert sorted(c["epochs"] for c in configurations(con)) == [0, 1]


def test_points_that_differ_in_values_share_one_composition_and_equal_hydras_own():
    """PointConfigs composes a defaults tree once and applies each point's plain values to a copy: every
    point's config (the hydra node too) equals what Hydra composes for it alone, and a point Hydra
    refuses is refused with Hydra's own error."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from harness.jobs.sweeps import CONF, PointConfigs, register_sweeps

    register_sweeps()
    points = [["method=simclr", "weighting=scorecl", "seed=0", "trainer.lr=0.3"],
              ["method=simclr", "weighting=scorecl", "seed=1", "trainer.lr=0.1"],  # the same tree: derived
              ["method=vicreg", "weighting=none", "seed=1", 'claim="a table\'s cell"'],
              ["seed=2", "+extra.note=1", "method.temperature=0.5"],
              ["trainer.lr=0.2", "++trainer.lr=0.4"],  # a value and a prefixed override on one key: Hydra's order
              ["trainer.lr=0.2", "method=byol", "trainer={epochs: 7}"],  # a dict value merges as Hydra merges
              ["seed=3", "hydra.job.name=x"],
              ["launcher=slurm", "launcher.nodes=2", "seed=4"],  # a group and a value inside it: derived
              ["launcher=slurm", "launcher.nodes=2", "seed=5"]]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("config", ["sweep=scorecl_all"], RunMode.MULTIRUN)
        hydras = loader.load_sweep_config
        ours = PointConfigs(loader)
        for point in points:
            assert (OmegaConf.to_container(ours(master, point), resolve=False)
                    == OmegaConf.to_container(hydras(master, point), resolve=False)), point
        assert len(ours.trees) == 6  # the nine points' distinct trees (the ++ point was composed whole)
        derived = ours(master, ["method=simclr", "weighting=scorecl", "seed=9"])
        assert OmegaConf.is_struct(derived) and derived.seed == 9 and derived.hydra.overrides.task[-1] == "seed=9"
        for bad in (["trainer.no_such_key=1"], ["seed=1", "trainer.lr.deeper=1"]):
            with pytest.raises(ConfigCompositionException) as theirs:
                hydras(master, bad)
            with pytest.raises(ConfigCompositionException) as mine:
                ours(master, bad)
            assert str(mine.value) == str(theirs.value)


def test_a_slurm_job_unpickles_the_composed_trees_when_they_are_few():
    """The launcher (and its config loader) is pickled into every Slurm job: a task then derives its
    config from the driver's tree instead of composing it, unless the sweep has more trees than
    PointConfigs.CARRIED_TREES (each job's pickle would hold them all); either way the config is Hydra's."""
    import pickle

    import cloudpickle
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from harness.jobs.sweeps import CONF, PointConfigs, register_sweeps

    register_sweeps()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        hydras = loader.load_sweep_config
        master = loader.load_configuration("config", ["sweep=smoke"], RunMode.MULTIRUN)
        PointConfigs.install(loader)
        expected = OmegaConf.to_container(hydras(master, ["seed=3"]), resolve=False)
        loader.load_sweep_config(master, ["seed=1"])
        task = pickle.loads(cloudpickle.dumps(loader)).load_sweep_config
        assert len(task.trees) == 1 and OmegaConf.to_container(task(master, ["seed=3"]), resolve=False) == expected
        for method in ("byol", "vicreg", "simsiam", "wmse", "nnclr"):
            loader.load_sweep_config(master, [f"method={method}", "seed=1"])
        task = pickle.loads(cloudpickle.dumps(loader)).load_sweep_config
        assert len(task.trees) == 0 and OmegaConf.to_container(task(master, ["seed=3"]), resolve=False) == expected
