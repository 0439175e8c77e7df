"""Killed jobs: `kill -9` mid-epoch, then resume from last.ckpt, ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.conftest import FAST, train_py

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
