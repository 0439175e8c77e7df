"""Faults injected into real training runs by the tests (a callback named on the command line).

    PYTHONPATH=tests python train.py +callbacks.fault._target_=faults.SignalAt +callbacks.fault.signal=SIGTERM ...
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from lightning.pytorch import Callback


class SignalAt(Callback):
    """Send `signal` at the start of training batch `batch` of epoch `epoch`, as a cluster would: to the
    whole process group (DataLoader workers included) when `group`, else to this process. With `once`,
    only the first run that gets there sends it (it leaves that file behind), so a requeued job runs on.

    With `wait_for`, the run does not send the signal itself: it creates `<wait_for>.ready` and waits
    until `<wait_for>.sent` exists, so that the test process sends it (as slurmstepd does, a process
    that is not the parent of the DataLoader workers)."""

    def __init__(self, signal: str = "SIGTERM", epoch: int = 1, batch: int = 3, group: bool = True,
                 once: str | None = None, stage: str = "train", wait_for: str | None = None):
        self.signum = getattr(signal_module, signal)
        self.epoch, self.batch, self.group = int(epoch), int(batch), bool(group)
        self.once = Path(once) if once else None
        self.stage = stage  # train: before training batch `batch`; validate: before validation batch `batch`
        self.wait_for = Path(wait_for) if wait_for else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.stage == "train":
            self._maybe_send(trainer, batch_idx)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.stage == "validate" and not trainer.sanity_checking:
            self._maybe_send(trainer, batch_idx)

    def _maybe_send(self, trainer, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) != (self.epoch, self.batch) or not trainer.is_global_zero:
            return
        if self.once is not None:
            if self.once.exists():
                return
            self.once.write_text(f"{self.signum}\n")
        if self.wait_for is not None:
            Path(f"{self.wait_for}.ready").write_text("")
            deadline = time.monotonic() + 120
            while not Path(f"{self.wait_for}.sent").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            return
        if self.group:
            os.killpg(os.getpgid(0), self.signum)
        else:
            os.kill(os.getpid(), self.signum)


signal_module = signal
