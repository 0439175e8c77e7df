"""Preemption: a signal mid-epoch saves last.ckpt and stops; the run resumes from it (by hand, by requeue)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from animal_lightning.errors import CheckpointError, ModelConfigError
from animal_lightning.preemption import Preempted, PreemptionCheckpoint, parse_signal, slurm_job_id
from animal_lightning.training import resume_in_run_folder
from tests.conftest import FAST, FAULTS_ENV, PROJECT
from tests.conftest import train_py as run_train

# 4 demo classes x 30 training images, 85% for training at batch 8: 13 steps an epoch.
STEPS_PER_EPOCH = 13
SMALL = ["data=synthetic", "data.num_classes=4", "data.train_per_class=30", "data.test_per_class=8",
         "data.image_size=32", *FAST, "data.batch_size=8", "trainer.max_epochs=2"]
FAULT = "+callbacks.fault._target_=faults.SignalAt"


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # fields after the name: state, ppid, ...
            found.append(int(stat.parent.name))
    return found


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_last_ckpt_and_ckpt_path_last_finishes_the_run(tmp_path, synthetic_root):
    # SIGTERM from outside to the whole process group, DataLoader workers included, as slurmstepd preempts
    marker = tmp_path / "signal"
    env = {**os.environ, **FAULTS_ENV}
    command = [sys.executable, str(PROJECT / "train.py"), *SMALL, f"data.root={synthetic_root}",
               "data.num_workers=2", FAULT, "+callbacks.fault.epoch=1", "+callbacks.fault.batch=3",
               f"+callbacks.fault.wait_for={marker}", f"paths.root_dir={tmp_path}"]
    with subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        deadline = time.monotonic() + 300
        while not Path(f"{marker}.ready").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert len(children(process.pid)) >= 2  # the train loader's workers are alive and get the signal too
        os.killpg(process.pid, signal.SIGTERM)
        Path(f"{marker}.sent").write_text("")
        stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    [run] = (tmp_path / "logs" / "train" / "runs").iterdir()
    last = run / "checkpoints" / "last.ckpt"
    assert f"Preempted: stopped by SIGTERM: checkpoint saved to {last}" in stdout
    saved = load(last)
    assert (saved["epoch"], saved["global_step"]) == (1, STEPS_PER_EPOCH + 4)  # mid-epoch: batch 3 finished
    assert saved["optimizer_states"] and saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert not (run / "metrics.json").exists()

    second = run_train(tmp_path, *SMALL, f"data.root={synthetic_root}", "data.num_workers=0", "ckpt_path=last")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Resuming from {last} (the newest run's last checkpoint)" in second.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 2 and metrics["test"]["test/acc"] is not None
    # the resumed epoch ran only its remaining batches: two epochs' worth of steps in all
    assert load(last)["global_step"] == 2 * STEPS_PER_EPOCH
    assert not list(run.glob("checkpoints/last-v*.ckpt"))  # resuming kept writing last.ckpt itself


@pytest.mark.slow
def test_sigterm_during_validation_stops_at_the_epoch_end_and_the_run_folder_resumes_itself(tmp_path,
                                                                                           synthetic_root):
    first = run_train(tmp_path, *SMALL, f"data.root={synthetic_root}", "data.num_workers=0", FAULT,
                      "+callbacks.fault.signal=SIGTERM", "+callbacks.fault.stage=validate", "+callbacks.fault.batch=0",
                      "+callbacks.fault.epoch=0", "+callbacks.fault.group=false")
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]  # not Lightning's exit status 0
    [run] = (tmp_path / "logs" / "train" / "runs").iterdir()
    last = run / "checkpoints" / "last.ckpt"
    assert f"Preempted: stopped by SIGTERM: checkpoint saved to {last}" in first.stdout
    assert load(last)["global_step"] == STEPS_PER_EPOCH  # validation finished, then the epoch's end was saved

    # the same run folder again (as a requeued job gets it): it resumes by itself with epoch 1
    second = run_train(tmp_path, *SMALL, f"data.root={synthetic_root}", "data.num_workers=0", f"hydra.run.dir={run}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Resuming from {last} (this run folder's own last checkpoint)" in second.stdout
    assert json.loads((run / "metrics.json").read_text())["epochs_completed"] == 2
    assert load(last)["global_step"] == 2 * STEPS_PER_EPOCH


@pytest.mark.slow
def test_time_limit_signal_under_submitit_requeues_and_the_job_resumes_itself(tmp_path, synthetic_root):
    # submitit's SIGUSR2: the job saves, submitit requeues it, the requeued job finds its last.ckpt and resumes
    once = tmp_path / "signalled"
    result = run_train(tmp_path, "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", *SMALL,
                       f"data.root={synthetic_root}", "data.num_workers=0", FAULT, "+callbacks.fault.epoch=1",
                       "+callbacks.fault.batch=3", "+callbacks.fault.signal=SIGUSR2",
                       "+callbacks.fault.group=false", f"+callbacks.fault.once={once}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert once.exists()  # the first attempt was signalled
    [sweep] = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    job_log = "\n".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.out"))
    last = sweep / "0" / "checkpoints" / "last.ckpt"
    assert f"stopped by SIGUSR2: checkpoint saved to {last}" in job_log
    assert "Requeued job" in job_log
    assert f"Resuming from {last} (this run folder's own last checkpoint)" in job_log
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 2 and load(last)["global_step"] == 2 * STEPS_PER_EPOCH
    assert "| completed |" in (sweep / "summary.md").read_text()


def test_handlers_go_in_when_training_starts_and_come_out_after(monkeypatch):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    trainer = SimpleNamespace(callbacks=[])
    callback = PreemptionCheckpoint()
    callback.setup(trainer, None, stage="test")
    callback.on_train_start(trainer, None)
    assert {s: signal.getsignal(s) for s in before} == before  # not when testing
    callback.setup(trainer, None, stage="fit")
    assert {s: signal.getsignal(s) for s in before} == before  # not before Lightning has put in its own
    callback.on_train_start(trainer, None)
    assert all(signal.getsignal(s) == callback._note for s in before)
    os.kill(os.getpid(), signal.SIGUSR1)  # noted, not acted on: the process goes on
    os.kill(os.getpid(), signal.SIGTERM)
    assert callback.received == signal.SIGUSR1  # the first one counts
    callback.teardown(trainer, None, stage="fit")
    assert {s: signal.getsignal(s) for s in before} == before


def test_tuning_runs_are_left_alone():
    from lightning.pytorch.callbacks import LearningRateFinder

    before = signal.getsignal(signal.SIGTERM)
    trainer = SimpleNamespace(callbacks=[LearningRateFinder()])
    callback = PreemptionCheckpoint()
    callback.setup(trainer, None, stage="fit")
    callback.on_train_start(trainer, None)
    assert signal.getsignal(signal.SIGTERM) == before


def test_loader_workers_let_the_first_signal_pass(monkeypatch):
    from animal_lightning.data.workers import worker_init

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.delenv("PL_SEED_WORKERS", raising=False)
    try:
        worker_init(0)
        os.kill(os.getpid(), signal.SIGTERM)  # the first one is let through ...
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # ... and the next one ends the worker
    finally:
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(signum, before if signum == signal.SIGTERM else signal.SIG_DFL)


def test_requeue_calls_the_launchers_handler_or_scontrol(monkeypatch):
    calls = []
    callback = PreemptionCheckpoint()
    callback._previous = {signal.SIGUSR2: lambda signum, frame: calls.append(("submitit", signum))}
    trainer = SimpleNamespace(is_global_zero=True)
    callback._requeue(trainer, signal.SIGUSR2)
    assert calls == [("submitit", signal.SIGUSR2)]

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setattr("animal_lightning.preemption.subprocess.run",
                        lambda cmd, **kw: calls.append(tuple(cmd)) or SimpleNamespace(returncode=0))
    callback._previous = {signal.SIGUSR1: signal.SIG_DFL}
    callback._requeue(trainer, signal.SIGUSR1)
    assert calls[-1] == ("scontrol", "requeue", "4242")
    callback._requeue(SimpleNamespace(is_global_zero=False), signal.SIGUSR1)  # other ranks leave it to rank 0
    assert len(calls) == 2


def test_slurm_job_id_reads_array_tasks_and_refuses_odd_values(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    assert slurm_job_id() == "17"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "16")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "16_3"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3; rm -rf /")
    assert slurm_job_id() is None


@pytest.mark.parametrize("name, expected", [("SIGTERM", signal.SIGTERM), ("usr1", signal.SIGUSR1),
                                            ("SIGUSR2", signal.SIGUSR2), (15, signal.SIGTERM), ("10", signal.SIGUSR1)])
def test_signal_names(name, expected):
    assert parse_signal(name) == expected


@pytest.mark.parametrize("name", ["SIGKILL", "SIGNOPE", "999", "term!"])
def test_bad_signal_names_are_a_one_line_config_error(name):
    with pytest.raises(ModelConfigError, match=r"callbacks.preemption.signals: .* is not a signal that can be caught"):
        PreemptionCheckpoint(signals=[name])
    with pytest.raises(ModelConfigError, match="sync_every_n_batches=0 must be at least 1"):
        PreemptionCheckpoint(sync_every_n_batches=0)


def test_preempted_exits_like_the_signal_and_says_how_to_resume(tmp_path):
    stopped = Preempted(signal.SIGUSR1, tmp_path / "last.ckpt")
    assert isinstance(stopped, SystemExit) and stopped.code == 128 + signal.SIGUSR1
    assert str(stopped) == f"stopped by SIGUSR1: checkpoint saved to {tmp_path / 'last.ckpt'}; " \
                           f"resume with ckpt_path={tmp_path / 'last.ckpt'}"


def _resume_cfg(tmp_path: Path, **values) -> OmegaConf:
    return OmegaConf.create({"ckpt_path": None, "auto_resume": True, "resume_in_place": True,
                             "paths": {"output_dir": str(tmp_path / "run"), "log_dir": str(tmp_path / "logs")},
                             **values})


def test_a_run_folder_with_its_own_last_ckpt_resumes_it_unless_auto_resume_is_off(tmp_path):
    cfg = _resume_cfg(tmp_path)
    resume_in_run_folder(cfg)
    assert cfg.ckpt_path is None  # a fresh folder starts afresh
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"x")
    resume_in_run_folder(cfg)
    assert cfg.ckpt_path == str(last)
    off = _resume_cfg(tmp_path, auto_resume=False)
    resume_in_run_folder(off)
    assert off.ckpt_path is None


def test_ckpt_path_last_without_any_run_is_a_one_line_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"no last.ckpt under .*logs/train: train first"):
        resume_in_run_folder(_resume_cfg(tmp_path, ckpt_path="last"))


@pytest.mark.slow
def test_under_ddp_the_ranks_agree_on_the_step_save_once_and_resume(tmp_path, synthetic_root):
    # 2 gloo processes, 51 training images each at batch 8: 6 steps an epoch. Rank 0 alone gets SIGTERM before
    # epoch 1's batch 2; the ranks compare notes every 2 batches, so both stop after batch 3: step 6 + 4.
    ddp = [*SMALL, f"data.root={synthetic_root}", "data.num_workers=0", "trainer=ddp_cpu",
           "callbacks.preemption.sync_every_n_batches=2"]
    first = run_train(tmp_path, *ddp, FAULT, "+callbacks.fault.signal=SIGTERM", "+callbacks.fault.epoch=1",
                      "+callbacks.fault.batch=2", "+callbacks.fault.group=false")
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]
    assert first.stdout.count("Preempted: stopped by SIGTERM: checkpoint saved to") == 1  # rank zero speaks
    [run] = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 6 + 4

    second = run_train(tmp_path, *ddp, "ckpt_path=last")
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["epochs_completed"] == 2
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 2 * 6


def test_a_forked_process_without_worker_init_takes_the_signal_as_usual(tmp_path):
    callback = PreemptionCheckpoint()
    callback._pid = os.getpid() + 1  # as seen from a child forked after the handlers went in
    before = signal.getsignal(signal.SIGUSR1)
    try:
        signal.signal(signal.SIGUSR1, callback._note)
        callback._note(signal.SIGUSR1, None)
        assert callback.received is None and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_preempted_before_any_checkpoint_or_without_saving_says_so(tmp_path):
    assert str(Preempted(signal.SIGTERM, None, saved=False)) == \
        "stopped by SIGTERM before the first checkpoint: start the run again"
    assert str(Preempted(signal.SIGTERM, tmp_path / "last.ckpt", saved=False)) == \
        f"stopped by SIGTERM: no checkpoint written at the stop; the latest is {tmp_path / 'last.ckpt'}; " \
        f"resume with ckpt_path={tmp_path / 'last.ckpt'}"


@pytest.mark.slow
def test_without_the_callback_lightnings_sigterm_stop_still_exits_143_not_0(tmp_path, synthetic_root):
    result = run_train(tmp_path, *SMALL, f"data.root={synthetic_root}", "data.num_workers=0",
                       "callbacks.preemption=null", FAULT, "+callbacks.fault.signal=SIGTERM",
                       "+callbacks.fault.epoch=1", "+callbacks.fault.batch=3", "+callbacks.fault.group=false")
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    [run] = (tmp_path / "logs" / "train" / "runs").iterdir()
    last = run / "checkpoints" / "last.ckpt"
    assert f"Preempted: stopped by SIGTERM: no checkpoint written at the stop; the latest is {last}" in result.stdout
    assert load(last)["global_step"] == STEPS_PER_EPOCH  # epoch 0's end: Lightning saved nothing at the stop
