"""Which MLX build `make setup` installs: the CPU build, CUDA 12 or 13 (an NVIDIA GPU), or Metal (Apple Silicon).

Standard library only: the Makefile runs it before anything is installed.

    python -m hegelion_queue.training.backend          # prints the pip extra of the project to install: train, cuda12, cuda13
    python -m hegelion_queue.training.backend --why    # prints what was chosen and why

HEGELION_MLX_BACKEND=cpu|cuda12|cuda13|metal (in the environment or .env) overrides the choice. MLX's CUDA builds need
a driver that supports CUDA 12 or later (`nvidia-smi` prints the highest CUDA version the driver supports).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BACKENDS = ("cpu", "cuda12", "cuda13", "metal")
EXTRAS = {"cpu": "train", "metal": "train", "cuda12": "cuda12", "cuda13": "cuda13"}  # pyproject.toml's extras
ENV = "HEGELION_MLX_BACKEND"
_CUDA = re.compile(r"CUDA Version:\s*(\d+)\.(\d+)")
_GPU = re.compile(r"^GPU \d+:", re.MULTILINE)


@dataclass(frozen=True)
class Choice:
    backend: str
    why: str

    @property
    def extra(self) -> str:
        return EXTRAS[self.backend]


class BackendError(ValueError):
    """An override that cannot work here."""


def cuda_version(nvidia_smi: str | None) -> tuple[int, int] | None:
    """The CUDA version `nvidia-smi`'s header reports (what the driver supports), if any."""
    m = _CUDA.search(nvidia_smi or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def gpus(listing: str | None) -> int:
    """GPUs in `nvidia-smi -L` output ("GPU 0: NVIDIA A100 … (UUID: …)")."""
    return len(_GPU.findall(listing or ""))


def choose(system: str, override: str | None, listing: str | None, nvidia_smi: str | None) -> Choice:
    """The MLX build for this machine. `system`: platform.system(); `override`: HEGELION_MLX_BACKEND; `listing` and
    `nvidia_smi`: the output of `nvidia-smi -L` and of `nvidia-smi` (None: no nvidia-smi, or it failed)."""
    if override:
        if override not in BACKENDS:
            raise BackendError(f"{ENV}={override!r}: use one of {', '.join(BACKENDS)}")
        if (override == "metal") != (system == "Darwin"):
            raise BackendError(f"{ENV}={override}: MLX has Metal builds only for macOS, and only Metal there")
        return Choice(override, f"{ENV}={override}")
    if system == "Darwin":
        return Choice("metal", "macOS: MLX runs on the Apple Silicon GPU (Metal)")
    n = gpus(listing)
    if not n:
        why = "nvidia-smi not found" if listing is None else "nvidia-smi lists no GPU"
        return Choice("cpu", f"no NVIDIA GPU ({why}): the CPU build")
    version = cuda_version(nvidia_smi)
    if version is None:
        return Choice("cpu", f"{n} NVIDIA GPU(s), but nvidia-smi reports no CUDA version: the CPU build "
                             f"(set {ENV}=cuda12 or cuda13 to choose)")
    shown = f"{version[0]}.{version[1]}"
    if version[0] >= 13:
        return Choice("cuda13", f"{n} NVIDIA GPU(s), driver CUDA {shown}")
    if version[0] == 12:
        return Choice("cuda12", f"{n} NVIDIA GPU(s), driver CUDA {shown}")
    return Choice("cpu", f"{n} NVIDIA GPU(s), but the driver supports CUDA {shown} and MLX needs 12 or later: "
                         "the CPU build (update the driver for the GPU)")


def _run(argv: list[str]) -> str | None:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout if p.returncode == 0 else ""


def override_from_env(env: dict[str, str] | None = None, dotenv: Path = Path(".env")) -> str | None:
    """HEGELION_MLX_BACKEND from the environment, else from .env (as the settings read it)."""
    env = os.environ if env is None else env
    if env.get(ENV):
        return env[ENV].strip()
    if dotenv.is_file():
        for line in dotenv.read_text(encoding="utf-8", errors="replace").splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and key.strip() == ENV and value.strip():
                return value.strip().strip("'\"")
    return None


def detect() -> Choice:
    """This machine's choice: the override, else what nvidia-smi (when on PATH) says."""
    smi = shutil.which("nvidia-smi")
    listing = _run([smi, "-L"]) if smi else None
    header = _run([smi]) if smi and listing else None
    return choose(platform.system(), override_from_env(), listing, header)


def quantized_on_cuda_warning(device: str, quantized: bool) -> str | None:
    """The one line the trainer logs before training a quantized base model on an NVIDIA GPU."""
    if device == "cuda" and quantized:
        return ("the base model is quantized and MLX's quantized matmul on CUDA is still partial: training may fail or "
                "be slow; LoRA on a bf16/fp16 model works on CUDA (use the unquantized model)")
    return None


def main(argv: list[str]) -> int:
    try:
        choice = detect()
    except BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"MLX build: {choice.backend} ({choice.why})" if "--why" in argv else choice.extra)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
