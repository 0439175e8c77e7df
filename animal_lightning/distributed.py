"""Gathering Python objects (not tensors) from every process under DDP: predictions with their file errors,
the worst-mistake pictures. Metrics sync themselves through torchmetrics."""

from __future__ import annotations

import torch


def gather_objects(value) -> list:
    """Every process's `value` under DDP (all_gather_object), or [value] in a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, value)
        return everyone
    return [value]
