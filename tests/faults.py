"""Faults injected into real training runs by the tests (a callback named on the command line).

    PYTHONPATH=tests python train.py +callbacks.fault._target_=faults.SignalAt +callbacks.fault.signal=SIGTERM ...
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from lightning.pytorch import Callback


class SignalAt(Callback):
    """Send `signal` at the start of training batch `batch` of epoch `epoch`, as a cluster would: to the
    whole process group (DataLoader workers included) when `group`, else to this process. With `once`,
    only the first run that gets there sends it (it leaves that file behind), so a requeued job runs on."""

    def __init__(self, signal: str = "SIGTERM", epoch: int = 1, batch: int = 3, group: bool = True,
                 once: str | None = None):
        self.signum = getattr(signal_module, signal)
        self.epoch, self.batch, self.group = int(epoch), int(batch), bool(group)
        self.once = Path(once) if once else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) != (self.epoch, self.batch) or not trainer.is_global_zero:
            return
        if self.once is not None:
            if self.once.exists():
                return
            self.once.write_text(f"{self.signum}\n")
        if self.group:
            os.killpg(os.getpgid(0), self.signum)
        else:
            os.kill(os.getpid(), self.signum)


signal_module = signal
