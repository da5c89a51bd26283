import os
import subprocess
import sys
import tempfile

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


@pytest.fixture(scope="session")
def tiny_llama():
    """A 2-layer random Llama (vocabulary 512) whose output head is scaled up so that its next-token
    distributions are peaked: greedy choices then do not hinge on float rounding near ties."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


# The AOT compiles (test_aot.py) take minutes in one process that uses one core, while most other
# tests leave the second core idle: they start as soon as collection ends and run beside the rest
# of the session, whose last tests are then the AOT checks that collect their output.
AOT = pytest.StashKey[tuple]()


def start_aot():
    """Starts `python -m cfg_triton.aot --json` (uninterpreted: it compiles) -> (process, stdout
    file, stderr file)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    process = subprocess.Popen([sys.executable, "-m", "cfg_triton.aot", "--json"], env=env,
                               stdout=out, stderr=err, text=True)
    return process, out, err


# The interpreter runs one program at a time in Python: past this many logits per branch a case
# costs seconds. The default run keeps the small shapes, which cover each class (a row split across
# programs with a ragged last tile, many rows, V = 1); `pytest -m slow` runs the large ones.
INTERPRETED_DEFAULT_ELEMENTS = 30_000


def _large_interpreted(item) -> bool:
    params = getattr(item, "callspec", None)
    params = params.params if params is not None else {}
    shape = params.get("shape")
    return params.get("backend") == "interpreter" and shape is not None \
        and shape[0] * shape[1] > INTERPRETED_DEFAULT_ELEMENTS


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these marks
def pytest_collection_modifyitems(session, config, items):
    for item in items:
        if _large_interpreted(item):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.path.name == "test_aot.py")  # stable: the AOT checks last


def pytest_collection_finish(session):
    # After `-m`: the full compile grid starts only in a session that runs its checks.
    grid = [item for item in session.items if item.path.name == "test_aot.py"
            and item.get_closest_marker("slow")]
    if grid and cfg_triton.triton_available() and len(grid) < len(session.items):
        session.config.stash[AOT] = start_aot()


def pytest_unconfigure(config):
    process = config.stash.get(AOT, (None,))[0]
    if process is not None and process.poll() is None:  # the session ended early
        process.kill()
        process.wait()
