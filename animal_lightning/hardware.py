"""What the machine can do fast: the precision that the Trainer config's `precision: auto` becomes."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch

from animal_lightning.compat import cpu_has_amx, cpu_has_avx512_bf16


def cpu_has_fast_bf16() -> bool:
    """True where the CPU computes bf16 natively (AMX or AVX512-BF16); elsewhere bf16 autocast is slower."""
    return cpu_has_amx() or cpu_has_avx512_bf16()


def uses_gpu(accelerator: str) -> bool:
    """Whether the Trainer's `accelerator` setting means a GPU here."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def auto_precision(accelerator: str) -> str:
    """The Trainer's precision for `accelerator`: bf16-mixed where the hardware computes bf16 natively
    (recent GPUs; CPUs with AMX or AVX512-BF16), 16-mixed on older GPUs, else 32-true."""
    if uses_gpu(accelerator):
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator in ("cpu", "auto"):
        return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"
    return "32-true"  # mps and others: fp32 is the safe default


def cpu_description() -> str:
    """The processor's name and its bf16/int8 matrix features, for naming the machine beside a speed figure."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    features = [f for f, present in (("AMX", cpu_has_amx()), ("AVX512-BF16", cpu_has_avx512_bf16())) if present]
    return f"{name} ({', '.join(features) or 'no AMX, no AVX512-BF16'}; {os.cpu_count()} cores)"
