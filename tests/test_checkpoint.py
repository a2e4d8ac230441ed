"""harness.core.checkpoint on real files: what the trainer saves loads with weights_only=True, the previous
checkpoint survives every step of a save, a cut-short or hostile file is never trusted, a full disk
leaves nothing behind."""

import errno
import os

import pytest
import torch
from torch import nn

from harness.core.checkpoint import load_checkpoint, previous_path, save_checkpoint
from harness.core.optim import build_optimizer
from harness.jobs.config import compose, instantiate
from harness.store import Store
from tests.fs_utils import small_file_system

METHODS = ("simclr", "byol", "mocov2", "nnclr", "sce", "simsiam", "vicreg", "wmse", "all4one")


class MakesAFile:
    """Unpickling this (with weights_only=False) opens `path` for writing, i.e. creates it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _temporaries(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("method,optimizer", [(m, None) for m in METHODS] + [("simclr", "adam"), ("simclr", "adamw")])
def test_what_the_trainer_saves_loads_with_weights_only(tmp_path, method, optimizer):
    cfg = compose([f"method={method}", "backbone=convnet", *([f"trainer.optimizer={optimizer}"] if optimizer else [])])
    model = instantiate(cfg.method, instantiate(cfg.backbone))
    special = list(model.optim_groups()) if hasattr(model, "optim_groups") else []
    optimizer = build_optimizer(nn.ModuleList([model, nn.ModuleList()]), cfg.trainer, 0.1, special)
    sum(p.float().sum() for p in model.parameters()).backward()
    optimizer.step()  # momentum buffers and the like now exist in the optimizer's state
    state = {"model": model.state_dict(), "addons": {}, "optimizer": optimizer.state_dict(), "epoch": 3,
             "step": 5, "sums": {"loss": torch.tensor(1.5)}}
    save_checkpoint(state, tmp_path / "checkpoint.pt")
    loaded = load_checkpoint(tmp_path / "checkpoint.pt")
    assert loaded is not None and loaded["epoch"] == 3 and loaded["step"] == 5
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])


def test_a_save_keeps_the_previous_checkpoint_and_no_temporary_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    for epoch in range(3):
        save_checkpoint({"epoch": epoch, "w": torch.full((4,), float(epoch))}, path)
    assert load_checkpoint(path)["epoch"] == 2
    assert torch.load(previous_path(path), weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]
    # A crash between the two renames of a save leaves only the previous checkpoint: it is used.
    path.unlink()
    assert load_checkpoint(path)["epoch"] == 1


@pytest.mark.parametrize("damage", ["truncated", "zero bytes", "hostile", "not a checkpoint"])
def test_an_unreadable_checkpoint_is_reported_in_one_line_and_the_previous_is_used(tmp_path, capsys, damage):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"epoch": 0}, path)
    save_checkpoint({"epoch": 1, "w": torch.zeros(1000)}, path)
    marker = tmp_path / "created-by-unpickling"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:3000])
    elif damage == "zero bytes":
        path.write_bytes(b"")
    elif damage == "hostile":
        torch.save({"epoch": 1, "model": MakesAFile(marker)}, path)
    else:
        torch.save([1, 2, 3], path)
    (tmp_path / ".checkpoint.pt.node7.123.abcd1234.tmp").write_bytes(b"left by a killed writer")

    state = load_checkpoint(path, label="[train]")
    assert state == {"epoch": 0}
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("[train] checkpoint.pt is unreadable (")
    assert lines[0].endswith("); resuming from checkpoint.prev.pt")
    if damage == "hostile":
        assert "refused by weights_only=True" in lines[0]
    assert not marker.exists()
    assert not path.exists() and (tmp_path / "checkpoint.pt.unreadable").exists()  # kept aside, never loaded
    assert _temporaries(tmp_path) == []
    if damage == "hostile":  # the file had teeth: trusting it would have created the file
        torch.load(tmp_path / "checkpoint.pt.unreadable", weights_only=False)
        assert marker.exists()


def test_with_no_readable_checkpoint_the_run_starts_over(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    assert load_checkpoint(path) is None and capsys.readouterr().err == ""  # nothing there: nothing to say
    path.write_bytes(b"")
    assert load_checkpoint(path, label="[diffusion]") is None
    assert capsys.readouterr().err == "[diffusion] checkpoint.pt is unreadable (zero bytes); starting over\n"


def test_the_ddpm_training_state_is_read_with_weights_only(tmp_path, capsys):
    from methods.clsp.diffusion import train_ddpm

    diffusion_cfg = {  # the tiny DDPM recipe, one short epoch
        **compose(["positives=clsp_tiny"]).positives.diffusion, "epochs": 1, "batch_size": 8}
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    marker = tmp_path / "created-by-unpickling"
    torch.save({"unet": MakesAFile(marker), "epoch": 0}, state_dir / "train_state.pt")
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    train_ddpm(images, diffusion_cfg, tmp_path / "ddpm", state_dir, torch.device("cpu"))
    err = capsys.readouterr().err
    assert "[diffusion] train_state.pt is unreadable (refused by weights_only=True" in err and "starting over" in err
    assert not marker.exists() and (tmp_path / "ddpm" / "unet").is_dir()


def test_a_full_disk_leaves_no_temporary_file_and_the_old_checkpoint_whole(tmp_path):
    folder = tmp_path / "small"
    with small_file_system(folder, 512) as mounted:
        if mounted is None:
            pytest.skip("no small file system can be mounted here (needs root and mount)")
        path = folder / "checkpoint.pt"
        save_checkpoint({"epoch": 0, "w": torch.zeros(10)}, path)
        with pytest.raises(OSError) as error:
            save_checkpoint({"epoch": 1, "w": torch.zeros(200_000)}, path)  # 800 KB on a 512 KB disk
        assert error.value.errno == errno.ENOSPC and error.value.filename == str(path)
        assert _temporaries(folder) == [] and load_checkpoint(path)["epoch"] == 0

        store = Store(folder / "r.duckdb")
        filler = folder / "filler"
        with open(filler, "wb", buffering=0) as f:  # fill the disk to the last byte
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        with pytest.raises(OSError) as error:
            store.write("metrics", [{"run_id": "r", "epoch": e, "name": "loss", "value": 1.0} for e in range(500)])
        assert error.value.errno == errno.ENOSPC
        assert [p for p in store.spool.rglob("*") if p.is_file()] == []
        os.unlink(filler)
