"""The drop-in at batch 1: unchanged `model.generate(guidance_scale=1.5, negative_prompt_ids=…)`
unpatched and under `patch_transformers()`, against `cfg_triton.generate` on the same inputs, side
by side in one process (bundled SmolLM2, greedy, 32 new tokens).

    python bench/dropin.py            # runs this file, prints the ratios, writes bench/results/

The targets: patched / ours ≤ 1.1x and patched / unpatched ≤ 0.6x.
"""
import pytest
import torch

import cfg_triton
from cfg_triton import models

NEW_TOKENS = 32
IMPLS = ["unpatched", "patched", "cfg_triton"]


@pytest.fixture(scope="module")
def inputs():
    model, tok = models.load("smollm2")
    ids = tok("Write one sentence about the sea.", return_tensors="pt").input_ids
    neg = tok("Write one sentence about the desert.", return_tensors="pt").input_ids
    return model, ids, neg


def _run(impl, model, ids, neg):
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    if impl == "cfg_triton":
        return cfg_triton.generate(model, ids, negative_input_ids=neg, guidance_scale=1.5, **kw)
    call = dict(do_sample=False, guidance_scale=1.5, negative_prompt_ids=neg, **kw)
    if impl == "patched":
        with cfg_triton.patch_transformers():
            return model.generate(ids, **call)
    return model.generate(ids, **call)


@pytest.mark.parametrize("impl", IMPLS)
def test_dropin(benchmark, inputs, impl):
    model, ids, neg = inputs
    benchmark.extra_info.update(dropin=impl, batch=1, tokens=NEW_TOKENS)
    with torch.inference_mode():
        out = benchmark.pedantic(_run, args=(impl, model, ids, neg), warmup_rounds=1, rounds=9,
                                 iterations=1)
    assert out.shape[1] == ids.shape[1] + NEW_TOKENS
