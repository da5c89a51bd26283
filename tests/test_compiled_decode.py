"""`generate(compile=True)`: static KV caches and a compiled decode step give the eager tokens.

On CPU the step goes through inductor (C++ code generation); on CUDA the same code is captured as a
CUDA graph, which bench/gpu.sh checks and measures.
"""
import copy

import pytest
import torch

import cfg_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def model(tiny_llama):
    return copy.deepcopy(tiny_llama).to(DEVICE)


def _prompts():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 512, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    neg = torch.randint(1, 512, (2, 4), generator=gen)
    neg_mask = torch.ones_like(neg)
    neg_mask[0, :2] = 0
    return ids.to(DEVICE), mask.to(DEVICE), dict(negative_input_ids=neg.to(DEVICE),
                                                 negative_attention_mask=neg_mask.to(DEVICE))


@pytest.mark.slow
@pytest.mark.parametrize("mode, mix", [("batched", 0.7), ("sequential", None)])
def test_compiled_greedy_equals_eager(model, mode, mix):
    ids, mask, neg = _prompts()
    kw = dict(mode=mode, mix=mix, guidance_scale=2.0, max_new_tokens=10, min_new_tokens=10, **neg)
    eager = cfg_triton.generate(model, ids, mask, **kw)
    compiled = cfg_triton.generate(model, ids, mask, compile=True, **kw)
    assert compiled.tolist() == eager.tolist()
    # A second call reuses the compiled step with fresh caches and must not see the first's state.
    assert cfg_triton.generate(model, ids, mask, compile=True, **kw).tolist() == eager.tolist()


@pytest.mark.slow
def test_compiled_sampling_equals_eager_at_a_fixed_seed(model):
    ids, mask, neg = _prompts()
    kw = dict(mix=0.7, guidance_scale=2.0, max_new_tokens=10, min_new_tokens=10, do_sample=True,
              temperature=5.0, top_p=0.95, **neg)
    eager = cfg_triton.generate(model, ids, mask, generator=torch.Generator(DEVICE).manual_seed(7), **kw)
    compiled = cfg_triton.generate(model, ids, mask, generator=torch.Generator(DEVICE).manual_seed(7),
                                   compile=True, **kw)
    assert compiled.tolist() == eager.tolist()
    greedy = cfg_triton.generate(model, ids, mask, mix=0.7, guidance_scale=2.0, max_new_tokens=10,
                                 min_new_tokens=10, **neg)
    assert compiled.tolist() != greedy.tolist()  # the temperature made the draws matter


def test_compile_flag_is_checked(model):
    with pytest.raises(TypeError, match="compile"):
        cfg_triton.generate(model, torch.ones(1, 3, dtype=torch.long, device=DEVICE), compile="yes")
