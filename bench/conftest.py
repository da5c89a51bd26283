import os
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

import report  # noqa: E402


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["cfg_triton"] = report.machine()


@pytest.fixture(scope="session")
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
