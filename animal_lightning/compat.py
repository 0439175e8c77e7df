"""Every private API of another library that the project uses, in one place.

Each function names what it wraps, why no public API does the job, and when it can go;
tests/test_compat.py checks each against the installed versions, so an upgrade that removes
one fails there, by name, instead of deep inside a run.
"""

from __future__ import annotations

from typing import Any

import torch


def cpu_has_amx() -> bool:
    """torch.cpu._is_amx_tile_supported: whether the CPU has AMX tiles (Intel Sapphire Rapids and later).
    torch has no public query for CPU ISA features; it can go when torch.backends.cpu grows one."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check()) if check is not None else False


def cpu_has_avx512_bf16() -> bool:
    """torch.cpu._is_avx512_bf16_supported: native bf16 dot products (AMD Zen 4, Intel Cooper Lake and later).
    Same reason and end as cpu_has_amx."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check()) if check is not None else False


def job_return_value(job_return: Any) -> Any:
    """What a Hydra job returned, or the exception it raised, without re-raising it: JobReturn.return_value
    (the public property) raises a failed job's exception, and a sweep summary must read every job.
    It can go if Hydra adds a non-raising accessor."""
    return job_return._return_value


def foreach_lerp_(tensors: list[torch.Tensor], targets: list[torch.Tensor], weight: float) -> None:
    """torch._foreach_lerp_: tensors[i] += weight * (targets[i] - tensors[i]) for all i in one fused call
    (what torch.optim.swa_utils' own EMA uses). No public multi-tensor lerp exists; a per-tensor loop of
    Tensor.lerp_ is the fallback, and the same numbers."""
    fused = getattr(torch, "_foreach_lerp_", None)
    if fused is not None:
        fused(tensors, targets, weight)
        return
    for tensor, target in zip(tensors, targets, strict=True):
        tensor.lerp_(target, weight)
