"""Killed jobs: resuming after `kill -9` ends where an uninterrupted run ends; a kill mid-write loses no file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, PROJECT, train_py

pytestmark = pytest.mark.slow

# 4 demo classes x 30 training images at 32 px, 13 steps an epoch; in-process data loading (workers would
# restart their own random streams on resuming), deterministic algorithms
RUN = ["data=synthetic", "data.num_classes=4", "data.train_per_class=30", "data.test_per_class=8",
       "data.image_size=32", *FAST, "data.batch_size=8", "trainer.max_epochs=3", "trainer.deterministic=true"]


def metrics_of(root: Path) -> dict:
    """metrics.json of the one run under root (a resumed run writes into the run it continues)."""
    [found] = (root / "logs" / "train" / "runs").glob("*/metrics.json")
    return json.loads(found.read_text())


def test_kill_9_mid_epoch_then_ckpt_path_last_ends_with_the_uninterrupted_metrics(tmp_path, synthetic_root):
    data = f"data.root={synthetic_root}"
    whole_root, killed_root = tmp_path / "whole", tmp_path / "killed"
    whole_root.mkdir()
    killed_root.mkdir()
    whole = train_py(whole_root, *RUN, data)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = train_py(killed_root, *RUN, data, "+callbacks.fault._target_=faults.SignalAt",
                      "+callbacks.fault.signal=SIGKILL", "+callbacks.fault.epoch=1", "+callbacks.fault.batch=5",
                      "+callbacks.fault.group=false")
    assert killed.returncode == -signal.SIGKILL  # no handler can run: only what was on disk survives
    [run] = (killed_root / "logs" / "train" / "runs").iterdir()
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "metrics.json").exists()

    resumed = train_py(killed_root, *RUN, data, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = metrics_of(whole_root), metrics_of(killed_root)
    assert got["epochs_completed"] == expected["epochs_completed"] == 3
    assert got["val"] == expected["val"] and got["test"] == expected["test"]  # exactly, not approximately


WRITER = """
import os, sys, time, torch
from animal_lightning.atomic import AtomicCheckpointIO
path, writer, real_fsync = sys.argv[1], AtomicCheckpointIO(), os.fsync
writer.save_checkpoint({"step": 1, "weights": torch.full((4_000_000,), 1.0)}, path)
print("saved step 1", flush=True)
def fsync_then_stall(fd):  # step 2's bytes are all on disk, not yet in place: the worst moment for a kill
    real_fsync(fd)
    print("writing step 2", flush=True)
    time.sleep(120)
os.fsync = fsync_then_stall
writer.save_checkpoint({"step": 2, "weights": torch.full((4_000_000,), 2.0)}, path)
"""


def test_a_kill_9_in_the_middle_of_writing_a_checkpoint_leaves_the_previous_one_whole(tmp_path):
    from animal_lightning.atomic import AtomicCheckpointIO

    path = tmp_path / "checkpoints" / "last.ckpt"
    with subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                          cwd=PROJECT) as writer:
        assert writer.stdout.readline().strip() == "saved step 1"
        assert writer.stdout.readline().strip() == "writing step 2"
        [partial] = path.parent.glob(".last.ckpt.*.tmp")  # the new checkpoint, complete but not in place
        writer.kill()
        writer.wait()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["step"] == 1 and torch.all(checkpoint["weights"] == 1.0)  # the previous one, whole
    assert partial.exists()  # a kill -9 leaves the temporary behind; the next save clears it away
    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)
    assert not partial.exists() and torch.load(path, weights_only=True)["step"] == 3
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())  # as open() would have made it


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    from animal_lightning.atomic import write_text_atomic

    target = write_text_atomic(tmp_path / "predictions.csv", "image_id,class\na.jpg,cat\n")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("animal_lightning.atomic.os.fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(target, "image_id,class\na.jpg,dog\n")
    assert target.read_text() == "image_id,class\na.jpg,cat\n"
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]


def test_training_writes_its_checkpoints_atomically(compose_cfg):
    from animal_lightning.atomic import AtomicCheckpointIO
    from animal_lightning.training import build_trainer

    for trainer in ("default", "ddp_cpu"):
        built = build_trainer(compose_cfg(f"trainer={trainer}", "logger=csv"), [], [])
        assert isinstance(built.strategy.checkpoint_io, AtomicCheckpointIO)
