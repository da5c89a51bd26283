"""`cfg-triton serve`: the pair scheduler and fused sampling step inside transformers' continuous-
batching engine, and the HTTP front end, against `cfg_triton.generate` on the bundled SmolLM2.

Every engine here is small on purpose (pages of 16 tokens, a few dozen pages, 16 to 32 query tokens
a step): prompts longer than a step's budget are prefilled in chunks, and the smallest cache holds
fewer requests than are submitted, so pairs are offloaded (soft reset) and resumed.
"""
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from cfg_triton import generate  # noqa: E402
from cfg_triton.continuous import TransformersEngine, _pair_chunks  # noqa: E402
from cfg_triton.params import GuidanceParams, ParamError  # noqa: E402
from helpers import environment  # noqa: E402

pytestmark = pytest.mark.model

PROMPTS = ["The capital of France is",
           "Once upon a time, in a small village by the mountains, there lived an old clockmaker who",
           "List three colours:"]
NEGATIVES = [None, "Answer with a long digression about the weather, the sea, the mountains, the old "
                   "roads between the towns and the history of bread, never getting to the point", "sad"]


def reference(model, prompt_ids, negative_ids, params: GuidanceParams):
    """`cfg_triton.generate`'s tokens for one request, cut after its EOS (the server stops there)."""
    neg = None if negative_ids is None or not params.guided else torch.tensor([negative_ids])
    out = generate(model, torch.tensor([prompt_ids]), negative_input_ids=neg,
                   **params.generate_kwargs())[0, len(prompt_ids):].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for i, t in enumerate(out):
        if t in eos:
            return out[: i + 1]
    return out


async def _run(engine, requests):
    async def one(prompt_ids, negative_ids, params):
        last = None
        async for last in engine.generate(prompt_ids, negative_ids, params):
            pass
        return last
    return await asyncio.gather(*(one(*r) for r in requests))


def _wait_idle(engine, timeout=20.0):
    deadline = time.monotonic() + timeout
    while engine.busy_sequences() and time.monotonic() < deadline:
        time.sleep(0.05)
    return engine.busy_sequences()


@pytest.fixture(scope="module", autouse=True)
def torch_path():
    """The torch path for CPU tensors, for the whole module: the engine's thread samples too, and
    the interpreted kernels are covered by their own tests."""
    with environment("TRITON_INTERPRET", "0"):
        yield


@pytest.fixture(scope="module")
def engine(smollm2):
    model, tok = smollm2
    eng = TransformersEngine(model, tok, page_size=16, num_blocks=64, max_batch_tokens=32, max_requests=32)
    yield eng
    assert eng.running() and eng.counters["degraded_tokens"] == 0  # every guided token was guided
    eng.stop()


@pytest.fixture(scope="module")
def requests(smollm2):
    """(prompt ids, negative ids, params) of three requests; the second prompt and the second
    negative prompt exceed a step's 32 tokens, and that negative prompt is longer than its prompt."""
    _, tok = smollm2
    greedy = GuidanceParams(guidance_scale=1.5, max_new_tokens=24)
    out = []
    for prompt, negative in zip(PROMPTS, NEGATIVES):
        neg = None if negative is None else tok(negative, add_special_tokens=False).input_ids
        out.append((tok(prompt).input_ids, neg, greedy))
    assert len(out[1][1]) > max(len(out[1][0]), 32)
    return out


def test_pair_chunks_never_finish_one_member_alone():
    assert _pair_chunks([5], 3) == [3]
    assert _pair_chunks([5], 0) is None
    assert _pair_chunks([5, 7], 12) == [5, 7]           # both complete: both yield logits
    assert _pair_chunks([5, 7], 11) == [4, 6]           # neither completes
    assert _pair_chunks([1, 7], 4) == [0, 4]            # the member one token short waits
    assert _pair_chunks([1, 1], 1) is None              # a decode step needs both
    assert _pair_chunks([1, 1], 2) == [1, 1]
    for a in range(1, 6):
        for b in range(1, 6):
            for budget in range(0, 12):
                chunks = _pair_chunks([a, b], budget)
                if chunks is None:
                    continue
                assert sum(chunks) <= budget and all(0 <= c <= n for c, n in zip(chunks, (a, b)))
                assert (chunks[0] == a) == (chunks[1] == b), (a, b, budget, chunks)


