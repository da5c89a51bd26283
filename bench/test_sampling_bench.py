"""Guided sampling on this machine: `cfg_triton.sample` against the unfused ways to draw a token.

Per point, side by side in one run:
- `sample`: the guided draw from both branches (CPU: the torch path; with `TRITON_INTERPRET=1`
  unset, as bench/run.py runs it);
- `multinomial`: `guidance`, transformers-style warpers (`warp_scores`, min-p written out), softmax
  and `torch.multinomial`; greedy: `guidance` and `argmax` (what `generate` ran before `sample`);
- `exponential`: the same probabilities, then the `probs / Exponential(1)` argmax trick.
Greedy, and temperature 0.8 with filters none, top-k 50, top-p 0.9 and min-p 0.05. The GPU grid is
bench/gpu.py's.
"""
import pytest
import torch

import cfg_triton
from cfg_triton.processors import warp_scores

FILTERS = {"greedy": dict(temperature=0.0), "none": {}, "top_k": dict(top_k=50),
           "top_p": dict(top_p=0.9), "min_p": dict(min_p=0.05)}


def _probs(cond, uncond, filters):
    scores = cfg_triton.guidance(cond, uncond, 1.5)
    if "min_p" in filters:
        p = scores.softmax(-1)
        scores = scores.masked_fill(p < filters["min_p"] * p.amax(-1, keepdim=True), float("-inf"))
    return warp_scores(scores, 0.8, filters.get("top_k"), filters.get("top_p")).softmax(-1)


def _multinomial(cond, uncond, filters):
    if filters.get("temperature") == 0:
        return cfg_triton.guidance(cond, uncond, 1.5).argmax(-1)
    return torch.multinomial(_probs(cond, uncond, filters), 1)


IMPLS = {
    "sample": lambda c, u, f: cfg_triton.sample(c, u, 1.5, seed=0, step=0, **{"temperature": 0.8, **f}),
    "multinomial": _multinomial,
    "exponential": lambda c, u, f: (_probs(c, u, f) / torch.empty_like(c).exponential_()).argmax(-1),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", FILTERS)
@pytest.mark.parametrize("vocab", [32_000, 128_256])
@pytest.mark.parametrize("batch", [1, 8])
def test_sampling(benchmark, monkeypatch, device, batch, vocab, name, impl):
    if name == "greedy" and impl == "exponential":
        pytest.skip("no draw to race")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator(device=device).manual_seed(0)
    cond = torch.randn(batch, vocab, generator=gen, device=device) * 4
    uncond = torch.randn(batch, vocab, generator=gen, device=device) * 4
    benchmark.extra_info.update(sampling=impl, filter=name, batch=batch, vocab=vocab,
                                dtype="float32", floor_bytes=2 * batch * vocab * 4)
    fn = IMPLS[impl]
    with torch.inference_mode():
        benchmark.pedantic(lambda: fn(cond, uncond, FILTERS[name]), warmup_rounds=2, rounds=15,
                           iterations=1)
