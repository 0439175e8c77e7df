"""Optimizer parameter groups: backbone and head, weight decay only where it belongs."""

from __future__ import annotations

from torch import nn


def parameter_groups(net: nn.Module, head_ids: set[int], backbone_lr_mult: float = 1.0,
                     exclude: set[int] | None = None) -> list[dict]:
    """Optimizer groups: backbone and head, each split so that biases and norm-layer parameters (1-D
    tensors) get no weight decay. Backbone groups carry `lr_mult`, applied to the optimizer's LR.
    Parameters whose id is in `exclude` (a frozen copy of the pretrained network) are left out."""
    groups = []
    exclude = exclude or set()
    for part in ("backbone", "head"):
        params = [p for p in net.parameters() if id(p) not in exclude and (id(p) in head_ids) == (part == "head")]
        mult = backbone_lr_mult if part == "backbone" else 1.0
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        if decay:
            groups.append({"params": decay, "name": part, "lr_mult": mult})
        if no_decay:
            groups.append({"params": no_decay, "name": f"{part}_no_decay", "weight_decay": 0.0, "lr_mult": mult})
    return groups