def test_output_length_counts_tokens_a_soft_reset_moved():
    """A soft reset moves a sequence's outputs into its prompt; its step (the noise key) goes on."""
    from transformers.generation.continuous_batching.requests import RequestState

    from cfg_triton.continuous import _output_length

    state = RequestState(request_id="r", initial_tokens=[1, 2, 3], max_new_tokens=8)
    state.generated_tokens = [4, 5]
    assert _output_length(state) == 2
    moved = state.create_equivalent_initial_request()
    moved.generated_tokens = [6]
    assert moved.initial_tokens == [1, 2, 3, 4, 5] and _output_length(moved) == 3


def test_check_engine_names_a_missing_hook(monkeypatch):
    from cfg_triton import continuous

    continuous.check_engine()  # this transformers has every hook
    monkeypatch.setattr(continuous, "_HOOKS", continuous._HOOKS + (("scheduler", "Scheduler._gone"),))
    with pytest.raises(ImportError, match="scheduler.Scheduler._gone"):
        continuous.check_engine()


def test_text_stream_holds_back_what_may_change():
    from cfg_triton.server import TextStream

    class Chars:  # token i decodes to chr(i); 0xFFFD stands for an incomplete character
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    stream = TextStream(Chars(), ["END", "\n\n"])
    deltas = [stream.update([ord(c) for c in text]) for text in ("ab", "abE", "abEN", "abENx", "abENx\n")]
    assert deltas == ["ab", "", "", "ENx", ""] and not stream.stopped
    assert stream.update([ord(c) for c in "abENx\nyEND tail"]) == "\ny" and stream.stopped
    stream = TextStream(Chars(), [])
    assert stream.update([ord("a"), 0xFFFD]) == "a" and stream.update([ord("a"), 0xFFFD], final=True) == "\ufffd"


def test_guidance_params_validate_once():
    p = GuidanceParams(guidance_scale=1.5, top_k=0, top_p=1.0, min_p=0.0)
    assert (p.top_k, p.top_p, p.min_p, p.guided, p.greedy) == (None, None, None, True, True)
    assert not GuidanceParams().guided and GuidanceParams(mix=0.7).guided
    for kwargs, param in [({"guidance_scale": float("nan")}, "guidance_scale"),
                          ({"guidance_scale": 2e6}, "guidance_scale"), ({"mix": 1.5}, "mix"),
                          ({"temperature": -1}, "temperature"), ({"temperature": 1e-9}, "temperature"),
                          ({"top_k": -2}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"min_p": 2}, "min_p"),
                          ({"seed": 2**64}, "seed"), ({"max_new_tokens": 0}, "max_new_tokens"),
                          ({"top_k": 1.5}, "top_k"), ({"guidance_scale": True}, "guidance_scale")]:
        with pytest.raises(ParamError) as e:
            GuidanceParams(**kwargs)
        assert e.value.param == param


def test_greedy_parity_under_chunked_prefill(smollm2, engine, requests):
    """Concurrent guided requests of different lengths equal `generate` token for token."""
    model, _ = smollm2
    expected = [reference(model, *r) for r in requests]
    before = dict(engine.counters)
    outs = asyncio.run(_run(engine, requests))
    for out, ref in zip(outs, expected):
        assert out.token_ids == ref
        assert out.finish_reason == ("stop" if len(ref) < 24 else "length")
    assert engine.counters["guided_tokens"] - before["guided_tokens"] == sum(map(len, expected))
    assert not _wait_idle(engine)


