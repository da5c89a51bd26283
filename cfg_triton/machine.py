"""What a measurement ran on, for every results file: the GPU (name, SMs, memory, driver) or the CPU
(model, cores, threads), and the versions of Python, torch and triton."""
from __future__ import annotations

import os
import platform


def describe() -> dict:
    """What the figures were measured on: GPU name and driver, or CPU model and cores; versions."""
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device="cuda", name=props.name, sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1),
                    driver=torch.version.cuda and _nvidia_driver())
    else:
        info.update(device="cpu", name=_cpu_model(), cores=os.cpu_count(),
                    threads=torch.get_num_threads())
    return info


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver():
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
