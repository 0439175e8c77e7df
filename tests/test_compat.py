"""Each private API of another library that animal_lightning.compat wraps still exists and means what we use
it for, in the installed versions: an upgrade that changes one fails here, by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.core.utils import JobReturn, JobStatus

from animal_lightning import compat


def _cpu_flags() -> set[str]:
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        pytest.skip("no /proc/cpuinfo to compare the CPU checks with")
    line = next((line for line in info.read_text().splitlines() if line.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def test_cpu_feature_checks_exist_and_agree_with_the_kernel():
    assert hasattr(torch.cpu, "_is_amx_tile_supported") and hasattr(torch.cpu, "_is_avx512_bf16_supported")
    flags = _cpu_flags()
    assert compat.cpu_has_amx() == ("amx_tile" in flags)
    assert compat.cpu_has_avx512_bf16() == ("avx512_bf16" in flags)


def test_a_failed_jobs_exception_is_read_without_raising():
    error = ValueError("bad learning rate")
    failed = JobReturn(overrides=["optimizer.lr=-1"], status=JobStatus.FAILED, _return_value=error)
    with pytest.raises(ValueError):
        _ = failed.return_value  # the public property re-raises: why compat reads the field
    assert compat.job_return_value(failed) is error
    assert compat.job_return_value(JobReturn(status=JobStatus.COMPLETED, _return_value=0.75)) == 0.75


@pytest.mark.parametrize("fused", [True, False])
def test_foreach_lerp_moves_every_tensor_like_lerp(monkeypatch, fused):
    if not fused:
        monkeypatch.delattr(torch, "_foreach_lerp_")  # the fallback: one lerp_ per tensor
    start = [torch.zeros(3), torch.full((2, 2), 4.0)]
    targets = [torch.ones(3), torch.zeros(2, 2)]
    compat.foreach_lerp_(start, targets, 0.25)
    assert torch.allclose(start[0], torch.full((3,), 0.25)) and torch.allclose(start[1], torch.full((2, 2), 3.0))
