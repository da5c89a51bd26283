import os
import platform
import sys
import tempfile

# Compile times are reported cold: inductor's on-disk caches from an earlier run would make
# torch.compile(reference) look nearly free, so each benchmark session starts with empty ones.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="cfg-triton-bench-inductor-"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
sys.path.insert(0, os.path.dirname(__file__))


def machine():
    """What the figures were measured on: GPU name and driver, or CPU model and cores; versions."""
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


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["cfg_triton"] = machine()


@pytest.fixture(scope="session")
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