def test_mixed_batch_per_request_parameters(smollm2, engine, requests):
    """Each request's own γ, α, temperature, filters and seed apply (one batch, one fused call per
    mode); seeded draws do not depend on what else is in the batch."""
    model, _ = smollm2
    prompt, neg = requests[1][0], requests[2][1]
    variants = [GuidanceParams(guidance_scale=1.0, max_new_tokens=12),                   # unguided
                GuidanceParams(guidance_scale=3.0, mix=0.7, max_new_tokens=12),
                GuidanceParams(guidance_scale=1.5, temperature=0.9, top_k=40, top_p=0.9, seed=11,
                               max_new_tokens=12),
                GuidanceParams(guidance_scale=2.0, temperature=1.2, min_p=0.05, seed=5, max_new_tokens=12)]
    batch = [(prompt, neg, p) for p in variants]
    expected = [reference(model, *r) for r in batch]
    together = asyncio.run(_run(engine, batch))
    alone = asyncio.run(_run(engine, batch[2:3]))
    assert [o.token_ids for o in together] == expected
    assert alone[0].token_ids == expected[2]
    assert len({tuple(e) for e in expected}) == len(expected)  # the parameters did differ


def test_pairs_wait_for_cache_instead_of_offloading(smollm2, requests):
    """A cache of 8 pages (128 tokens) for three pairs that need 12: the pairs that do not fit wait
    for the reservations of those running (nothing is offloaded), and every pair equals `generate`."""
    model, tok = smollm2
    eng = TransformersEngine(model, tok, page_size=16, num_blocks=8, max_batch_tokens=16, max_requests=8)
    try:
        short = [(p[:20], None if n is None else n[:12], GuidanceParams(guidance_scale=1.5, max_new_tokens=24))
                 for p, n, _ in requests]
        expected = [reference(model, *r) for r in short]
        offloads = _offloads(eng)
        peak = []
        reserved = eng._scheduler.reserved_pages
        eng._scheduler.reserved_pages = lambda: peak.append(reserved()) or peak[-1]
        outs = asyncio.run(_run(eng, short))
        assert [o.token_ids for o in outs] == expected
        assert not offloads and 0 < max(peak) <= 8 and not _wait_idle(eng)
        assert eng.counters["degraded_tokens"] == 0 and eng.counters["guided_tokens"] == sum(map(len, expected))
    finally:
        eng.stop()


@pytest.mark.slow
def test_gemma3_sliding_window_parity(gemma3):
    """Gemma 3 (sliding-window layers: the engine's varlen path only; vocabulary 262,144)."""
    model, tok = gemma3
    eng = TransformersEngine(model, tok, page_size=16, num_blocks=64, max_batch_tokens=24, max_requests=16)
    try:
        params = GuidanceParams(guidance_scale=1.5, max_new_tokens=12)
        reqs = [(tok(PROMPTS[0]).input_ids, None, params),
                (tok(PROMPTS[1]).input_ids, tok(NEGATIVES[1], add_special_tokens=False).input_ids, params)]
        expected = [reference(model, *r) for r in reqs]
        assert [o.token_ids for o in asyncio.run(_run(eng, reqs))] == expected
        assert eng.counters["degraded_tokens"] == 0
    finally:
        eng.stop()


