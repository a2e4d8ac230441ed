"""logging.tensorboard / logging.wandb: each holds every per-epoch metric the store holds, read back with
the tool's own reader (TensorBoard's EventAccumulator; W&B's record format and protobuf schema)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from harness.store import Store
from tests.conftest import TINY, requires_cifar, run_harness

TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
WANDB = importlib.util.find_spec("wandb") is not None
WHY = "the optional extra is not installed (CI installs it: pip install -e '.[dev]')"


def wandb_history(path: Path) -> list[dict]:
    """The history rows of a W&B run file (.wandb): a LevelDB-style log of 32 KiB blocks after a 7-byte
    header, each record's pieces with a 7-byte header (crc32c, little-endian length, kind), of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    blob, block, header = path.read_bytes(), 32768, 7
    assert blob[:4] == b":W&B"
    rows, pos, piece = [], header, b""
    while pos + header <= len(blob):
        left = block - pos % block
        if left < header:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(blob[pos + 4:pos + 6], "little"), blob[pos + 6]
        if kind == 0 and length == 0:
            break
        piece += blob[pos + header:pos + header + length]
        pos += header + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(piece)
            piece = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


@requires_cifar
@pytest.mark.slow
@pytest.mark.skipif(not (TENSORBOARD and WANDB), reason=WHY)
def test_tensorboard_and_wandb_offline_hold_every_per_epoch_metric(tmp_path, cifar10_cached):
    db = tmp_path / "r.duckdb"
    run_harness(*TINY, "dataset.train_size=256", "dataset.test_size=128", "trainer.batch_size=64", "trainer.epochs=2",
                "logging.tensorboard=true", "logging.wandb=offline", f"store.path={db}")
    store = Store(db)
    [run] = store.query("SELECT run_id, run_key FROM runs")
    rows = store.query("SELECT epoch, name, value FROM metrics WHERE value IS NOT NULL")
    stored = {(r["epoch"], r["name"]): r["value"] for r in rows}
    assert {e for e, _ in stored} == {1, 2} and {"loss", "lr", "knn_top1"} <= {n for _, n in stored}
    folder = store.runs / run["run_key"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    board = {(s.step, tag): s.value for tag in events.Tags()["scalars"] for s in events.Scalars(tag)}
    assert board.keys() == stored.keys()
    assert all(board[k] == pytest.approx(v, rel=1e-6, abs=1e-6) for k, v in stored.items())  # float32 on disk

    [wandb_file] = (folder / "wandb").glob(f"offline-run-*-{run['run_id']}/run-{run['run_id']}.wandb")
    history = {(h["epoch"], name): value for h in wandb_history(wandb_file) for name, value in h.items()
               if not name.startswith("_") and name != "epoch"}
    assert history.keys() == stored.keys()
    assert all(history[k] == pytest.approx(v) for k, v in stored.items())


def test_an_unknown_wandb_mode_is_refused_in_one_line(tmp_path):
    proc = run_harness("logging.wandb=sometimes", f"store.path={tmp_path / 'r.duckdb'}", check=False)
    assert proc.returncode == 2
    assert "logging.wandb = 'sometimes' is not allowed: expected null (off), offline or online" in proc.stderr
    assert not (tmp_path / "r.duckdb").exists()
