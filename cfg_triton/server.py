"""`cfg-triton serve`: an OpenAI-compatible HTTP front end for CFG requests (FastAPI + uvicorn).

Endpoints: `POST /v1/completions` and `POST /v1/chat/completions` (with `stream: true` as
server-sent events), `GET /v1/models`, `GET /health`, and the text-generation-webui extras that
SillyTavern calls (`GET /v1/internal/model/info`, `POST /v1/internal/encode`, `.../decode`,
`.../token-count`). Request bodies are read as plain JSON: unknown fields are ignored (clients send
dozens of sampler fields), known ones are type- and range-checked, and every bad request gets a 400
in OpenAI's error shape. The engine behind it (`continuous.TransformersEngine`,
`vllm.VllmEngine`) implements `engine.Engine`; this module knows nothing else of it.
"""

import asyncio
import json
import logging
import time
import uuid
from functools import lru_cache

from .engine import EngineUnavailable
from .params import GuidanceParams, ParamError

log = logging.getLogger("cfg_triton.serve")

# Fields read from a request; everything else is ignored. Sampler fields a client may send that
# this server does not apply are logged once per request when set to a non-neutral value.
_IGNORED_SAMPLERS = {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
                     "typical_p": 1.0, "tfs": 1.0, "top_a": 0.0, "mirostat_mode": 0,
                     "no_repeat_ngram_size": 0, "penalty_alpha": 0.0, "num_beams": 1,
                     "encoder_repetition_penalty": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 256}
MAX_LOGPROBS = 20


