"""Learning-rate schedules as factories with one signature, so the config can swap them freely.

Each takes the optimizer plus the run's length (known only once the Trainer has seen the data) and
returns a scheduler stepped every optimizer step.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CyclicLR, LambdaLR, LRScheduler, OneCycleLR


def warmup_cosine(optimizer: Optimizer, total_steps: int, steps_per_epoch: int, warmup_epochs: float = 1.0,
                  min_lr_ratio: float = 0.01) -> LRScheduler:
    """Linear warm-up from ~0 to the base LR, then cosine decay to min_lr_ratio x base LR."""
    warmup = min(int(round(warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def cyclic(optimizer: Optimizer, total_steps: int, steps_per_epoch: int, base_lr_ratio: float = 0.1,
           epochs_per_half_cycle: float = 2.0, mode: str = "triangular2") -> LRScheduler:
    """Triangular cycles between base_lr_ratio x LR and the LR, amplitude halving each cycle (the report's)."""
    max_lrs = [group["lr"] for group in optimizer.param_groups]
    return CyclicLR(optimizer, base_lr=[lr * base_lr_ratio for lr in max_lrs], max_lr=max_lrs,
                    step_size_up=max(1, int(epochs_per_half_cycle * steps_per_epoch)), mode=mode,
                    cycle_momentum=False)


def onecycle(optimizer: Optimizer, total_steps: int, steps_per_epoch: int, pct_start: float = 0.3) -> LRScheduler:
    """Leslie Smith's one-cycle policy peaking at the optimizer's LR."""
    return OneCycleLR(optimizer, max_lr=[group["lr"] for group in optimizer.param_groups],
                      total_steps=max(1, total_steps), pct_start=pct_start)
