"""Hydra multirun: the summary table, failed jobs, the Optuna search, the joblib and submitit launchers, HParams."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from animal_lightning.sweeps import ERROR_FILE, STATUS_FILE, SweepSummary, shared_overrides, summarize
from tests.conftest import PROJECT, read_rows

pytestmark = pytest.mark.slow
TINY = ["experiment=demo", "data.num_classes=3", "data.train_per_class=12", "data.test_per_class=3",
        "data.image_size=32", "model.image_size=32", "trainer.max_epochs=1", "data.num_workers=0",
        "callbacks.progress_bar=null", "callbacks.model_summary=null", "callbacks.augmentation_samples=null"]


def run_train(tmp_path: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROJECT / "train.py"), *overrides, f"paths.root_dir={tmp_path}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "1"})


def sweep_dir(tmp_path: Path) -> Path:
    (found,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    return found



def hparams_events(run_dir: Path) -> tuple[set[str], dict[str, float]]:
    """The HParams plugin's summary tags and the final hp/* values in a run's TensorBoard events."""
    tags, values = set(), {}
    for path in glob.glob(str(run_dir / "tensorboard" / "**" / "events.out.tfevents*"), recursive=True):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    tags.add(value.tag)
                if value.tag.startswith("hp/") and event.step > 0:
                    values[value.tag] = value.tensor.float_val[0] if value.tensor.float_val else value.simple_value
    return tags, values


def test_grid_sweep_runs_every_job_and_lists_failures_in_the_summary(tmp_path):
    result = run_train(tmp_path, "-m", *TINY, "data.batch_size=4,0", "optimizer.lr=1e-3,3e-4")
    assert result.returncode == 0, result.stderr[-3000:]  # the failing jobs did not stop the sweep
    sweep = sweep_dir(tmp_path)
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0", "1", "2", "3"]
    rows = read_rows(sweep / "summary.csv")
    assert len(rows) == 4 and [r["job"] for r in rows] == ["0", "1", "2", "3"]
    for row in rows:
        if "data.batch_size=0" in row["overrides"]:
            assert row["status"] == "failed" and "data.batch_size=0 must be at least 1" in row["error"]
            assert row["val/acc_best"] == ""
        else:
            assert row["status"] == "completed" and 0.0 <= float(row["val/acc_best"]) <= 1.0, row
            assert float(row["test/acc"]) >= 0 and row["epochs"] == "1"
            metrics = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
            assert float(row["val/acc_best"]) == pytest.approx(metrics["val"]["val/acc_best"], abs=1e-4)
            tags, values = hparams_events(Path(row["run_dir"]))
            assert "_hparams_/experiment" in tags and "_hparams_/session_start_info" in tags
            assert values["hp/val_acc_best"] == pytest.approx(metrics["val"]["val/acc_best"], abs=1e-4)
    assert sum(r["status"] == "failed" for r in rows) == 2
    table = (sweep / "summary.md").read_text()
    assert table.count("| failed") == 2 and "common overrides: experiment=demo" in table
    assert "Sweep summary (4 jobs, 2 failed)" in result.stdout


def test_optuna_search_reports_the_best_trial_and_survives_failed_trials(tmp_path):
    result = run_train(tmp_path, "-m", "hparams_search=optuna", *TINY, "hydra.sweeper.n_trials=4",
                       "hydra.sweeper.sampler.n_startup_trials=4", "hydra.sweeper.sampler.seed=42",
                       "data.batch_size=choice(0,8)")  # batch 0: a trial that fails
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = sweep_dir(tmp_path)
    rows = read_rows(sweep / "summary.csv")
    assert len(rows) == 4
    failed = [r for r in rows if r["status"] == "failed"]
    completed = [r for r in rows if r["status"] == "completed"]
    assert failed and completed, rows  # seed 42 draws both batch sizes in 4 trials
    assert all("data.batch_size=0" in r["overrides"] for r in failed)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(float(r["val/acc_best"]) for r in completed), abs=1e-4)
    assert best["best_params"]["data.batch_size"] == 8


def test_optuna_study_on_disk_resumes_when_run_again(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    for _ in range(2):
        result = run_train(tmp_path, "-m", "hparams_search=optuna", *TINY, "hydra.sweeper.n_trials=2",
                           f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=resume_test",
                           "data.batch_size=8")
        assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="resume_test", storage=storage)
    assert len(study.trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_joblib_launcher_runs_jobs_in_parallel_processes_with_loader_workers(tmp_path):
    tiny = [o for o in TINY if not o.startswith("data.num_workers")]
    result = run_train(tmp_path, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *tiny,
                       "data.num_workers=1", "optimizer.lr=1e-3,3e-4")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(sweep_dir(tmp_path) / "summary.csv")
    assert [r["status"] for r in rows] == ["completed", "completed"]


def test_submitit_local_launcher_runs_a_job(tmp_path):
    result = run_train(tmp_path, "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", *TINY,
                       "optimizer.lr=1e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(sweep_dir(tmp_path) / "summary.csv")
    assert [r["status"] for r in rows] == ["completed"]


@pytest.mark.parametrize(("status", "value", "expected"), [
    (JobStatus.COMPLETED, 0.75, "completed"),
    (JobStatus.COMPLETED, None, "failed"),  # train.py's answer for a job that raised
    (JobStatus.COMPLETED, math.nan, "failed"),
    (JobStatus.FAILED, ValueError("boom"), "failed"),
])
def test_job_status_is_recorded_for_each_outcome(tmp_path, status, value, expected):
    job = tmp_path / "sweep" / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- optimizer.lr=0.1\n")
    if value is None:
        (job / ERROR_FILE).write_text("DataError: no images\n")
    config = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(job)}, "job": {"num": 0},
                                         "sweep": {"dir": str(tmp_path / "sweep")}}})
    callback = SweepSummary()
    callback.on_job_start(config)
    job_return = JobReturn(overrides=["optimizer.lr=0.1"], status=status, _return_value=value)
    callback.on_job_end(config, job_return)
    record = json.loads((job / STATUS_FILE).read_text())
    assert record["status"] == expected and record["overrides"] == ["optimizer.lr=0.1"]
    if value is None:
        assert record["error"] == "DataError: no images"
    if status == JobStatus.FAILED:
        assert record["error"] == "ValueError: boom"
    callback.on_multirun_end(config)
    (row,) = read_rows(tmp_path / "sweep" / "summary.csv")
    assert row["status"] == expected and row["overrides"] == "optimizer.lr=0.1"


def test_a_killed_job_shows_as_incomplete(tmp_path):
    for n in range(2):
        (tmp_path / str(n) / ".hydra").mkdir(parents=True)
        (tmp_path / str(n) / ".hydra" / "overrides.yaml").write_text(f"- seed={n}\n- model=resnet18\n")
    rows = summarize(tmp_path)
    assert [r["status"] for r in rows] == ["incomplete", "incomplete"]
    assert shared_overrides(rows) == ["model=resnet18"]


def test_multirun_with_ddp_runs_each_job_once_through_ddp_spawn(tmp_path):
    """Lightning's ddp launcher re-runs the command line in each rank: under -m the jobs switch to ddp_spawn."""
    result = run_train(tmp_path, "-m", "trainer=ddp_cpu", *TINY, "optimizer.lr=1e-3,3e-4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "logs" / "train" / "multiruns").iterdir())) == 1  # the sweep ran once
    rows = read_rows(sweep_dir(tmp_path) / "summary.csv")
    assert [(r["status"], r["epochs"]) for r in rows] == [("completed", "1"), ("completed", "1")]
    for row in rows:
        assert sorted(p.name for p in (Path(row["run_dir"]) / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_slurm_launcher_config_composes_for_two_nodes_of_four_gpus():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tests.conftest import CONF

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            cfg = compose("train", return_hydra_config=True,
                          overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2",
                                     "trainer=ddp", "trainer.num_nodes=2", "trainer.devices=4"])
    finally:
        GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 2, 4, 4)
    assert (cfg.trainer.strategy, cfg.trainer.num_nodes, cfg.trainer.sync_batchnorm) == ("ddp", 2, True)


def test_ddp_stays_ddp_when_slurm_started_the_ranks(monkeypatch):
    from animal_lightning.training import _cluster_starts_ranks

    assert not _cluster_starts_ranks()
    lsf = {"LSB_JOBID": "1", "LSB_DJOB_RANKFILE": "/none", "JSM_NAMESPACE_SIZE": "2", "JSM_NAMESPACE_LOCAL_RANK": "0"}
    for name, value in lsf.items():  # LSF's jsrun: what Lightning's LSFEnvironment detects
        monkeypatch.setenv(name, value)
    assert _cluster_starts_ranks()
    for name in lsf:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert _cluster_starts_ranks()
