"""DDP: the strategy chosen from the config (fast), and two real gloo processes training the demo data (slow)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from animal_lightning.data.synthetic import SyntheticSpec, ensure_synthetic_dataset
from tests.conftest import PROJECT


@pytest.mark.slow  # trains and predicts with two processes
def test_two_cpu_processes_agree_write_once_and_count_each_test_image_once(tmp_path):
    # 21 test and 9 validation images: odd counts, which a padding sampler would round up to 22 and 10
    spec = SyntheticSpec(num_classes=3, train_per_class=20, test_per_class=7, image_size=32, seed=5)
    root = ensure_synthetic_dataset(tmp_path / "synthetic", spec)  # before the ranks start: no race to write it
    overrides = ["data.num_classes=3", "data.train_per_class=20", "data.test_per_class=7", "data.image_size=32",
                 "data.seed=5"]
    result = subprocess.run([sys.executable, str(PROJECT / "tests" / "ddp_job.py"), str(tmp_path),
                             str(tmp_path / "synthetic"), *overrides], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # metrics are synced: both processes end with the same numbers
    assert 0.0 <= ranks[0]["val/acc_best"] <= 1.0 and "test/acc" in ranks[0]
    correct = ranks[0]["val/acc"] * 9  # 9 validation images (15% of 3 x 20): a count of them, not of 10
    assert abs(correct - round(correct)) < 1e-4, ranks[0]["val/acc"]

    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["animal_lightning"]["class_names"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["test/acc"] == pytest.approx(ranks[0]["test/acc"])

    with (run / "confusion_matrix.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    counts = [[int(v) for v in row[1:]] for row in rows]
    with (root / "test_labels.csv").open() as handle:
        labelled = sum(1 for _ in handle) - 1
    assert labelled == 21
    assert sum(map(sum, counts)) == labelled  # every test image once: no sampler padding, no rank missing
    diagonal = sum(counts[i][i] for i in range(len(counts)))
    assert ranks[0]["test/acc"] == pytest.approx(diagonal / labelled, abs=1e-6)

    # prediction on 2 processes: every test image exactly once, in the input order, as one process gives them
    predicted = {}
    for devices in (1, 2):
        output = tmp_path / f"predictions{devices}.csv"
        best = run / "checkpoints" / "best.ckpt"
        command = [sys.executable, str(PROJECT / "predict.py"), f"ckpt_path={best}", f"input={root / 'test'}",
                   "accelerator=cpu", f"devices={devices}", "precision=32-true", "batch_size=4", "num_workers=0",
                   "progress=false", f"output={output}", f"paths.root_dir={tmp_path}"]
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert result.returncode == 0, result.stderr[-4000:]
        assert result.stdout.count("Predicting 21 images") == 1  # the second process stays quiet
        with output.open(newline="") as handle:
            predicted[devices] = list(csv.DictReader(handle))
    ids = [row["image_id"] for row in predicted[2]]
    assert ids == sorted(p.name for p in (root / "test").iterdir() if p.suffix == ".jpg")  # 21, once each, in order
    assert [row["class"] for row in predicted[2]] == [row["class"] for row in predicted[1]]
    assert [float(r["confidence"]) for r in predicted[2]] == pytest.approx([float(r["confidence"])
                                                                           for r in predicted[1]], abs=1e-5)

    # engine=compiled on 2 processes: the first builds the cache before the second starts, which loads it
    output = tmp_path / "predictions_engine.csv"
    command = [sys.executable, str(PROJECT / "predict.py"), f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}",
               f"input={root / 'test'}", "accelerator=cpu", "devices=2", "engine=compiled",
               f"engine_cache={tmp_path / 'engines'}", "batch_size=4", "num_workers=0", "progress=false",
               f"output={output}", f"paths.root_dir={tmp_path}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("built in") == 1 and len(list((tmp_path / "engines").glob("compiled-*"))) == 1
    with output.open(newline="") as handle:
        engine_rows = list(csv.DictReader(handle))
    assert [row["image_id"] for row in engine_rows] == ids
    assert sum(a["class"] != b["class"] for a, b in zip(engine_rows, predicted[1], strict=True)) <= 1  # bf16


def test_ddp_with_a_frozen_backbone_expects_unused_parameters(compose_cfg):
    from animal_lightning.training import build_trainer

    cfg = compose_cfg("trainer=ddp_cpu", "model.freeze_backbone_epochs=1", "logger=csv")
    trainer = build_trainer(cfg, [], [])
    assert trainer.strategy._ddp_kwargs.get("find_unused_parameters") is True
    plain = build_trainer(compose_cfg("trainer=ddp_cpu", "logger=csv"), [], [])
    assert not plain.strategy._ddp_kwargs.get("find_unused_parameters")
    assert type(plain.strategy.launcher).__name__ == "_SubprocessScriptLauncher"


@pytest.mark.parametrize(("trainer", "multirun", "freezes", "expected"), [
    ({"strategy": "auto", "accelerator": "cpu", "devices": 2}, False, False, "ddp"),  # as Lightning's auto chooses
    ({"strategy": "auto", "accelerator": "cpu", "devices": 1}, False, True, "auto"),  # one process: no DDP
    ({"strategy": "auto", "accelerator": "cpu", "devices": 1, "num_nodes": 2}, False, False, "ddp"),
    ({"strategy": "ddp"}, True, False, "ddp_spawn"),  # a sweep job starts its ranks itself
    ({"strategy": "ddp"}, True, True, "ddp_spawn_find_unused_parameters_true"),
    ({"strategy": "ddp_find_unused_parameters_false"}, False, True, "ddp_find_unused_parameters_true"),
    ({"strategy": "ddp_spawn_find_unused_parameters_false"}, True, False, "ddp_spawn_find_unused_parameters_false"),
    ({"strategy": "ddp_fork"}, True, False, "ddp_fork"),
    ({"strategy": "deepspeed"}, True, True, "deepspeed"),  # not DDP: as configured
])
def test_the_strategy_is_settled_from_the_config(monkeypatch, trainer, multirun, freezes, expected):
    from animal_lightning import training

    monkeypatch.setattr(training, "_in_multirun", lambda: multirun)
    assert training.ddp_strategy(trainer, freezes) == expected


def test_the_trainer_is_built_once(compose_cfg, monkeypatch):
    from lightning.pytorch import Trainer

    from animal_lightning import training

    strategies = []
    original = Trainer.__init__

    def counted(self, *args, **kwargs):
        strategies.append(kwargs.get("strategy"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "__init__", counted)
    monkeypatch.setattr(training, "_in_multirun", lambda: True)
    cfg = compose_cfg("trainer=ddp_cpu", "model.freeze_backbone_epochs=1", "logger=csv")
    trainer = training.build_trainer(cfg, [], [])
    assert strategies == ["ddp_spawn_find_unused_parameters_true"]
    assert type(trainer.strategy.launcher).__name__ == "_MultiProcessingLauncher"


def test_a_sweep_job_starts_its_ddp_ranks_itself(compose_cfg, monkeypatch):
    from animal_lightning import training

    monkeypatch.setattr(training, "_in_multirun", lambda: True)
    trainer = training.build_trainer(compose_cfg("trainer=ddp_cpu", "logger=csv"), [], [])
    assert type(trainer.strategy.launcher).__name__ == "_MultiProcessingLauncher"  # ddp_spawn: no re-run of -m
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_NNODES", "1")
    monkeypatch.setenv("SLURM_NODEID", "0")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_NODELIST", "node1")
    on_slurm = training.build_trainer(compose_cfg("trainer=ddp_cpu", "logger=csv"), [], [])
    assert type(on_slurm.strategy.launcher).__name__ != "_MultiProcessingLauncher"  # srun started the ranks
