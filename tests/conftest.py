import os

# Triton decides at decoration time whether a kernel is interpreted, so this must precede any import
# of cfg_triton. Which path a CPU call takes is then chosen per test by the `backend` fixture.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import cfg_triton  # noqa: E402

# With TRITON_INTERPRET=0 (bench/gpu.sh) the kernels are compiled for the GPU and CPU tensors can
# only take the torch path; test_cuda.py covers the kernels there.
INTERPRETED = os.environ["TRITON_INTERPRET"] == "1" and cfg_triton.triton_available()
BACKENDS = ["torch", "interpreter"] if INTERPRETED else ["torch"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs a test once on the torch path and once through the Triton kernels (interpreted)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "interpreter" else "0")
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _bundled(name):
    from cfg_triton import models

    try:
        return models.load(name)
    except ModuleNotFoundError as e:  # pragma: no cover - the install script always provides it
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct (vocabulary 49,152), loaded once: `(model, tokenizer)`."""
    return _bundled("smollm2")


@pytest.fixture(scope="session")
def gemma3():
    """The bundled Gemma 3 270M base model (vocabulary 262,144), loaded once: `(model, tokenizer)`."""
    return _bundled("gemma3")
