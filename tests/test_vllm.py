"""CFG on vLLM (cfg_triton.vllm): greedy tokens equal `cfg_triton.generate` on the same checkpoint
under every way vLLM can split a pair (arrival in different steps, chunked prefills of different
lengths, preemption, the multiprocess engine), seeded sampling is reproducible, and no token is
ever drawn without its pair (`degraded_tokens` stays 0).

vLLM pins its own torch and transformers, so these run in their own environment
(`scripts/install.sh --vllm`, then `scripts/test_vllm.sh`); elsewhere this module is skipped.
Each engine is built once per module (tens of seconds each on 2 CPU cores).
"""
import dataclasses
import gc
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("vllm", reason="vLLM runs in its own environment: scripts/install.sh --vllm")

import torch  # noqa: E402

import cfg_triton  # noqa: E402
from cfg_triton import models  # noqa: E402
from cfg_triton import vllm as cv  # noqa: E402
from cfg_triton.params import GuidanceParams  # noqa: E402
from helpers import environment  # noqa: E402

pytestmark = pytest.mark.model

PROMPTS = ["The capital of France is",
           "Once upon a time, in a land far away, there lived a dragon who",
           "def fib(n):",
           "List three colors:"]
# The third is longer than its prompt (and than a 16-token step): its chunks end after cond's.
NEGATIVES = [None, "The dragon", "A long negative prompt that says many things about nothing at all and "
                                 "goes on and on", None]
GREEDY = GuidanceParams(guidance_scale=1.5, max_new_tokens=12)


@pytest.fixture(scope="module")
def checkpoint():
    return str(models.checkpoint("smollm2"))


