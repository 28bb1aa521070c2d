"""Driver detection (`make install`'s wheel choice) and the one-line hint when DALI's GPU operators cannot start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from alexnet_pipe.loading.pipeline import LoaderConfig
from alexnet_pipe.loading.wheels import choose, driver_major, gpu_init_hint

REPO = Path(__file__).resolve().parents[2]


def smi_table(driver: str, cuda: str) -> str:
    """The head of `nvidia-smi`'s table as its drivers print it."""
    return f"""Tue Jun 10 09:12:44 2025
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI {driver}             Driver Version: {driver}     CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|=========================================+========================+======================|
|   0  NVIDIA H100 80GB HBM3          On  |   00000000:19:00.0 Off |                    0 |
+-----------------------------------------------------------------------------------------+
"""


DRIVERS = [("535.183.01", "12.2", "nvidia-dali-cuda120", "cu128"),
           ("550.127.05", "12.4", "nvidia-dali-cuda120", "cu128"),
           ("570.124.06", "12.8", "nvidia-dali-cuda120", "cu128"),
           ("580.65.06", "13.0", "nvidia-dali-cuda130", "cu130"),
           ("590.48.01", "13.1", "nvidia-dali-cuda130", "cu130")]


def pick(tmp_path: Path, smi: str | None, *args: str) -> subprocess.CompletedProcess:
    """tools/pick_wheels.py with a faked nvidia-smi (None: none on PATH) printing ``smi``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if smi is not None:
        (bin_dir / "smi.txt").write_text(smi)
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\ncat {bin_dir / 'smi.txt'}\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    path = f"{bin_dir}:/usr/bin:/bin" if smi is not None else f"{bin_dir}:/nonexistent"
    return subprocess.run([sys.executable, str(REPO / "tools/pick_wheels.py"), *args], capture_output=True, text=True,
                          env={**os.environ, "PATH": path}, timeout=60)


@pytest.mark.parametrize("driver,cuda,dali,torch_build", DRIVERS)
def test_make_install_picks_the_wheels_for_the_driver(tmp_path, driver, cuda, dali, torch_build):
    assert pick(tmp_path, smi_table(driver, cuda), "dali").stdout.strip() == dali
    torch_args = pick(tmp_path, smi_table(driver, cuda), "torch").stdout.split()
    assert torch_args[0] == "torch==2.13.0" and torch_args[-1].endswith("/whl/" + torch_build)
    explain = pick(tmp_path, smi_table(driver, cuda), "explain").stdout
    assert f"driver R{driver.split('.')[0]}" in explain and f"CUDA {cuda.split('.')[0]}" in explain


def test_without_nvidia_smi_the_cpu_choice_of_today(tmp_path):
    assert pick(tmp_path, None, "torch").stdout.strip() == "torch==2.13.0"
    assert pick(tmp_path, None, "dali").stdout.strip() == "nvidia-dali-cuda130"
    assert pick(tmp_path, None, "deps").stdout.strip() == ""  # meaning: pip install -e ".[test]" as today


def test_a_failing_nvidia_smi_counts_as_no_gpu(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate "
                                        "with the NVIDIA driver.'\nexit 9\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    out = subprocess.run([sys.executable, str(REPO / "tools/pick_wheels.py"), "dali"], capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}, timeout=60)
    assert out.stdout.strip() == "nvidia-dali-cuda130"


def test_cuda12_installs_the_project_without_the_cuda13_wheel(tmp_path):
    deps = pick(tmp_path, smi_table("535.183.01", "12.2"), "deps").stdout.split()
    assert "nvidia-dali-cuda120>=2.0" in deps and not any("cuda130" in d for d in deps)
    assert any(d.startswith("torch") for d in deps) and any(d.startswith("pytest") for d in deps)


def test_choice_by_hand_and_an_old_driver(tmp_path):
    assert pick(tmp_path, smi_table("580.65.06", "13.0"), "--cuda", "12", "dali").stdout.strip() \
        == "nvidia-dali-cuda120"
    assert pick(tmp_path, None, "--cuda", "13", "dali").stdout.strip() == "nvidia-dali-cuda130"
    old = pick(tmp_path, smi_table("470.256.02", "11.4"), "dali")
    assert old.returncode == 2 and "R470 is older than CUDA 12" in old.stderr and "CUDA=cpu" in old.stderr


def test_driver_parsing():
    assert driver_major(smi_table("550.127.05", "12.4")) == 550
    assert driver_major("570.124.06\n570.124.06\n") == 570  # --query-gpu=driver_version, two GPUs
    assert driver_major("NVIDIA-SMI has failed") is None
    assert choose(None).cuda == "cpu" and choose(579).cuda == "12" and choose(580).cuda == "13"


# Errors as DALI 2.x and the CUDA runtime word them (DALI's backend raises "CUDA runtime API error
# <name> (<code>):" then the runtime's text; nvidia-smi/NVML its own).
CUDA13_ON_R550 = """Error when executing Mixed operator decoders__Image encountered:
Error in thread 0: [/opt/dali/dali/core/cuda_stream_pool.cc:42] CUDA runtime API error cudaErrorInsufficientDriver (35):
CUDA driver version is insufficient for CUDA runtime version
Stacktrace (12 entries):
[frame 0]: /usr/lib/python3/dist-packages/nvidia/dali/libdali_core.so(+0x3f2a1) [0x7f...]
"""
NO_DEVICE = "CUDA runtime API error cudaErrorNoDevice (100):\nno CUDA-capable device is detected"
NVML = "Failed to initialize NVML: Driver/library version mismatch\nNVML library version: 580.65"
DECODE = "Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.image`\nFailed to decode sample"


def test_driver_too_old_names_the_cuda120_wheel():
    hint = gpu_init_hint(CUDA13_ON_R550, 550)
    assert "\n" not in hint and len(hint) < 300
    assert "pip install nvidia-dali-cuda120" in hint and "R550" in hint and "-b cpu" in hint
    assert "frame" not in hint and "Stacktrace" not in hint


def test_driver_unknown_names_both_wheels():
    hint = gpu_init_hint(CUDA13_ON_R550, None)
    assert "nvidia-dali-cuda120" in hint and "nvidia-dali-cuda130" in hint and "\n" not in hint


def test_no_device_and_nvml_failures_say_check_the_driver():
    for text in (NO_DEVICE, NVML):
        hint = gpu_init_hint(text, None)
        assert hint is not None and "nvidia-smi" in hint and "-b cpu" in hint


def test_other_errors_are_not_driver_errors():
    assert gpu_init_hint(DECODE, 550) is None
    assert gpu_init_hint("Assert on \"crop_h <= H\" failed", 580) is None


def test_loader_knobs_are_checked():
    assert LoaderConfig("train", True, 8).prefetch == 2 and LoaderConfig("train", True, 8).hw_decoder_load is None
    with pytest.raises(ValueError, match="hw_decoder_load must be within 0..1"):
        LoaderConfig("train", True, 8, hw_decoder_load=1.5)
    with pytest.raises(ValueError, match="prefetch depth must be >= 1"):
        LoaderConfig("train", True, 8, prefetch=0)
