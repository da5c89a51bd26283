"""`generate(compile=True)`: static KV caches and a compiled decode step give the eager tokens.

On CPU the step goes through inductor (C++ code generation); on CUDA the same code is captured as a
CUDA graph, which bench/gpu.sh checks and measures.
"""
import pytest
import torch

import cfg_triton


def _prompts():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 512, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    neg = torch.randint(1, 512, (2, 4), generator=gen)
    neg_mask = torch.ones_like(neg)
    neg_mask[0, :2] = 0
    return ids, mask, dict(negative_input_ids=neg, negative_attention_mask=neg_mask)


@pytest.mark.parametrize("mode, mix", [("batched", 0.7), ("sequential", None)])
def test_compiled_greedy_equals_eager(tiny_llama, mode, mix):
    ids, mask, neg = _prompts()
    kw = dict(mode=mode, mix=mix, guidance_scale=2.0, max_new_tokens=10, min_new_tokens=10, **neg)
    eager = cfg_triton.generate(tiny_llama, ids, mask, **kw)
    compiled = cfg_triton.generate(tiny_llama, ids, mask, compile=True, **kw)
    assert compiled.tolist() == eager.tolist()
    # A second call reuses the compiled step with fresh caches and must not see the first's state.
    assert cfg_triton.generate(tiny_llama, ids, mask, compile=True, **kw).tolist() == eager.tolist()


def test_compiled_sampling_equals_eager_at_a_fixed_seed(tiny_llama):
    ids, mask, neg = _prompts()
    kw = dict(mix=0.7, guidance_scale=2.0, max_new_tokens=10, min_new_tokens=10, do_sample=True,
              temperature=5.0, top_p=0.95, **neg)
    eager = cfg_triton.generate(tiny_llama, ids, mask, generator=torch.Generator().manual_seed(7), **kw)
    compiled = cfg_triton.generate(tiny_llama, ids, mask, generator=torch.Generator().manual_seed(7),
                                   compile=True, **kw)
    assert compiled.tolist() == eager.tolist()
    greedy = cfg_triton.generate(tiny_llama, ids, mask, mix=0.7, guidance_scale=2.0, max_new_tokens=10,
                                 min_new_tokens=10, **neg)
    assert compiled.tolist() != greedy.tolist()  # the temperature made the draws matter


def test_compile_flag_is_checked(tiny_llama):
    with pytest.raises(TypeError, match="compile"):
        cfg_triton.generate(tiny_llama, torch.ones(1, 3, dtype=torch.long), compile="yes")