@pytest.fixture(scope="module")
def reference(checkpoint):
    """`run(prompt, negative, params)`: the tokens `cfg_triton.generate` draws (the reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])

    def run(prompt, negative, params):
        ids = torch.tensor([tokenizer(prompt).input_ids])
        kwargs = params.generate_kwargs()
        if negative is not None:
            kwargs["negative_input_ids"] = torch.tensor([tokenizer(negative, add_special_tokens=False).input_ids])
        tokens = cfg_triton.generate(model, ids, **kwargs)[0, ids.shape[1]:].tolist()
        for i, token in enumerate(tokens):  # vLLM's output ends with its EOS token
            if token in eos:
                return tokens[: i + 1]
        return tokens

    run.model, run.tokenizer = model, tokenizer
    return run


def _engine(checkpoint, **overrides):
    from vllm import LLM

    # 256 MiB of KV cache (5,000 tokens): several engines live in this process at times.
    settings = dict(dtype="float32", max_model_len=512, max_num_batched_tokens=64, max_num_seqs=32,
                    enforce_eager=True, seed=0, gpu_memory_utilization=0.3, kv_cache_memory_bytes=2**28)
    settings.update(overrides)
    return LLM(checkpoint, **cv.engine_args(**settings))


@pytest.fixture(scope="module")
def in_process():
    with environment("VLLM_ENABLE_V1_MULTIPROCESSING", "0"):
        yield


@pytest.fixture(scope="module")
def llm(checkpoint, in_process):
    engine = _engine(checkpoint)
    yield engine
    _close(engine)


def _close(engine):
    engine.llm_engine.engine_core.shutdown()
    del engine
    gc.collect()


def _check(outputs, prompts, negatives, params, reference, seeds=None):
    for i, (prompt, negative, out) in enumerate(zip(prompts, negatives, outputs)):
        request = params if seeds is None else dataclasses.replace(params, seed=seeds[i])
        expected = reference(prompt, negative, request)
        assert out.token_ids == expected, (prompt, out.text)


def _delta(before, llm=None):
    """Counter changes since `before`; with `llm`, after one more engine step (the processor sees
    whether the last step's lone rows produced tokens only at the next step)."""
    if llm is not None:
        from vllm import SamplingParams

        llm.generate([{"prompt_token_ids": [1, 2]}], SamplingParams(max_tokens=1), use_tqdm=False)
    after = cv.counters()
    return {k: after[k] - before.get(k, 0) for k in after}


def test_one_pair_greedy(llm, reference):
    before = cv.counters()
    out = cv.generate(llm, PROMPTS[:1], params=GREEDY)
    _check(out, PROMPTS[:1], [None], GREEDY, reference)
    delta = _delta(before, llm)
    assert delta["degraded_tokens"] == 0 and delta["guided_tokens"] == len(out[0].token_ids)


def test_four_pairs_of_different_lengths_at_once(llm, reference):
    """Prompts of 6 to 17 tokens, one negative prompt longer than its prompt, submitted together."""
    before = cv.counters()
    out = cv.generate(llm, PROMPTS, NEGATIVES, params=GREEDY)
    _check(out, PROMPTS, NEGATIVES, GREEDY, reference)
    delta = _delta(before, llm)
    assert delta["degraded_tokens"] == 0 and delta["guided_tokens"] == sum(len(o.token_ids) for o in out)


def test_mixed_guidance_and_the_sampling_params_front_end(llm, reference):
    """α (mix) set, and the parameters given as vLLM SamplingParams rather than GuidanceParams."""
    from vllm import SamplingParams

    out = cv.generate(llm, PROMPTS[:2], guidance_scale=3.0, mix=0.7,
                      sampling_params=SamplingParams(temperature=0, max_tokens=10))
    _check(out, PROMPTS[:2], [None, None], GuidanceParams(guidance_scale=3.0, mix=0.7, max_new_tokens=10),
           reference)


def test_seeded_sampling_is_reproducible_across_runs_and_batches(llm, reference):
    params = GuidanceParams(guidance_scale=1.5, temperature=0.9, top_k=50, top_p=0.95, seed=1234,
                            max_new_tokens=12)
    first = cv.generate(llm, PROMPTS, NEGATIVES, params=params)
    again = cv.generate(llm, PROMPTS, NEGATIVES, params=params)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    # Request i is keyed by seed + i: alone, with its own seed, it draws what it drew in the batch.
    alone = cv.generate(llm, PROMPTS[2:3], NEGATIVES[2:3], params=dataclasses.replace(params, seed=1236))
    assert alone[0].token_ids == first[2].token_ids
    # ... and what cfg_triton.generate draws with that seed (same noise keys: seed, row 0, step).
    _check(first, PROMPTS, NEGATIVES, params, reference, seeds=[1234 + i for i in range(4)])
    min_p = dataclasses.replace(params, top_k=None, top_p=None, min_p=0.1, seed=77)
    _check(cv.generate(llm, PROMPTS[:2], params=min_p), PROMPTS[:2], [None, None], min_p, reference,
           seeds=[77, 78])


def test_stop_strings_end_the_pair(llm):
    from vllm import SamplingParams

    before = cv.counters()
    out = cv.generate(llm, PROMPTS[:1], guidance_scale=1.5,
                      sampling_params=SamplingParams(temperature=0, max_tokens=12, stop=["States"]))
    assert out[0].finish_reason == "stop" and out[0].text.endswith("United ")
    assert not llm.llm_engine.has_unfinished_requests()  # the unconditional request ended too
    assert _delta(before, llm)["degraded_tokens"] == 0


def test_logprobs_are_the_conditional_branchs(llm, reference):
    """What `logprobs` returns on a guided request: vLLM's raw log-probabilities of the conditional
    branch (documented), here checked against the model's own log-softmax at each chosen token."""
    from vllm import SamplingParams

    out = cv.generate(llm, PROMPTS[:1], guidance_scale=1.5,
                      sampling_params=SamplingParams(temperature=0, max_tokens=6, logprobs=1))[0]
    assert len(out.logprobs) == len(out.token_ids)
    ids = reference.tokenizer(PROMPTS[0]).input_ids
    with torch.no_grad():
        logits = reference.model(torch.tensor([ids + out.token_ids])).logits[0].double()
    conditional = logits.log_softmax(-1)[len(ids) - 1: -1]
    for t, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        # float32 forwards by two implementations: agreement to 1e-3 nats.
        assert abs(entry[token].logprob - conditional[t, token].item()) < 1e-3


def test_refused_parameters(llm):
    from vllm import SamplingParams

    for field, value in (("repetition_penalty", 1.2), ("frequency_penalty", 0.5), ("presence_penalty", 0.5),
                         ("min_tokens", 3), ("logit_bias", {1: 2.0}), ("bad_words", ["x"])):
        with pytest.raises(ValueError, match=field):
            cv.generate(llm, PROMPTS[:1], sampling_params=SamplingParams(max_tokens=4, **{field: value}))
    with pytest.raises(ValueError, match="structured_outputs"):
        from vllm.sampling_params import StructuredOutputsParams

        cv.generate(llm, PROMPTS[:1], sampling_params=SamplingParams(
            max_tokens=4, structured_outputs=StructuredOutputsParams(choice=["yes", "no"])))
    # Bad inputs are refused before anything is submitted: the engine is left empty and serves on.
    for prompts, negatives in (([PROMPTS[0], PROMPTS[1]], [None, ""]),
                               ([PROMPTS[0], PROMPTS[1]], [None, "word " * 600])):
        with pytest.raises(ValueError):
            cv.generate(llm, prompts, negatives, params=GREEDY)
        assert not llm.llm_engine.has_unfinished_requests()
    assert llm.generate([{"prompt_token_ids": [1, 2]}], SamplingParams(max_tokens=2), use_tqdm=False)
    # A tagged request the processor would not control (not greedy in vLLM) is refused by vLLM.
    cond, _ = cv.pair_params(GREEDY, 1)
    cond.temperature = 1.0
    from vllm.exceptions import VLLMValidationError

    with pytest.raises((ValueError, VLLMValidationError), match="temperature 0"):
        llm.generate([{"prompt_token_ids": [1, 2]}], cond, use_tqdm=False)


def test_any_seed_serves_any_number_of_prompts(llm):
    """Request i is seeded seed + i, wrapped: the largest seed still seeds the second prompt."""
    params = GuidanceParams(guidance_scale=1.5, temperature=0.8, seed=2**63 - 1, max_new_tokens=4)
    first = cv.generate(llm, PROMPTS[:2], params=params)
    again = cv.generate(llm, PROMPTS[1:2], params=dataclasses.replace(params, seed=-(2**63)))
    assert all(o.token_ids for o in first) and first[1].token_ids == again[0].token_ids


def test_pairs_need_two_sequence_slots(checkpoint, in_process):
    with pytest.raises(Exception, match="max_num_seqs=1"):
        _engine(checkpoint, max_num_seqs=1)


def test_counters_are_read_from_the_engine_files(llm):
    assert os.environ.get(cv.COUNTERS_ENV) and set(cv.counters()) == set(cv.COUNTERS)


# ---------------------------------------------------------------------- other engine shapes

def test_small_token_budget_chunks_every_prefill(checkpoint, in_process, reference):
    """16 tokens a step: every prompt is chunked, cond's and uncond's chunks end in different
    steps unless the scheduler holds one back."""
    engine = _engine(checkpoint, max_num_batched_tokens=16, max_num_seqs=16)
    try:
        before = cv.counters()
        out = cv.generate(engine, PROMPTS, NEGATIVES, params=GREEDY)
        _check(out, PROMPTS, NEGATIVES, GREEDY, reference)
        # A one-token prompt whose negative prompt is longer than a step: the longer member
        # queues first and prefills alone; the one-token member never holds the queue's head.
        tok = reference.tokenizer
        one = tok(PROMPTS[0]).input_ids[:1]
        out = cv.generate(engine, [one], [NEGATIVES[2]], params=GREEDY)
        model_tokens = cfg_triton.generate(reference.model, torch.tensor([one]), negative_input_ids=torch.tensor(
            [tok(NEGATIVES[2], add_special_tokens=False).input_ids]), **GREEDY.generate_kwargs())[0, 1:].tolist()
        assert out[0].token_ids == model_tokens[: len(out[0].token_ids)] and out[0].token_ids
        assert _delta(before, engine)["degraded_tokens"] == 0
    finally:
        _close(engine)


def test_without_the_pair_scheduler_the_pairs_drift_and_it_is_counted(checkpoint, in_process, reference):
    """The control: vLLM's own scheduler with the same processor and the same 16-token budget
    splits pairs (cond's last chunk runs before uncond's), and the processor counts the tokens
    drawn alone, so the zero asserted everywhere else is a measurement."""
    from vllm.v1.core.sched.scheduler import Scheduler

    engine = _engine(checkpoint, max_num_batched_tokens=16, max_num_seqs=16,
                     scheduler_cls=f"{Scheduler.__module__}.{Scheduler.__qualname__}")
    try:
        before = cv.counters()
        out = cv.generate(engine, PROMPTS, NEGATIVES, params=GREEDY)
        assert _delta(before, engine)["degraded_tokens"] > 0
        expected = [reference(p, n, GREEDY) for p, n in zip(PROMPTS, NEGATIVES)]
        assert [o.token_ids for o in out] != expected
    finally:
        _close(engine)


def test_small_kv_cache_forces_preemption(checkpoint, in_process, reference):
    """8 blocks of 32 tokens for 6 pairs of 2 blocks a member at the end: vLLM preempts, and pairs
    resume together."""
    engine = _engine(checkpoint, block_size=32, num_gpu_blocks_override=8, max_model_len=160,
                     max_num_batched_tokens=64,
                     enable_prefix_caching=False)
    try:
        prompts = PROMPTS + ["Write a short poem about the sea:", "The three laws of robotics are"]
        negatives = NEGATIVES + [None, "Robots"]
        params = dataclasses.replace(GREEDY, max_new_tokens=24)
        before = cv.counters()
        out = cv.generate(engine, prompts, negatives, params=params)
        _check(out, prompts, negatives, params, reference)
        delta = _delta(before, engine)
        assert delta["preempted_members"] > 0, delta
        assert delta["degraded_tokens"] == 0, delta
    finally:
        _close(engine)


def test_multiprocess_engine(checkpoint, reference, monkeypatch):
    """The default engine: requests reach the engine process one at a time (the arrival race)."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    engine = _engine(checkpoint)
    try:
        prompts = [f"{p} {k}" for k in ("", "and") for p in PROMPTS] + PROMPTS[:2]
        negatives = (NEGATIVES * 3)[: len(prompts)]
        before = cv.counters()
        out = cv.generate(engine, prompts, negatives, params=GREEDY)
        _check(out, prompts, negatives, GREEDY, reference)
        delta = _delta(before, engine)
        assert delta["degraded_tokens"] == 0 and delta["guided_tokens"] == sum(len(o.token_ids) for o in out)
    finally:
        engine.llm_engine.engine_core.shutdown()


# ---------------------------------------------------------------------- the server

def test_serve_engine_vllm(checkpoint, reference, tmp_path):
    """`cfg-triton serve --engine vllm` answers OpenAI requests with guided text."""
    import httpx

    port = 8000 + os.getpid() % 1000
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "cfg_triton.cli", "serve", "--engine", "vllm",
                               "--model", checkpoint, "--port", str(port), "--max-batch-tokens", "32",
                               *[f"--vllm-arg={a}" for a in ("gpu_memory_utilization=0.3", "dtype=float32",
                                                              "enforce_eager=true", "max_model_len=512",
                                                              f"kv_cache_memory_bytes={2**28}")]],
                              stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, cv.COUNTERS_ENV: str(tmp_path / "counters")})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not start"
            time.sleep(1)
        body = {"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0, "guidance_scale": 1.5,
                "negative_prompt": NEGATIVES[1]}
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        tokenizer = _tokenizer(checkpoint)
        expected = tokenizer.decode(reference(PROMPTS[1], NEGATIVES[1], GREEDY))
        assert r.json()["choices"][0]["text"] == expected
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) > 3
        # γ = 1: one plain request, sampled by vLLM (greedy here): the unguided reference.
        r = httpx.post(url + "/v1/completions", json={**body, "guidance_scale": 1}, timeout=120)
        plain = dataclasses.replace(GREEDY, guidance_scale=1.0)
        assert r.json()["choices"][0]["text"] == tokenizer.decode(reference(PROMPTS[1], None, plain))
        r = httpx.post(url + "/v1/completions", json={**body, "logprobs": 1}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
        health = httpx.get(url + "/health", timeout=5).json()
        assert health["degraded_tokens"] == 0 and health["guided_tokens"] >= 24
    finally:
        server.terminate()
        server.wait(60)


def _tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)
