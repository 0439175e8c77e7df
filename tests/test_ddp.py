"""Real DDP on the CPU: two gloo processes train the demo data (trainer=ddp_cpu)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import PROJECT

pytestmark = pytest.mark.slow


def test_two_cpu_processes_agree_write_once_and_count_each_test_image_once(synthetic_root, tmp_path):
    result = subprocess.run([sys.executable, str(PROJECT / "tests" / "ddp_job.py"), str(tmp_path), str(synthetic_root)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # metrics are synced: both processes end with the same numbers
    assert 0.0 <= ranks[0]["val/acc_best"] <= 1.0 and "test/acc" in ranks[0]

    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["animal_lightning"]["class_names"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["test/acc"] == pytest.approx(ranks[0]["test/acc"])

    with (run / "confusion_matrix.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    counts = [[int(v) for v in row[1:]] for row in rows]
    with (synthetic_root / next(p.name for p in synthetic_root.iterdir() if p.is_dir()) / "test_labels.csv").open() \
            as handle:
        labelled = sum(1 for _ in handle) - 1
    assert sum(map(sum, counts)) == labelled  # every test image once: no sampler padding, no rank missing
    diagonal = sum(counts[i][i] for i in range(len(counts)))
    assert ranks[0]["test/acc"] == pytest.approx(diagonal / labelled, abs=1e-6)
