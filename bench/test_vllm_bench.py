"""CFG on vLLM: generated tokens per second, guided against unguided, on one engine at 1, 4 and 16
concurrent requests, side by side in one process (bundled SmolLM2 in float32, greedy, 32 new
tokens a request; vLLM's in-process engine):

* `guided`: `cfg_triton.vllm.generate` at γ = 1.5 with a negative prompt (two engine requests
  each, the pair scheduler and the guidance processor);
* `unguided`: `LLM.generate` of the same prompts on the same engine (one request each; the
  processor leaves untagged rows alone).

    scripts/install.sh --vllm && .venv-vllm/bin/python bench/vllm_throughput.py LABEL

Runs in vLLM's environment only (skipped elsewhere).
"""
import os
import time

import pytest

pytest.importorskip("vllm", reason="vLLM runs in its own environment: scripts/install.sh --vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TRITON_INTERPRET", "0")

from cfg_triton import models  # noqa: E402
from cfg_triton import vllm as cv  # noqa: E402
from cfg_triton.params import GuidanceParams  # noqa: E402

NEW_TOKENS = 32
STREAMS = [1, 4, 16]
WORDS = ["ocean", "mountain", "river", "forest", "desert", "city", "garden", "winter", "summer", "music",
         "light", "stone", "cloud", "bridge", "market", "letter"]


@pytest.fixture(scope="module")
def llm():
    from vllm import LLM

    engine = LLM(str(models.checkpoint("smollm2")), **cv.engine_args(
        dtype="float32", max_model_len=512, max_num_batched_tokens=512, max_num_seqs=64,
        enforce_eager=True, seed=0, gpu_memory_utilization=0.3, kv_cache_memory_bytes=2**28))
    yield engine
    engine.llm_engine.engine_core.shutdown()


def _guided(llm, prompts):
    params = GuidanceParams(guidance_scale=1.5, max_new_tokens=NEW_TOKENS)
    out = cv.generate(llm, prompts, ["Write a short story."] * len(prompts), params=params)
    return sum(len(o.token_ids) for o in out)


def _unguided(llm, prompts):
    from vllm import SamplingParams

    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS), use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in out)


@pytest.mark.parametrize("streams", STREAMS)
@pytest.mark.parametrize("impl", ["guided", "unguided"])
def test_vllm(benchmark, llm, impl, streams):
    prompts = [f"Write a short story about a {w}. Once upon a time," for w in WORDS[:streams]]
    run = {"guided": _guided, "unguided": _unguided}[impl]
    run(llm, prompts)  # warm-up

    def timed():
        start = time.perf_counter()
        tokens = run(llm, prompts)
        return tokens, time.perf_counter() - start

    before = cv.counters()
    tokens, seconds = benchmark.pedantic(timed, rounds=3, iterations=1)
    benchmark.extra_info.update(impl=impl, streams=streams, tokens=tokens,
                                tokens_per_s=tokens / benchmark.stats.stats.median)
    assert tokens >= streams
    assert cv.counters()["degraded_tokens"] == before["degraded_tokens"]