class BadRequest(Exception):
    """A 4xx answer in OpenAI's error shape."""

    def __init__(self, message, param=None, status=400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status

    def body(self):
        return {"error": {"message": self.message, "type": "invalid_request_error",
                          "param": self.param, "code": None}}


def _get(body, name, kinds, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:
        raise BadRequest(f"{name} must be {' or '.join(k.__name__ for k in kinds)}, got a boolean", name)
    if not isinstance(value, kinds):
        raise BadRequest(f"{name} must be {' or '.join(k.__name__ for k in kinds)}, got "
                         f"{type(value).__name__}", name)
    return value


def _number(body, name, default=None):
    return _get(body, name, (int, float), default)  # range and finiteness: GuidanceParams


def _check_strings(value, param=None):
    """Raises BadRequest for a string that is not valid Unicode text (a lone surrogate such as
    "\\ud800", which JSON allows): tokenizers and UTF-8 encoders cannot take it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("text must be valid Unicode (it holds a lone surrogate)", param) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key, param)
            _check_strings(item, param or key)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item, param)


def _stop_strings(body):
    stops = []
    for name in ("stop", "stopping_strings"):
        value = body.get(name)
        if value is None:
            continue
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise BadRequest(f"{name} must be a string or a list of strings", name)
        stops += [v for v in values if v and v not in stops]
    return stops


class ParsedRequest:
    """A checked completion or chat request: token ids of both branches and everything else."""

    def __init__(self, body: dict, kind: str, engine):
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        self.kind = kind
        tokenizer = engine.tokenizer
        if kind == "chat":
            self.prompt_ids = _chat_ids(tokenizer, body.get("messages"))
        else:
            self.prompt_ids = _prompt_ids(tokenizer, body.get("prompt"))
        n = _get(body, "n", (int,), 1)
        if n != 1:
            raise BadRequest("n must be 1: one completion per request (send several requests)", "n")
        if body.get("echo"):
            raise BadRequest("echo is not supported", "echo")
        if body.get("best_of") not in (None, 1):
            raise BadRequest("best_of must be 1", "best_of")
        self.stream = bool(_get(body, "stream", (bool,), False))
        self.stops = _stop_strings(body)
        self.logprobs = _logprobs(body, kind)
        if self.logprobs is not None and not engine.guided_logprobs:
            raise BadRequest("logprobs are not available with this server's engine (it cannot "
                             "report the guided distribution)", "logprobs")

        negative = _get(body, "negative_prompt", (str,), "")
        scale = _number(body, "guidance_scale", _number(body, "cfg_scale", 1.0))
        mix = _number(body, "guidance_mix")
        self.negative_ids = None
        if negative.strip():  # a raw string, not templated, as text-generation-webui does
            self.negative_ids = tokenizer(negative, add_special_tokens=False).input_ids or None

        temperature = _number(body, "temperature", 1.0)
        if body.get("do_sample") is False:  # text-generation-webui's greedy switch
            temperature = 0.0
        top_k = _get(body, "top_k", (int,))
        top_p = _number(body, "top_p")
        seed = _get(body, "seed", (int,))
        max_tokens = None
        for name in ("max_tokens", "max_completion_tokens", "max_new_tokens"):  # the first given
            max_tokens = _get(body, name, (int,))
            if max_tokens is not None:
                if max_tokens < 1:
                    raise BadRequest(f"{name} must be >= 1, got {max_tokens}", name)
                break
        prompt_len = len(self.prompt_ids)
        context = engine.context_length
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_TOKENS[kind]
            if context:
                max_tokens = max(1, min(max_tokens, context - prompt_len))
        try:
            self.params = GuidanceParams(
                guidance_scale=scale, mix=mix, temperature=temperature,
                top_k=None if top_k is None or top_k < 0 else top_k, top_p=top_p,
                min_p=_number(body, "min_p"), seed=None if seed is None or seed < 0 else seed,
                max_new_tokens=max_tokens)
        except ParamError as e:  # named as the request names it
            field = {"mix": "guidance_mix", "max_new_tokens": "max_tokens"}.get(e.param, e.param)
            raise BadRequest(str(e).replace(e.param, field, 1), field) from None
        if not self.params.guided:  # γ = 1 without a mix: one sequence, the negative prompt unused
            self.negative_ids = None
        longest = max(prompt_len, len(self.negative_ids or []))
        if context and longest + max_tokens > context:
            raise BadRequest(f"the prompt ({longest} tokens) plus max_tokens ({max_tokens}) exceeds "
                             f"the model's context of {context} tokens", "max_tokens")
        try:
            engine.check_fits(self.prompt_ids, self.negative_ids, self.params)
        except ValueError as e:
            raise BadRequest(str(e), "max_tokens") from None
        ignored = {k: body[k] for k, neutral in _IGNORED_SAMPLERS.items()
                   if isinstance(body.get(k), (int, float)) and body[k] != neutral}
        if ignored:
            log.info("request sets samplers this server does not apply: %s", ignored)


def _prompt_ids(tokenizer, prompt):
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("prompt must not be empty", "prompt")
        ids = tokenizer(prompt).input_ids
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                     for t in prompt):
        ids = prompt
        if not all(0 <= t < len(tokenizer) for t in ids):
            raise BadRequest(f"prompt token ids must be in [0, {len(tokenizer)})", "prompt")
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise BadRequest("one prompt per request (send several requests)", "prompt")
    else:
        raise BadRequest("prompt must be a non-empty string or a list of token ids", "prompt")
    if not ids:
        raise BadRequest("prompt has no tokens", "prompt")
    return list(ids)


def _chat_ids(tokenizer, messages):
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    plain = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest("each message must be an object with a role", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones, joined
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest("only text content parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest("message content must be a string", "messages")
        plain.append({"role": m["role"], "content": content})
    if getattr(tokenizer, "chat_template", None) is None:
        raise BadRequest("this model has no chat template: use /v1/completions", "messages")
    try:
        ids = tokenizer.apply_chat_template(plain, add_generation_prompt=True, return_dict=True)["input_ids"]
    except Exception as e:  # a template that rejects the roles or their order
        raise BadRequest(f"the chat template rejected the messages: {e}", "messages") from None
    return list(ids)


def _logprobs(body, kind):
    if kind == "chat":
        if not _get(body, "logprobs", (bool,), False):
            return None
        count = _get(body, "top_logprobs", (int,), 0)
    else:
        count = _get(body, "logprobs", (int,))
        if count is None:
            return None
    if not 0 <= count <= MAX_LOGPROBS:
        raise BadRequest(f"logprobs must be in [0, {MAX_LOGPROBS}], got {count}",
                         "top_logprobs" if kind == "chat" else "logprobs")
    return count


class _StopMatcher:
    """Knuth-Morris-Pratt matching of one stop string against text fed a character at a time.

    `state` is the length of the longest prefix of the stop string that ends the text fed so far.
    The prefix function is extended only as far as `state` reaches, so a stop string of any length
    costs work in proportion to the text fed, never to its own length.
    """

    def __init__(self, stop: str):
        self.stop, self.prefix, self.state = stop, [0], 0

    def _fail(self, k):  # the prefix function at k - 1, computed on demand
        stop, prefix = self.stop, self.prefix
        while len(prefix) < k:
            i, j = len(prefix), prefix[-1]
            while j and stop[i] != stop[j]:
                j = prefix[j - 1]
            prefix.append(j + (stop[i] == stop[j]))
        return prefix[k - 1]

    def feed(self, char) -> bool:
        """Advances by one character; True when the stop string ends here."""
        k, stop = self.state, self.stop
        if k == len(stop):
            k = self._fail(k)
        while k and stop[k] != char:
            k = self._fail(k)
        if stop[k] == char:
            k += 1
        self.state = k
        return k == len(stop)


class TextStream:
    """Detokenizes a growing token list into text deltas, holding back what may still change: an
    incomplete character, or a tail that may grow into a stop string. `stopped` once one appears.

    Each update costs time in proportion to the new text, whatever the length of the stop strings.
    """

    def __init__(self, tokenizer, stops):
        self.tokenizer, self.stops = tokenizer, stops
        self.sent, self.stopped = "", False
        self._reset("")

    def _reset(self, text):
        self.fed, self.cut = "", None  # text fed to the matchers; where the first stop begins
        self.matchers = [_StopMatcher(s) for s in self.stops]
        self._feed(text)

    def _feed(self, text):
        for char in text:
            self.fed += char
            ended = [len(m.stop) for m in self.matchers if m.feed(char)]
            if ended:  # the longest of the stops that end here begins first
                self.cut = len(self.fed) - max(ended)
                return

    def update(self, token_ids, final=False) -> str:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if not final:  # an incomplete character decodes to U+FFFD until its last byte arrives
            text = text.rstrip("\ufffd")
        if self.cut is None:
            if text.startswith(self.fed):
                self._feed(text[len(self.fed):])
            else:  # decoding changed earlier text (rare): match the whole text again
                self._reset(text)
        if self.cut is not None:
            text, self.stopped, final = text[: self.cut], True, True
        if not final:
            hold = max((m.state for m in self.matchers), default=0)
            text = text[: len(text) - hold]
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta


@lru_cache(maxsize=8)
def _byte_decoder() -> dict:
    """The inverse of byte-level BPE's byte-to-character table (GPT-2's): printable bytes stand
    for themselves, the others for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def token_bytes(tokenizer):
    """A function `token id -> bytes`: the UTF-8 bytes a token contributes to the text, such that
    a reply's tokens' bytes joined are the reply's text (what OpenAI's logprobs `bytes` carry).
    Decoding one token alone cannot give them: a token holding part of a character decodes to
    U+FFFD. Byte-level BPE (GPT-2, SmolLM2) and byte-fallback SentencePiece (Llama, Gemma)
    tokenizers are read from their vocabulary; others fall back to the decoded text."""
    try:
        decoder = json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder"))
    except (AttributeError, ValueError):
        decoder = ""
    special = set(getattr(tokenizer, "all_special_ids", []))
    decode = lambda t: tokenizer.decode([t]).encode()  # noqa: E731
    if '"ByteLevel"' in decoder:
        table = _byte_decoder()

        def byte_level(t):
            piece = tokenizer.convert_ids_to_tokens(t)
            if t in special or piece is None or any(c not in table for c in piece):
                return decode(t)
            return bytes(table[c] for c in piece)
        return byte_level
    if '"ByteFallback"' in decoder:
        def byte_fallback(t):
            piece = tokenizer.convert_ids_to_tokens(t)
            if t in special or piece is None:
                return decode(t)
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
            return piece.replace("\u2581", " ").encode()
        return byte_fallback
    return decode


def create_app(engine, model_name: str):
    """The FastAPI application serving `engine` under the model id `model_name`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="cfg-triton", docs_url=None, redoc_url=None)
    tokenizer = engine.tokenizer
    bytes_of = token_bytes(tokenizer)

    @app.exception_handler(BadRequest)
    async def bad_request(_, e: BadRequest):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def internal(_, e: Exception):
        log.exception("request failed")
        return JSONResponse({"error": {"message": f"internal error: {type(e).__name__}",
                                       "type": "server_error", "param": None, "code": None}},
                            status_code=500)

    async def json_body(request: Request):
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError as e:  # JSONDecodeError, bad UTF-8, an integer of over 4,300 digits
            raise BadRequest(f"the request body is not valid JSON: {e}") from None
        _check_strings(body)
        return body

    @app.get("/health")
    async def health():
        """200 while the engine runs (503 once it has stopped), with its counters."""
        running = engine.running()
        return JSONResponse({"status": "ok" if running else "engine stopped", **await engine.stats()},
                            status_code=200 if running else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "cfg-triton"}]}

    @app.get("/v1/internal/model/info")
    async def model_info():
        return {"model_name": model_name, "lora_names": []}

    def text_field(body):
        text = body.get("text") if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise BadRequest("text must be a string", "text")
        return text

    @app.post("/v1/internal/encode")
    async def encode(request: Request):
        tokens = tokenizer(text_field(await json_body(request))).input_ids
        return {"tokens": tokens, "length": len(tokens)}

    @app.post("/v1/internal/token-count")
    async def token_count(request: Request):
        return {"length": len(tokenizer(text_field(await json_body(request))).input_ids)}

    @app.post("/v1/internal/decode")
    async def decode(request: Request):
        body = await json_body(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                   and 0 <= t < len(tokenizer) for t in tokens):
            raise BadRequest(f"tokens must be a list of token ids in [0, {len(tokenizer)})", "tokens")
        return {"text": tokenizer.decode(tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _respond(ParsedRequest(await json_body(request), "completion", engine), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _respond(ParsedRequest(await json_body(request), "chat", engine), request)

    def server_error(message, status=500, code=None):
        return JSONResponse({"error": {"message": message, "type": "server_error", "param": None,
                                       "code": code}}, status_code=status)

    async def _respond(parsed: ParsedRequest, request: Request):
        if not engine.running():  # before a stream opens: its status can still say so
            return server_error("the engine is not running", 503, "engine_unavailable")
        shape = _Shape(parsed, model_name, tokenizer, bytes_of)
        outputs = engine.generate(parsed.prompt_ids, parsed.negative_ids, parsed.params,
                                  logprobs=parsed.logprobs)
        if not parsed.stream:
            text = TextStream(tokenizer, parsed.stops)
            final = None
            try:
                async with _closing(outputs):
                    async for final in _until_disconnected(request, outputs):
                        text.update(final.token_ids, final.finished)
                        if text.stopped:
                            break
            except EngineUnavailable as e:  # stopped since the check above
                return server_error(str(e), 503, "engine_unavailable")
            if final is not None and final.error is not None:
                return server_error(f"generation failed: {final.error}")
            return shape.whole(text.sent, final, text.stopped)

        async def events():
            text = TextStream(tokenizer, parsed.stops)
            async with _closing(outputs):
                yield shape.sse(shape.first())
                async for out in outputs:
                    delta = text.update(out.token_ids, out.finished)
                    if await request.is_disconnected():
                        return  # closing `outputs` cancels both branches
                    done = out.finished or text.stopped
                    if out.error is not None:
                        yield shape.sse({"error": {"message": out.error, "type": "server_error"}})
                        return
                    if delta or done:
                        yield shape.sse(shape.chunk(delta, out, done, text.stopped))
                    if done:
                        break
                yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return app


async def _until_disconnected(request, outputs):
    """Yields `outputs` until they end or the client goes (a non-streamed request has no stream
    to notice that: its client is watched beside the engine's next output). The caller closes
    `outputs`, which cancels the request's sequences."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while True:
            step = asyncio.ensure_future(outputs.__anext__())
            await asyncio.wait({step, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
                return
            try:
                yield step.result()
            except StopAsyncIteration:
                return
    finally:
        gone.cancel()


async def _disconnected(request):
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _closing:
    """`async with`: closes an async generator on exit (the engine then cancels its request)."""

    def __init__(self, generator):
        self.generator = generator

    async def __aenter__(self):
        return self.generator

    async def __aexit__(self, *exc):
        await self.generator.aclose()


class _Shape:
    """OpenAI's response objects for one request (completion or chat, whole or streamed)."""

    def __init__(self, parsed, model_name, tokenizer, bytes_of):
        self.parsed, self.model, self.tokenizer, self.bytes_of = parsed, model_name, tokenizer, bytes_of
        self.text_offset = 0  # characters of the text before the next token (streamed logprobs)
        chat = parsed.kind == "chat"
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.logprobs_sent = 0

    def _head(self, chunk=False):
        kind = self.object + (".chunk" if chunk and self.parsed.kind == "chat" else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def sse(self, payload):
        return f"data: {json.dumps(payload)}\n\n"

    def _usage(self, out):
        prompt = len(self.parsed.prompt_ids)
        done = len(out.token_ids) if out is not None else 0
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def _reason(self, out, stopped):
        if stopped:
            return "stop"
        if out is not None and out.error is not None:
            return "error"
        return out.finish_reason if out is not None else None

    def _logprobs(self, out, start=0):
        """Log-probabilities of tokens `start:` of `out` in the request's format (or None)."""
        if self.parsed.logprobs is None or out is None or out.logprobs is None:
            return None
        piece = lambda t: self.tokenizer.decode([t])  # noqa: E731
        entries = list(zip(out.token_ids[start:], out.logprobs[start:]))
        if self.parsed.kind == "chat":
            return {"content": [{"token": piece(t), "logprob": lp, "bytes": list(self.bytes_of(t)),
                                 "top_logprobs": [{"token": piece(a), "logprob": alp,
                                                   "bytes": list(self.bytes_of(a))} for a, alp in top]}
                                for t, (lp, top) in entries]}
        offsets, at = [], self.text_offset  # a stream's chunks continue where the last one ended
        for t, _ in entries:
            offsets.append(at)
            at += len(piece(t))
        self.text_offset = at
        return {"tokens": [piece(t) for t, _ in entries], "token_logprobs": [lp for _, (lp, _) in entries],
                "top_logprobs": [{piece(a): alp for a, alp in top} for _, (_, top) in entries],
                "text_offset": offsets}

    def whole(self, text, out, stopped):
        choice = {"index": 0, "logprobs": self._logprobs(out),
                  "finish_reason": self._reason(out, stopped)}
        if self.parsed.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._head(), "choices": [choice], "usage": self._usage(out)}

    def first(self):
        """The opening event: chat announces the role; a completion opens with empty text."""
        if self.parsed.kind == "chat":
            delta = {"role": "assistant", "content": ""}
            return {**self._head(True), "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                     "finish_reason": None}]}
        return {**self._head(True), "choices": [{"index": 0, "text": "", "logprobs": None,
                                                 "finish_reason": None}]}

    def chunk(self, delta, out, done, stopped):
        logprobs = self._logprobs(out, self.logprobs_sent)
        self.logprobs_sent = len(out.token_ids)
        reason = self._reason(out, stopped) if done else None
        if self.parsed.kind == "chat":
            choice = {"index": 0, "delta": {"content": delta} if delta else {}, "logprobs": logprobs,
                      "finish_reason": reason}
        else:
            choice = {"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": reason}
        event = {**self._head(True), "choices": [choice]}
        if done:
            event["usage"] = self._usage(out)
        return event