# ---------------------------------------------------------------------------------- HTTP

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(engine):
    """A real uvicorn server on 127.0.0.1 in a thread, serving `engine`: its base URL."""
    import uvicorn

    from cfg_triton.server import create_app

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, "smollm2"), host="127.0.0.1", port=port,
                                       log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def test_openai_client_completions_chat_and_streaming(smollm2, server, requests):
    openai = pytest.importorskip("openai")
    model, tok = smollm2
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    prompt, neg, params = requests[2]
    ref = tok.decode(reference(model, prompt, neg, GuidanceParams(guidance_scale=1.5, max_new_tokens=16)),
                     skip_special_tokens=True)
    extra = {"guidance_scale": 1.5, "negative_prompt": NEGATIVES[2]}
    done = client.completions.create(model="smollm2", prompt=PROMPTS[2], max_tokens=16, temperature=0,
                                     extra_body=extra, logprobs=2)
    assert done.choices[0].text == ref
    lp = done.choices[0].logprobs
    assert len(lp.token_logprobs) == done.usage.completion_tokens and all(v <= 0 for v in lp.token_logprobs)
    assert all(max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt=PROMPTS[2], max_tokens=16, temperature=0, extra_body=extra, stream=True))
    assert streamed == ref

    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    neg_ids = tok("Answer cheerfully.", add_special_tokens=False).input_ids
    ref = tok.decode(reference(model, chat_ids, neg_ids, GuidanceParams(guidance_scale=2.0, max_new_tokens=20)),
                     skip_special_tokens=True)
    extra = {"guidance_scale": 2.0, "negative_prompt": "Answer cheerfully."}
    chat = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=20, temperature=0,
                                          extra_body=extra)
    assert chat.choices[0].message.content == ref and chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=20,
                                            temperature=0, extra_body=extra, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == ref
    assert [m.id for m in client.models.list().data] == ["smollm2"]


