"""Serving CFG: tokens per second and time to first token at 1, 4 and 16 concurrent streams, side by
side in one process (bundled SmolLM2, greedy, 32 new tokens a stream, γ = 1.5, a negative prompt):

* `guided`: `cfg-triton serve`'s engine (transformers' continuous batching, the pair scheduler and
  the fused sampling step), every stream guided;
* `unguided`: the same engine, the same requests at γ = 1 (one sequence each);
* `per-request`: the text-generation-webui way, `model.generate(guidance_scale=…,
  negative_prompt_ids=…)` one request at a time behind a lock (its time to first token includes
  the wait for the lock).

    python bench/serve.py LABEL       # runs this file, prints the table and ratios, writes bench/results/

The targets at 16 streams: guided >= 0.45x unguided, and >= 3x per-request.
"""
import asyncio
import threading
import time

import pytest
import torch

from cfg_triton import models
from cfg_triton.continuous import TransformersEngine
from cfg_triton.params import GuidanceParams

NEW_TOKENS = 32
STREAMS = [1, 4, 16]
IMPLS = ["guided", "unguided", "per-request"]
WORDS = ["ocean", "mountain", "river", "forest", "desert", "city", "garden", "winter", "summer", "music",
         "light", "stone", "cloud", "bridge", "market", "letter"]


@pytest.fixture(scope="module")
def setup():
    model, tok = models.load("smollm2")
    prompts = [tok(f"Write a short story about a {w}. Once upon a time,").input_ids for w in WORDS]
    negative = tok("Write a short story.", add_special_tokens=False).input_ids
    engine = TransformersEngine(model, tok, page_size=64, num_blocks=128, max_batch_tokens=512,
                                max_requests=64)
    yield model, prompts, negative, engine
    engine.stop()


def _serve(engine, prompts, negative, scale):
    """All prompts at once through the engine: (tokens, seconds, [time to first token])."""
    params = GuidanceParams(guidance_scale=scale, max_new_tokens=NEW_TOKENS)

    async def one(ids, start):
        first, count = None, 0
        async for out in engine.generate(ids, negative, params):
            first = first or time.perf_counter() - start
            count = len(out.token_ids)
        return count, first

    async def run():
        start = time.perf_counter()
        done = await asyncio.gather(*(one(ids, start) for ids in prompts))
        return done, time.perf_counter() - start

    done, seconds = asyncio.run(run())
    return sum(c for c, _ in done), seconds, [f for _, f in done]


def _per_request(model, prompts, negative):
    """One `model.generate` at a time behind a lock, all requests arriving at once."""
    lock, neg = threading.Lock(), torch.tensor([negative])
    results, start = [], time.perf_counter()

    class FirstToken:
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, _):
            self.calls += 1  # the first call carries the prompt
            if self.calls == 2:
                self.first = time.perf_counter() - start

        def end(self):
            pass

    def one(ids):
        streamer = FirstToken()
        with lock, torch.inference_mode():
            out = model.generate(torch.tensor([ids]), guidance_scale=1.5, negative_prompt_ids=neg,
                                 max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)
        results.append((out.shape[1] - len(ids), streamer.first))

    threads = [threading.Thread(target=one, args=(ids,)) for ids in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(c for c, _ in results), time.perf_counter() - start, [f for _, f in results]


@pytest.mark.parametrize("streams", STREAMS)
@pytest.mark.parametrize("impl", IMPLS)
def test_serve(benchmark, setup, impl, streams):
    model, prompts, negative, engine = setup
    prompts = prompts[:streams]
    run = {"guided": lambda: _serve(engine, prompts, negative, 1.5),
           "unguided": lambda: _serve(engine, prompts, negative, 1.0),
           "per-request": lambda: _per_request(model, prompts, negative)}[impl]
    run()  # warm-up: first-call allocations and kernel selection
    tokens, seconds, first = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(impl=impl, streams=streams, tokens=tokens, seconds=seconds,
                                tokens_per_s=tokens / seconds, ttft_mean=sum(first) / len(first),
                                ttft_max=max(first))
    assert tokens >= streams  # every stream produced tokens
