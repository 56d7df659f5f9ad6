"""`make setup`'s choice of MLX build (hegelion_queue/training/backend.py) from `nvidia-smi` output, and the Makefile calling it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hegelion_queue.training.backend import BackendError, choose, override_from_env, quantized_on_cuda_warning

from .conftest import ROOT

LISTING = "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5d3c2f7a-1111-2222-3333-444455556666)\n"
HEADER = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI {driver}              Driver Version: {driver}      CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|   0  NVIDIA A100-SXM4-40GB          On  |   00000000:00:04.0 Off |                    0 |
+-----------------------------------------+------------------------+----------------------+
"""


@pytest.mark.parametrize("cuda,backend", [("12.4", "cuda12"), ("12.8", "cuda12"), ("13.0", "cuda13"),
                                          ("13.1", "cuda13")])
def test_an_nvidia_gpu_gets_the_cuda_build_of_its_driver(cuda, backend):
    choice = choose("Linux", None, LISTING * 2, HEADER.format(driver="570.86.15", cuda=cuda))
    assert choice.backend == backend and choice.extra == backend
    assert f"2 NVIDIA GPU(s), driver CUDA {cuda}" in choice.why


def test_no_gpu_means_the_cpu_build():
    missing = choose("Linux", None, None, None)  # no nvidia-smi on PATH
    assert (missing.backend, missing.extra) == ("cpu", "train") and "nvidia-smi not found" in missing.why
    none_listed = choose("Linux", None, "", None)  # nvidia-smi ran but failed ("No devices were found")
    assert none_listed.backend == "cpu" and "lists no GPU" in none_listed.why


def test_a_driver_too_old_for_mlx_cuda_gets_the_cpu_build_and_says_why():
    old = choose("Linux", None, LISTING, HEADER.format(driver="470.256.02", cuda="11.4"))
    assert old.backend == "cpu" and "CUDA 11.4" in old.why and "update the driver" in old.why
    unknown = choose("Linux", None, LISTING, "NVIDIA-SMI has failed")
    assert unknown.backend == "cpu" and "HEGELION_MLX_BACKEND" in unknown.why


def test_macos_gets_metal_and_the_override_wins():
    assert choose("Darwin", None, None, None).backend == "metal"
    assert choose("Darwin", None, None, None).extra == "train"
    assert choose("Linux", "cpu", LISTING, HEADER.format(driver="570", cuda="12.8")).backend == "cpu"
    assert choose("Linux", "cuda13", None, None).backend == "cuda13"  # e.g. a container without nvidia-smi
    for system, bad in (("Linux", "metal"), ("Darwin", "cuda12"), ("Linux", "rocm")):
        with pytest.raises(BackendError, match="HEGELION_MLX_BACKEND"):
            choose(system, bad, None, None)


def test_the_override_is_read_from_the_environment_then_dotenv(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("HEGELION_RUN=x\nHEGELION_MLX_BACKEND='cuda12'\n")
    assert override_from_env({}, dotenv) == "cuda12"
    assert override_from_env({"HEGELION_MLX_BACKEND": "cpu"}, dotenv) == "cpu"
    assert override_from_env({}, tmp_path / "none") is None


def test_quantized_models_on_cuda_get_one_warning_line():
    line = quantized_on_cuda_warning("cuda", True)
    assert line and "\n" not in line and "quantized" in line
    assert quantized_on_cuda_warning("cpu", True) is None and quantized_on_cuda_warning("cuda", False) is None


def _make(target: str, path: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "HEGELION_MLX_BACKEND"}
    return subprocess.run(["make", "-s", target, f"PYTHON={sys.executable}"], cwd=ROOT, capture_output=True, text=True,
                          env={**clean, "PATH": path, **env}, timeout=60)


def test_make_picks_cuda_when_nvidia_smi_lists_a_gpu_and_cpu_on_this_machine(tmp_path):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nif [ \"$1\" = -L ]; then printf '%s' \"$LISTING\"; else printf '%s' \"$HEADER\"; fi\n")
    fake.chmod(0o755)
    path = os.environ["PATH"]
    gpu = _make("mlx-backend", f"{fake.parent}:{path}", LISTING=LISTING,
                HEADER=HEADER.format(driver="580.65.06", cuda="13.0"))
    assert gpu.returncode == 0, gpu.stderr
    assert "MLX build: cuda13" in gpu.stdout and "pip extras: dev,cuda13" in gpu.stdout
    here = _make("mlx-backend", ":".join(p for p in path.split(":") if not os.path.exists(f"{p}/nvidia-smi")))
    assert "MLX build: cpu" in here.stdout and "pip extras: dev,train" in here.stdout
    forced = _make("mlx-backend", path, HEGELION_MLX_BACKEND="cuda12")
    assert "pip extras: dev,cuda12" in forced.stdout