def test_sse_framing(server):
    import httpx

    body = {"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "stream": True, "guidance_scale": 1.5}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert all(p["object"] == "text_completion" for p in payloads)
    assert [p["choices"][0]["finish_reason"] for p in payloads][-1] == "length"
    assert all(p["choices"][0]["finish_reason"] is None for p in payloads[:-1])


# The body SillyTavern (text completion, backend type text-generation-webui) sends, field for field,
# with its default preset; `stream` as its streaming mode sets it.
def _sillytavern_body(prompt):
    return {
        "prompt": prompt, "model": None, "max_new_tokens": 20, "max_tokens": 20, "logprobs": None,
        "temperature": 0.7, "top_p": 0.5, "typical_p": 1, "typical": 1, "sampler_seed": 1234,
        "min_p": 0, "repetition_penalty": 1, "frequency_penalty": 0, "presence_penalty": 0,
        "top_k": 40, "min_length": 0, "min_tokens": 0, "num_beams": 1, "length_penalty": 1,
        "early_stopping": False, "add_bos_token": True, "dynamic_temperature": False,
        "dynatemp_low": 1, "dynatemp_high": 1, "dynatemp_range": 0, "dynatemp_exponent": 1,
        "smoothing_factor": 0, "stopping_strings": ["\nUser:"], "stop": ["\nUser:"],
        "truncation_length": 4096, "ban_eos_token": False, "skip_special_tokens": True, "top_a": 0,
        "tfs": 1, "epsilon_cutoff": 0, "eta_cutoff": 0, "mirostat_mode": 0, "mirostat_tau": 5,
        "mirostat_eta": 0.1, "custom_token_bans": "", "api_type": "ooba",
        "api_server": "http://127.0.0.1:5000", "legacy_api": False, "rep_pen": 1, "rep_pen_range": 0,
        "repetition_penalty_range": 0, "encoder_repetition_penalty": 1, "no_repeat_ngram_size": 0,
        "penalty_alpha": 0, "temperature_last": False, "do_sample": True, "seed": 1234,
        "guidance_scale": 1.5, "negative_prompt": "Narrator speaks plainly.", "grammar_string": "",
        "repeat_penalty": 1, "tfs_z": 1, "repeat_last_n": 0, "n_predict": 20, "mirostat": 0,
        "ignore_eos": False, "stream": True,
    }


def test_sillytavern_textgen_request(smollm2, server):
    import httpx

    model, tok = smollm2
    prompt = "User: Tell me about the lighthouse.\nNarrator:"
    body = _sillytavern_body(prompt)
    text = ""
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
    params = GuidanceParams(guidance_scale=1.5, temperature=0.7, top_p=0.5, top_k=40, seed=1234,
                            max_new_tokens=20)
    ref = tok.decode(reference(model, tok(prompt).input_ids,
                               tok("Narrator speaks plainly.", add_special_tokens=False).input_ids, params),
                     skip_special_tokens=True)
    assert text == ref.split("\nUser:")[0] and text
    info = httpx.get(server + "/v1/internal/model/info").json()
    assert info == {"model_name": "smollm2", "lora_names": []}
    enc = httpx.post(server + "/v1/internal/encode", json={"text": prompt}).json()
    assert enc == {"tokens": tok(prompt).input_ids, "length": len(tok(prompt).input_ids)}
    assert httpx.post(server + "/v1/internal/token-count", json={"text": prompt}).json() == {"length": enc["length"]}
    assert httpx.post(server + "/v1/internal/decode", json={"tokens": enc["tokens"]}).json()["text"] == prompt


def test_stop_strings_cut_and_cancel(smollm2, server, engine):
    import httpx

    model, tok = smollm2
    full = tok.decode(reference(model, tok(PROMPTS[0]).input_ids, None,
                                GuidanceParams(guidance_scale=1.5, max_new_tokens=20)), skip_special_tokens=True)
    stop = full.split()[2]  # a word in the middle of the greedy continuation
    r = httpx.post(server + "/v1/completions", timeout=60, json={
        "prompt": PROMPTS[0], "max_tokens": 20, "temperature": 0, "guidance_scale": 1.5, "stop": [stop]}).json()
    assert r["choices"][0]["text"] == full[: full.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"
    assert not _wait_idle(engine)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "guidance_scale": "big"}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": float("1e7")}, "guidance_scale"),
    ({"prompt": "x", "guidance_mix": 2}, "guidance_mix"),
    ({"prompt": "x", "max_new_tokens": -3}, "max_new_tokens"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, -5]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "max_tokens": 9000}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2000}, "max_tokens"),  # past this server's KV cache
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "seed": 1.5}, "seed"),
    ({"prompt": "x", "echo": True}, "echo"),
])
def test_bad_requests_get_openai_errors(server, body, param):
    import httpx

    r = httpx.post(server + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


def test_bad_bodies_and_chat_errors(server):
    import httpx

    assert httpx.post(server + "/v1/completions", content=b"{not json", timeout=30).status_code == 400
    assert httpx.post(server + "/v1/completions", json=[1, 2], timeout=30).status_code == 400
    for messages in (None, [], [{"content": "hi"}], [{"role": "user", "content": 5}],
                     [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]):
        r = httpx.post(server + "/v1/chat/completions", json={"messages": messages}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert httpx.post(server + "/v1/internal/encode", json={"txt": 1}, timeout=30).status_code == 400


def test_stopped_engine_answers_503(smollm2):
    from fastapi.testclient import TestClient

    from cfg_triton.server import create_app

    class Stopped:  # the interface create_app needs, of an engine whose thread has ended
        tokenizer, context_length, guided_logprobs = smollm2[1], 8192, True

        def running(self):
            return False

        async def stats(self):
            return {"steps": 0}

        def check_fits(self, *args):
            pass

    client = TestClient(create_app(Stopped(), "m"))
    assert client.get("/health").status_code == 503
    for stream in (False, True):
        r = client.post("/v1/completions", json={"prompt": "x", "stream": stream})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    assert client.post("/v1/internal/decode", json={"tokens": [-1]}).status_code == 400
    # An engine that cannot report the guided distribution (vLLM) refuses logprobs, before any work.
    Stopped.guided_logprobs = False
    for body in ({"prompt": "x", "logprobs": 2}, {"messages": [{"role": "user", "content": "x"}],
                                                   "logprobs": True}):
        r = client.post("/v1/chat/completions" if "messages" in body else "/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def test_load_sixteen_streams_then_cancel_half(smollm2, server, engine):
    """16 concurrent guided streams each equal their solo run; then 16 more of which 8 hang up
    mid-stream: the other 8 still complete exactly, and the cache is empty afterwards."""
    import httpx

    model, tok = smollm2
    prompts = [f"{w} is a word that" for w in ("Ocean", "Mountain", "River", "Forest", "Desert", "City",
                                             "Garden", "Winter", "Summer", "Music", "Light", "Stone",
                                             "Cloud", "Bridge", "Market", "Letter")]
    params = GuidanceParams(guidance_scale=1.5, max_new_tokens=12)
    expected = [tok.decode(reference(model, tok(p).input_ids, None, params), skip_special_tokens=True)
                for p in prompts]

    async def stream(client, prompt, hang_up_after=None):
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "guidance_scale": 1.5, "stream": True}
        text, events = "", 0
        async with client.stream("POST", server + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                text += json.loads(line[6:])["choices"][0]["text"]
                events += 1
                if hang_up_after is not None and events >= hang_up_after:
                    return None
        return text

    async def run(hang_up):
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(stream(client, p, 3 if hang_up and i % 2 else None)
                                          for i, p in enumerate(prompts)))

    assert asyncio.run(run(False)) == expected
    texts = asyncio.run(run(True))
    assert texts[::2] == expected[::2] and texts[1::2] == [None] * 8
    assert not _wait_idle(engine)


def test_serve_command_answers_the_openai_client(tmp_path):
    """`cfg-triton serve` as a user starts it: a separate process, bundled model, openai client."""
    openai = pytest.importorskip("openai")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "-m", "cfg_triton.cli", "serve", "--port", str(port),
                             "--num-blocks", "32", "--page-size", "16"], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "log", "w"))
    try:
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.25)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        out = client.completions.create(model="smollm2", prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                        extra_body={"cfg_scale": 1.5})
        assert out.choices[0].text and out.usage.completion_tokens == 5
        family = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)  # what a service manager sends
        assert proc.wait(60) == 0, (tmp_path / "log").read_text()
        assert not [p for p in family if alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def descendants(pid) -> list[int]:
    """Every process below `pid` (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        tasks = os.listdir(f"/proc/{parent}/task") if os.path.isdir(f"/proc/{parent}/task") else []
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def alive(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_serve_command_engine_arguments(capsys):
    """`--vllm-arg` belongs to the vLLM engine; without vLLM installed `--engine vllm` says how to get it."""
    from cfg_triton import cli

    with pytest.raises(SystemExit):
        cli.main(["serve", "--vllm-arg", "dtype=float32"])
    assert "only with --engine vllm" in capsys.readouterr().err
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit):
            cli.main(["serve", "--engine", "vllm"])
        assert "scripts/install.sh --vllm" in capsys.readouterr().err


# ------------------------------------------------------------------ liveness under pressure

def _offloads(engine):
    """Counts the engine's offload passes that evicted active sequences (a list, appended to)."""
    offloader = engine._manager.batch_processor.offloading_manager
    offload, count = offloader.offload_requests, []
    offloader.offload_requests = lambda: count.append(len(offloader.scheduler.starved_requests)) or offload()
    return count


async def _run_cut(engine, prompt_ids, negative_ids, params, after):
    """Runs a request and closes it after `after` tokens, as a stop string or a client hang-up does."""
    out = None
    async for out in engine.generate(prompt_ids, negative_ids, params):
        if len(out.token_ids) >= after:
            break
    return out


def test_cancellation_beside_a_pair_that_does_not_fit(smollm2, requests):
    """8 pages for two pairs that need 12: the second waits for the first, which ends by
    cancellation (a stop string) rather than by finishing; the second then runs, exactly, and the
    engine takes new requests. Pairs are admitted by whole-life reservation: nothing is offloaded."""
    model, tok = smollm2
    eng = TransformersEngine(model, tok, page_size=16, num_blocks=8)
    try:
        offloads = _offloads(eng)
        prompt = requests[1][0]
        first = (prompt[:21], None, GuidanceParams(guidance_scale=1.5, max_new_tokens=40))  # 4 + 3 pages
        second = (prompt[:12], None, GuidanceParams(guidance_scale=1.5, max_new_tokens=30))  # 3 + 2 pages

        async def both():
            cut = asyncio.create_task(_run_cut(eng, *first, after=10))
            await asyncio.sleep(0)
            return await asyncio.wait_for(asyncio.gather(cut, _run(eng, [second])), 120)

        cut, (whole,) = asyncio.run(both())
        assert len(cut.token_ids) == 10 and whole.token_ids == reference(model, *second)
        third = (prompt[:5], None, GuidanceParams(guidance_scale=1.5, max_new_tokens=4))
        assert asyncio.run(asyncio.wait_for(_run(eng, [third]), 60))[0].token_ids == reference(model, *third)
        assert not offloads and not _wait_idle(eng) and eng.counters["degraded_tokens"] == 0
    finally:
        eng.stop()


def test_two_pairs_that_fit_only_one_at_a_time(smollm2, requests):
    """10 pages, 32 tokens a step: two guided requests of 8 pages each, sent at once, both end and
    both equal `generate` (the second is admitted when the first's pages are free)."""
    model, tok = smollm2
    eng = TransformersEngine(model, tok, page_size=16, num_blocks=10, max_batch_tokens=32, max_requests=2)
    try:
        prompt = requests[1][0][:21]
        params = GuidanceParams(guidance_scale=1.5, max_new_tokens=40)
        pair = [(prompt, prompt, params), (prompt, prompt[:20], params)]
        outs = asyncio.run(asyncio.wait_for(_run(eng, pair), 180))
        assert [o.token_ids for o in outs] == [reference(model, *r) for r in pair]
        assert not _wait_idle(eng)
    finally:
        eng.stop()


def test_admission_counts_whole_pages_per_branch(smollm2, engine):
    """A pair is two sequences, each rounded up to whole pages: branches of 65 and 63 tokens need
    5 + 4 pages, more than 8 pages of 16 tokens hold, although 128 tokens would."""
    model, tok = smollm2
    eng = TransformersEngine(model, tok, page_size=16, num_blocks=8)
    try:
        params = GuidanceParams(guidance_scale=1.5, max_new_tokens=33)
        with pytest.raises(ValueError, match="needs 9 KV-cache pages"):
            eng.check_fits([1] * 32, [2] * 30, params)
        eng.check_fits([1] * 31, [2] * 30, params)  # 64 + 63 tokens: 4 + 4 pages
    finally:
        eng.stop()


@pytest.mark.parametrize("limits", [dict(max_requests=1), dict(max_batch_tokens=1), dict(num_blocks=1)])
def test_configurations_that_cannot_run_a_pair_are_refused(smollm2, limits):
    model, tok = smollm2
    with pytest.raises(ValueError, match="at least 2"):
        TransformersEngine(model, tok, page_size=16, **{"num_blocks": 8, **limits})


def test_non_streamed_request_ends_when_its_client_goes(server, engine):
    """A client that hangs up on a non-streamed request frees the engine long before max_tokens."""
    body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0,
                       "guidance_scale": 1.5}).encode()
    host, port = server.removeprefix("http://").split(":")
    before = engine.counters["guided_tokens"]
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while engine.counters["guided_tokens"] - before < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert not _wait_idle(engine, 10)
    assert engine.counters["guided_tokens"] - before < 100


