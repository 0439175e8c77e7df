"""The one collective the project needs outside torchmetrics: every process's Python object under DDP."""

from __future__ import annotations

import torch


def gather_objects(value) -> list:
    """Every process's `value` under DDP (all_gather_object), or [value] in a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, value)
        return everyone
    return [value]
