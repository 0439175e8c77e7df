"""DataLoader worker processes: how many, how they start, and how they live through a cluster's stop signal."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


def worker_context(num_workers: int) -> str | None:
    """DataLoader workers are forked on Linux, explicitly: inside a joblib (loky) launcher job the default
    context is loky's, whose processes DataLoader cannot use. None elsewhere (the platform's default)."""
    return "fork" if num_workers > 0 and sys.platform.startswith("linux") else None


def default_num_workers() -> int:
    """One core stays with the training process; on 2 cores that leaves one loader worker."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def loader_workers(num_workers: int | str, images: int, batch_size: int) -> int:
    """num_workers ("auto" or a number), but no more than there are batches: no worker start-up for a few images."""
    workers = default_num_workers() if num_workers == "auto" else int(num_workers)
    return min(workers, images // max(1, batch_size))


def _defer_once(signum: int, frame: Any) -> None:
    signal.signal(signum, signal.SIG_DFL)


def worker_init(worker_id: int) -> None:
    """DataLoader worker start-up: survive the first stop signal, and seed as Lightning would.

    Clusters signal every process of a job, loader workers included. torch's workers die on a SIGTERM
    that does not come from their parent, and the training process would then fail mid-step before it
    could save. Here a worker lets the first SIGTERM/SIGUSR1/SIGUSR2 pass (a second one ends it as
    usual) and keeps serving batches until training has saved and shuts it down. Lightning adds its own
    seeding worker_init_fn only where there is none, so this one calls it (seed_everything(workers=True)).
    """
    for signum in (signal.SIGTERM, *(getattr(signal, name) for name in ("SIGUSR1", "SIGUSR2") if
                                      hasattr(signal, name))):
        signal.signal(signum, _defer_once)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)
