"""The streaming loops as compiled: each lane folds the entries of its 128-bit load (8 for 16-bit
inputs, 4 for fp32) one after the other. The interpreter folds one entry per lane to run faster;
here it runs every kernel family with the compiled grouping, against the float64 reference and the
torch path (token indices are rebuilt from a lane and its column: a wrong mapping moves them)."""
import pytest
import torch

import cfg_triton
from cfg_triton import ops

from conftest import INTERPRETED
from helpers import NEG_INF, assert_matches, expected, logits

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="needs Triton's interpreter")

SEMANTICS = {"raw": dict(normalize=False), "normalized": {}, "interpolated": dict(mix=0.7)}
DTYPES = [torch.bfloat16, torch.float32]  # groups of 8 and of 4


@pytest.fixture(autouse=True)
def _compiled_grouping(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ops._kernels, "INTERPRETER_GROUP", None)


def _inputs(dtype, batch=3, vocab=5_003):
    """Logits with a ragged last tile, banned tokens and tokens masked in uncond alone."""
    cond, uncond = logits(batch, vocab, dtype), logits(batch, vocab, dtype)
    cond[0, :700] = NEG_INF
    uncond[1, 3:40] = NEG_INF
    cond[1, 3:40] += 6
    return cond, uncond


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("semantics", SEMANTICS)
def test_guidance(semantics, dtype):
    cond, uncond = _inputs(dtype)
    kw = SEMANTICS[semantics]
    assert_matches(cfg_triton.guidance(cond, uncond, 1.5, **kw), expected(cond, uncond, 1.5, **kw))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("semantics", SEMANTICS)
def test_token_logprobs(semantics, dtype):
    cond, uncond = _inputs(dtype)
    kw = SEMANTICS[semantics]
    ref = expected(cond, uncond, 1.5, **kw)
    targets = ref.argmax(-1)
    targets[2] = 4_001
    lp, greedy = cfg_triton.token_logprobs(cond, uncond, targets, 1.5, **kw)
    assert_matches(lp[:, None], ref.gather(1, targets[:, None]), scale=ref.abs().max().item())
    assert greedy.tolist() == (ref.argmax(-1) == targets).tolist()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("filters", [
    dict(temperature=0.0), dict(min_p=0.05),
    pytest.param(dict(top_k=torch.tensor([0, 30, 3]), top_p=0.9, min_p=0.02), marks=pytest.mark.slow)],
    ids=["greedy", "min_p", "all"])
def test_sample(monkeypatch, filters, dtype):
    cond, uncond = _inputs(dtype)
    kw = dict(dict(temperature=torch.tensor([0.7, 1.0, 1.3])), **filters, seed=torch.arange(3),
              step=4, return_logprobs=True)
    kernels = cfg_triton.sample(cond, uncond, 1.5, **kw)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch_path = cfg_triton.sample(cond, uncond, 1.5, **kw)
    assert torch.equal(kernels.tokens, torch_path.tokens)
    torch.testing.assert_close(kernels.logprobs, torch_path.logprobs.float(), rtol=1e-4, atol=1e-4)
