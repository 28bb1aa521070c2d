"""Which DALI wheel and torch build fit the NVIDIA driver on this machine (standard library only).

``nvidia-dali-cuda130`` needs a CUDA 13 driver (R580 or newer); CUDA 12 drivers (R525-R579,
most clusters' R535-R570) need ``nvidia-dali-cuda120`` and a CUDA 12 torch. Without a GPU the
CPU choice is ``nvidia-dali-cuda130`` (its CPU operators need no driver) and PyPI's torch.
``tools/pick_wheels.py`` (``make install``) prints the choice; the loader names the wheel when
DALI's GPU operators cannot start.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

TORCH_VERSION = "2.13.0"
TORCH_INDEX = "https://download.pytorch.org/whl/"
CUDA13_MIN_DRIVER = 580  # the first CUDA 13.0 driver branch
CUDA12_MIN_DRIVER = 525  # the first CUDA 12.0 driver branch


@dataclass(frozen=True)
class Choice:
    cuda: str  # "cpu", "12" or "13"
    dali: str  # the DALI wheel's name
    torch: tuple[str, ...]  # pip arguments for torch
    why: str  # one line: what was found and what follows


def driver_major(smi_text: str) -> int | None:
    """The driver branch (e.g. 535) from ``nvidia-smi``'s table or ``--query-gpu=driver_version`` output."""
    m = re.search(r"Driver Version:\s*(\d+)\.", smi_text) or re.search(r"^\s*(\d{3,})\.\d+", smi_text, re.M)
    return int(m.group(1)) if m else None


def choose(driver: int | None, cuda: str = "auto") -> Choice:
    """The wheels for driver branch ``driver`` (None: no NVIDIA driver); ``cuda`` forces 12, 13 or cpu."""
    if cuda not in ("auto", "cpu", "12", "13"):
        raise ValueError(f"CUDA must be auto, cpu, 12 or 13, got {cuda!r}")
    if cuda == "auto":
        if driver is None:
            cuda = "cpu"
        elif driver >= CUDA13_MIN_DRIVER:
            cuda = "13"
        elif driver >= CUDA12_MIN_DRIVER:
            cuda = "12"
        else:
            raise ValueError(f"NVIDIA driver R{driver} is older than CUDA 12 (R{CUDA12_MIN_DRIVER}); upgrade the "
                             "driver, or install for the CPU with CUDA=cpu")
    found = f"driver R{driver}" if driver is not None else "no NVIDIA driver (nvidia-smi not found or failing)"
    if cuda == "cpu":
        return Choice("cpu", "nvidia-dali-cuda130", (f"torch=={TORCH_VERSION}",),
                      f"{found}: CPU install, nvidia-dali-cuda130 (CPU operators) and torch=={TORCH_VERSION}")
    if cuda == "13":
        return Choice("13", "nvidia-dali-cuda130", (f"torch=={TORCH_VERSION}", "--index-url", TORCH_INDEX + "cu130"),
                      f"{found}: CUDA 13, nvidia-dali-cuda130 and torch {TORCH_VERSION} cu130")
    # CUDA 12.8 builds run on every CUDA 12 driver through CUDA's minor-version compatibility.
    return Choice("12", "nvidia-dali-cuda120", (f"torch=={TORCH_VERSION}", "--index-url", TORCH_INDEX + "cu128"),
                  f"{found}: CUDA 12, nvidia-dali-cuda120 and torch {TORCH_VERSION} cu128")


def detect_driver(timeout: float = 20.0) -> int | None:
    """The driver branch ``nvidia-smi`` reports, or None where it is absent or fails."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return driver_major(out.stdout) if out.returncode == 0 else None


# DALI's (and the CUDA runtime's) words for a driver too old for the CUDA its wheel was built with.
_DRIVER_TOO_OLD = ("cudaErrorInsufficientDriver", "driver version is insufficient", "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
                   "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE", "forward compatibility was attempted")
# ... and for no usable driver or device at all.
_NO_DRIVER = ("cudaErrorNoDevice", "no CUDA-capable device", "CUDA_ERROR_NO_DEVICE", "libcuda.so", "libnvidia-ml",
              "nvmlInit", "NVML_ERROR", "Driver/library version mismatch", "CUDA is not available",
              "cudaErrorInitializationError", "CUDA_ERROR_NOT_INITIALIZED")


def gpu_init_hint(error_text: str, driver: int | None) -> str | None:
    """One line saying what to install or fix when DALI could not start its GPU operators;
    None when ``error_text`` is not a driver/CUDA start-up failure."""
    if any(k.lower() in error_text.lower() for k in _DRIVER_TOO_OLD):
        if driver is not None and driver < CUDA13_MIN_DRIVER:
            choice = choose(driver, "12") if driver >= CUDA12_MIN_DRIVER else None
            if choice is None:
                return (f"the NVIDIA driver (R{driver}) is too old for DALI's CUDA 12 and 13 builds: upgrade the "
                        f"driver to R{CUDA12_MIN_DRIVER} or newer (R{CUDA13_MIN_DRIVER}+ for CUDA 13), or use -b cpu")
            return (f"DALI's GPU operators need a newer driver than R{driver} (a CUDA {choice.cuda} driver): "
                    f"pip uninstall -y nvidia-dali-cuda130 && pip install {choice.dali} "
                    f"(or make install, which picks it), or use -b cpu")
        return ("the installed DALI was built for a newer CUDA than this NVIDIA driver supports: with a CUDA 12 "
                "driver (R525-R579) pip uninstall -y nvidia-dali-cuda130 && pip install nvidia-dali-cuda120; "
                f"with R{CUDA13_MIN_DRIVER}+ install nvidia-dali-cuda130; or use -b cpu")
    if any(k.lower() in error_text.lower() for k in _NO_DRIVER):
        return ("DALI cannot reach an NVIDIA GPU (no working driver or device: check nvidia-smi); use -b cpu, "
                "or fix the driver and install the DALI wheel for it (make install picks it)")
    return None
