"""The CUDA image on a host without a usable GPU: `auto` serves on the CPU and says why, an explicit `cuda` stops.

`docker/smoke.sh` with VARIANT=cuda checks the same in the built image; these tests pin the pieces without one.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
import yaml

from hpr.errors import ModelLoadError
from hpr.model import resolve_device, resolve_dtype
from tests.conftest import REPO_ROOT


def stage_env(stage: str) -> dict[str, str]:
    """`ENV` settings of one Dockerfile stage (`FROM ... AS stage` up to the next `FROM`)."""
    text = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(rf"^FROM \S+ AS {stage}\n(.*?)(?=^FROM )", text, re.MULTILINE | re.DOTALL)
    assert match, stage
    env = " ".join(line[4:] for line in match.group(1).splitlines() if line.startswith("ENV "))
    return dict(pair.split("=", 1) for pair in env.split())


@pytest.fixture
def cuda_build_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """What torch reports in the CUDA image on a host with no GPU (or no driver, or none passed to the container)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")


def test_cuda_image_picks_its_device_and_dtype_at_startup() -> None:
    env = stage_env("base-cuda")
    # auto/auto: bf16 on the GPU, and float32 on the CPU when there is none (not bf16, which is slow there).
    assert env["HPR_DEVICE"] == "auto" and env["HPR_DTYPE"] == "auto"
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert stage_env("base-cpu") == {"HPR_DEVICE": "cpu", "HPR_DTYPE": "float32"}


def test_compose_gpu_service_insists_on_the_gpu() -> None:
    # A missing device reservation must stop the service, not leave it serving on the CPU unnoticed.
    compose = yaml.safe_load((REPO_ROOT / "docker" / "compose.yaml").read_text())
    assert compose["services"]["server-gpu"]["environment"]["HPR_DEVICE"] == "cuda"


@pytest.mark.usefixtures("cuda_build_without_gpu")
def test_auto_falls_back_to_the_cpu_and_logs_why(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hpr.model"):
        assert resolve_device("auto") == torch.device("cpu")
    (record,) = caplog.records
    assert "no GPU" in record.getMessage() and "CUDA 13.0" in record.getMessage()
    assert "using the CPU" in record.getMessage()


@pytest.mark.usefixtures("cuda_build_without_gpu")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_explicit_cuda_stops_with_the_reason(device: str) -> None:
    with pytest.raises(ModelLoadError, match=r"CUDA is not available: torch .* is built for CUDA 13\.0.*--gpus"):
        resolve_device(device)


def test_a_cpu_build_of_torch_falls_back_silently(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The CPU image and CPU-only development machines: no GPU was meant, so no warning; `cuda` names the CPU build.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with caplog.at_level(logging.WARNING, logger="hpr.model"):
        assert resolve_device("auto") == torch.device("cpu")
    assert not caplog.records
    with pytest.raises(ModelLoadError, match="is a CPU build"):
        resolve_device("cuda")