def test_text_stream_long_stop_strings_cost_the_text_only():
    """Stop strings of 400,000 characters: 300 updates take milliseconds, not the event loop."""
    from cfg_triton.server import TextStream

    class Chars:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    stream = TextStream(Chars(), ["a" * 400_000 + "b", "ab" * 200_000])
    start = time.monotonic()
    for n in range(1, 301):
        assert stream.update([ord("a")] * n) == ""  # all of it may still become a stop string
    assert time.monotonic() - start < 2.0
    assert stream.update([ord("a")] * 300 + [ord("c")]) == "a" * 300 + "c" and not stream.stopped


def test_text_stream_replacement_character_stop():
    """A stop string U+FFFD matches a real U+FFFD, not a character whose bytes are still arriving."""
    from cfg_triton.server import TextStream

    class Chars:  # 0xFFFD stands for an incomplete character until the update is final
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    stream = TextStream(Chars(), ["\ufffd"])
    assert stream.update([ord("a"), 0xFFFD]) == "a" and not stream.stopped
    assert stream.update([ord("a"), ord("é")]) == "é" and not stream.stopped
    stream = TextStream(Chars(), ["\ufffd"])
    assert stream.update([ord("a"), 0xFFFD], final=True) == "a" and stream.stopped


def test_token_bytes_join_into_the_text(smollm2):
    """Byte-level BPE pieces of an emoji are not characters; their bytes still join into the text."""
    from cfg_triton.server import token_bytes

    _, tok = smollm2
    bytes_of = token_bytes(tok)
    text = "Hi 😀 there ü, 你好!"
    ids = tok(text, add_special_tokens=False).input_ids
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # single tokens decode to U+FFFD
    assert b"".join(bytes_of(t) for t in ids) == text.encode()


