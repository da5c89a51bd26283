"""What a serving engine provides to the HTTP front end (`cfg_triton.server`), in one place.

Two engines implement it: `continuous.TransformersEngine` (transformers' continuous batching) and
`vllm.VllmEngine`. Each depends on this module only, never on the front end.

The liveness contract every engine keeps (docs/serve.md): a request accepted by `check_fits` ends,
with its tokens or with an error, within a bounded number of engine steps whatever else is queued,
cancelled or out of cache; a configuration that could never run a guided request is refused when
the engine is built.
"""
from __future__ import annotations

import dataclasses
from typing import AsyncIterator, Protocol

from .params import GuidanceParams


class EngineUnavailable(RuntimeError):
    """Raised by an engine's `generate` when it cannot run requests (stopped, or a fatal error)."""


@dataclasses.dataclass
class Output:
    """What a request has produced so far (an engine's `generate` yields one per new token):
    every generated token, and when finished, why.

    `logprobs` (when asked for) has one (guided log-probability, [(token, logprob)] of the top
    alternatives) per token of `token_ids`.
    """

    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" (an EOS token) or "length"
    error: str | None = None
    logprobs: list | None = None


def branches(prompt_ids, negative_ids, params: GuidanceParams) -> list[list[int]]:
    """The token ids of a request's engine sequences: the prompt, and when guided the negative
    prompt (None: the prompt's last token, as transformers and text-generation-webui do)."""
    if not params.guided:
        return [list(prompt_ids)]
    return [list(prompt_ids), list(negative_ids if negative_ids is not None else prompt_ids[-1:])]


class Engine(Protocol):
    """The interface `server.create_app` serves."""

    tokenizer: object           # a transformers tokenizer (encode, decode, chat template)
    context_length: int | None  # the longest sequence the model takes (None: unknown)
    guided_logprobs: bool       # whether `generate` can report the guided distribution's logprobs

    def running(self) -> bool:
        """False once the engine has stopped (the front end answers 503)."""

    async def stats(self) -> dict:
        """Counters for `/health` (JSON-serializable)."""

    def check_fits(self, prompt_ids: list[int], negative_ids: list[int] | None,
                   params: GuidanceParams) -> None:
        """Raises ValueError when the engine could never run this request (even alone)."""

    def generate(self, prompt_ids: list[int], negative_ids: list[int] | None, params: GuidanceParams,
                 *, logprobs: int | None = None) -> AsyncIterator[Output]:
        """Runs one request: an `Output` per new token, the last with `finished` set. Closing the
        iterator early (a client gone, a stop string) cancels every sequence of the request and
        frees its cache. Raises `EngineUnavailable` when the engine cannot run it."""

    def stop(self) -> None:
        """Stops the engine and every process it started."""
