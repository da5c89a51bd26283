"""End-to-end CFG generation on the bundled SmolLM2: greedy, 48 new tokens, batch 1 and batch 8.

Per batch size, side by side in one run: transformers' plain generation and its
`generate(guidance_scale=…)`, unpatched and under `patch_transformers()`, and `cfg_triton.generate` unguided (γ = 1: the same loop with one
branch, the baseline for what guidance costs), batched, sequential, and batched sampling
(temperature 0.8, top-p 0.9). Every run is forced to the
full 48 tokens (`min_new_tokens`) so that ms/token compares like with like. Also the load time of
the bundled model from its converted-checkpoint cache.
"""
import pytest
import torch

import cfg_triton
from cfg_triton import models

NEW_TOKENS = 48
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the moon.",
    "def fibonacci(n):",
    "Explain why the sky is blue in two sentences.",
    "List three fruits:",
    "Once upon a time, in a small village by the sea,",
    "Translate to French: good morning",
    "The best way to learn a language is",
]


@pytest.fixture(scope="module")
def smollm2():
    model, tok = models.load("smollm2")
    tok.padding_side = "left"
    return model, tok


def _run(impl, model, ids, mask):
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    if impl == "plain":
        return model.generate(ids, attention_mask=mask, do_sample=False, **kw)
    if impl == "transformers_cfg":
        return model.generate(ids, attention_mask=mask, do_sample=False, guidance_scale=1.5, **kw)
    if impl == "transformers_cfg_patched":  # the same unchanged call, under the drop-in patch
        with cfg_triton.patch_transformers():
            return model.generate(ids, attention_mask=mask, do_sample=False, guidance_scale=1.5, **kw)
    if impl == "cfg_triton_unguided":
        return cfg_triton.generate(model, ids, mask, guidance_scale=1.0, **kw)
    if impl == "cfg_triton_sampled":  # batched, drawing with temperature and top-p
        return cfg_triton.generate(model, ids, mask, guidance_scale=1.5, do_sample=True,
                                   temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(0),
                                   **kw)
    mode = impl.removeprefix("cfg_triton_")
    return cfg_triton.generate(model, ids, mask, guidance_scale=1.5, mode=mode, **kw)


IMPLS = ["plain", "transformers_cfg", "transformers_cfg_patched", "cfg_triton_unguided",
         "cfg_triton_batched", "cfg_triton_sequential", "cfg_triton_sampled"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", [1, 8])
def test_generation(benchmark, smollm2, batch, impl):
    model, tok = smollm2
    enc = tok(PROMPTS[:batch], return_tensors="pt", padding=True)
    benchmark.extra_info.update(impl=impl, batch=batch, new_tokens=NEW_TOKENS)
    with torch.inference_mode():
        out = benchmark.pedantic(_run, args=(impl, model, enc.input_ids, enc.attention_mask),
                                 warmup_rounds=1, rounds=7, iterations=1)
    assert out.shape[1] == enc.input_ids.shape[1] + NEW_TOKENS


def test_cached_model_load(benchmark, smollm2):
    """`models.load("smollm2")` once its converted checkpoint is cached (the fixture made sure)."""
    benchmark.extra_info.update(load="smollm2")
    benchmark.pedantic(models.load, args=("smollm2",), warmup_rounds=1, rounds=5, iterations=1)
