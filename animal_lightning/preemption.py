"""Preemption: on a cluster's signal, save the run mid-epoch, requeue the job, and resume where it stopped.

Clusters stop jobs with a signal and a grace period: SLURM sends SIGTERM when it preempts, and the
signal named by `--signal` (submitit: SIGUSR2; Lightning's convention: SIGUSR1) shortly before the
time limit. `PreemptionCheckpoint` turns any of them into: finish the current batch, write
`<run>/checkpoints/last.ckpt` (loop state included, so Lightning resumes mid-epoch), requeue, exit.

Requeueing: for the time-limit signals the handler that was there before (submitit's, under
`hydra/launcher=slurm`) is called after the checkpoint is safe, so submitit resubmits the same job;
without one, a SLURM job is requeued with `scontrol requeue`. A requeued job has the same run folder
(submitit's pickled sweep folder, or a `hydra.run.dir` naming `$SLURM_JOB_ID`), and `train.py`
resumes any run folder that already holds `checkpoints/last.ckpt` (`auto_resume`).

Under DDP every rank gets the signal at a different moment; the ranks agree on the batch to stop at
every `sync_every_n_batches` batches (one small all-reduce), so all of them save together.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from animal_lightning.checkpoints import checkpoint_path
from animal_lightning.errors import ModelConfigError

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


class Preempted(SystemExit):
    """Training stopped on a signal; the exit status is 128 + the signal number, as if the signal had ended
    the process, so schedulers and shells read it the usual way. `saved`: the checkpoint was written at the
    stop; otherwise it is the latest one there was (Lightning's own SIGTERM stop saves nothing)."""

    def __init__(self, signum: int, checkpoint: Path | None, saved: bool = True):
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.checkpoint = checkpoint
        self.saved = saved

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        if self.checkpoint is None:
            return f"stopped by {name} before the first checkpoint: start the run again"
        where = "checkpoint saved to" if self.saved else "no checkpoint written at the stop; the latest is"
        return f"stopped by {name}: {where} {self.checkpoint}; resume with ckpt_path={self.checkpoint}"


def parse_signal(name: str | int) -> signal.Signals:
    """`SIGTERM`, `TERM`, `usr1` or a number -> the signal; anything else is a one-line config error."""
    if isinstance(name, int) or str(name).isdigit():
        try:
            return signal.Signals(int(name))
        except ValueError:
            pass
    else:
        upper = str(name).upper()
        found = getattr(signal, upper if upper.startswith("SIG") else f"SIG{upper}", None)
        if isinstance(found, signal.Signals) and found not in (signal.SIGKILL, signal.SIGSTOP):
            return found
    raise ModelConfigError(f"callbacks.preemption.signals: {name!r} is not a signal that can be caught; "
                           f"use names like {', '.join(DEFAULT_SIGNALS)}")


class PreemptionCheckpoint(Callback):
    """Save `last.ckpt` and stop (then requeue) when one of `signals` arrives during training.

    The handlers go in at the start of training, after Lightning's own: for SIGTERM Lightning would stop
    each rank on its own at the end of the batch without saving (and broadcast from inside the handler);
    here the ranks agree first and all save. Lightning puts the earlier handlers back when fit ends, on the
    normal and the exception path alike. A signal during validation is acted on at the epoch's end.
    """

    def __init__(self, signals: list[str | int] | tuple = DEFAULT_SIGNALS, requeue: bool = True,
                 sync_every_n_batches: int = 10):
        if int(sync_every_n_batches) < 1:
            raise ModelConfigError(f"callbacks.preemption.sync_every_n_batches={sync_every_n_batches} "
                                   "must be at least 1")
        self.signals = [parse_signal(name) for name in signals]
        self.requeue = bool(requeue)
        self.sync_every_n_batches = int(sync_every_n_batches)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._active = False
        self._pid = os.getpid()

    # -- the handler: only note the signal; the work happens between batches ---------------------------
    def _note(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker that did not run data.workers.worker_init
            signal.signal(signum, signal.SIG_DFL)
            return
        if self.received is None:
            self.received = signum

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder

        self._active = stage == "fit" and threading.current_thread() is threading.main_thread() and \
            not any(isinstance(c, (BatchSizeFinder, LearningRateFinder)) for c in trainer.callbacks)  # not tuning
        if self._active:
            self.received = None
            self._pid = os.getpid()
            self._previous = {signum: signal.getsignal(signum) for signum in self.signals}  # before Lightning's

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._active:
            for signum in self.signals:
                signal.signal(signum, self._note)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._active:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._active = False

    # -- between batches -------------------------------------------------------------------------------
    def _agreed(self, trainer: Trainer) -> int:
        """The signal to stop for (0: none). Under DDP every rank must call this at the same point."""
        received = self.received or 0
        if trainer.world_size > 1:
            received = int(trainer.strategy.reduce(torch.tensor(received, device=trainer.strategy.root_device),
                                                   reduce_op="max"))
        return received

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._active or (trainer.world_size > 1 and (batch_idx + 1) % self.sync_every_n_batches):
            return
        signum = self._agreed(trainer)
        if signum:
            self._save_and_stop(trainer, signum)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._active:
            signum = self._agreed(trainer)
            if signum:
                self._save_and_stop(trainer, signum)

    def _save_and_stop(self, trainer: Trainer, signum: int) -> None:
        path = checkpoint_path(trainer)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath and Path(callback.dirpath) == path.parent:
                callback.last_model_path = str(path)  # part of the saved state: after resuming, last.ckpt stays
        trainer.save_checkpoint(path, weights_only=False)  # all of it, loops included; every rank (barrier)
        stopped = Preempted(signum, path)
        if trainer.is_global_zero:
            log.warning("%s (epoch %d, step %d)", stopped, trainer.current_epoch, trainer.global_step)
            print(f"Preempted: {stopped}", flush=True)
        if self.requeue and signum != signal.SIGTERM:
            self._requeue(trainer, signum)
        raise stopped

    def _requeue(self, trainer: Trainer, signum: int) -> None:
        """The time-limit signal: let the launcher that installed a handler for it requeue (submitit
        resubmits its job and exits), else ask SLURM to requeue this job. SIGTERM is left to the cluster:
        SLURM requeues a preempted job itself where the partition's PreemptMode says REQUEUE."""
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, None)
            return
        job = slurm_job_id()
        if job is None or not trainer.is_global_zero:
            return
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
        if result.returncode == 0:
            print(f"Requeued SLURM job {job}: it resumes from the checkpoint when it starts again", flush=True)
        else:
            log.warning("scontrol requeue %s failed (%s): resubmit the job yourself", job,
                        (result.stderr or result.stdout).strip())


def slurm_job_id() -> str | None:
    """This SLURM job's id (`<array job>_<task>` for an array task), or None outside SLURM."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9_]+", job) else None