def test_numbers_beyond_float_range_and_lone_surrogates_answer_400(server):
    """... and the keep-alive connection serves the next request."""
    import httpx

    bodies = [b'{"prompt": "x", "guidance_scale": 1' + b"0" * 400 + b"}",
              b'{"prompt": "x", "temperature": ' + b"1" * 5000 + b"}",
              b'{"prompt": "x", "top_p": -1' + b"0" * 400 + b"}",
              json.dumps({"prompt": "\ud800"}).encode(),
              json.dumps({"prompt": "x", "negative_prompt": "\udfff", "guidance_scale": 1.5}).encode(),
              json.dumps({"prompt": "x", "stop": ["\ud800"]}).encode()]
    with httpx.Client(timeout=30) as client:
        for body in bodies:
            r = client.post(server + "/v1/completions", content=body,
                            headers={"content-type": "application/json"})
            assert r.status_code == 400, (body[:60], r.text)
            assert r.json()["error"]["type"] == "invalid_request_error"
        r = client.post(server + "/v1/internal/encode", content=json.dumps({"text": "\ud800"}))
        assert r.status_code == 400
        assert client.get(server + "/health").status_code == 200
        assert client.post(server + "/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_logprobs_bytes_and_streamed_offsets(server):
    """Chat logprobs' bytes join into the reply; streamed completions' text_offset continue from
    chunk to chunk and equal the whole response's."""
    import httpx

    messages = [{"role": "user", "content": "Write three emojis about the sea, nothing else."}]
    r = httpx.post(server + "/v1/chat/completions", timeout=60, json={
        "messages": messages, "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 2,
        "guidance_scale": 1.5}).json()
    content = r["choices"][0]["logprobs"]["content"]
    for entry in content:  # a distribution over the vocabulary: its top entries hold at most all of it
        assert sum(math.exp(t["logprob"]) for t in entry["top_logprobs"]) <= 1 + 1e-5
        assert entry["logprob"] == pytest.approx(max(t["logprob"] for t in entry["top_logprobs"]))
    assert bytes(b for entry in content for b in entry["bytes"]).decode() == r["choices"][0]["message"]["content"]
    body = {"prompt": PROMPTS[2], "max_tokens": 10, "temperature": 0, "logprobs": 1, "guidance_scale": 1.5}
    whole = httpx.post(server + "/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    offsets = []
    with httpx.stream("POST", server + "/v1/completions", json={**body, "stream": True}, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                lp = json.loads(line[6:])["choices"][0]["logprobs"]
                offsets += lp["text_offset"] if lp else []
    assert offsets == whole["text_offset"] and offsets[-1] > 0
