"""CFG on transformers' continuous-batching engine: a guided request is a pair of engine sequences.

The engine (`transformers.generation.continuous_batching`: paged KV cache, scheduler, chunked
prefill) runs the model; this module adds the two things CFG needs from it:

* `PairScheduler`: schedules the conditional and unconditional sequences of a request all or
  nothing. A pair's prefill may be chunked, but neither member's last prefill chunk runs without
  the other's, so both produce logits in the same step, every step; a member whose partner is not
  schedulable (still queued, offloaded, out of cache) waits with it.
* `_fused_sample`, installed as the engine's sampling step: one `cfg_triton.sample` call over the
  batch's rows with each request's own γ, α, temperature, top-k, top-p, min-p and seed; the
  unconditional row is given its conditional row's token. Unguided requests are single sequences
  and sample through the same call (γ = 1 on their own row).

Tested with transformers 5.24 only (the `serve` extra pins it): the engine's scheduler and
sampling step are not public API. Every private name this module touches is in `_HOOKS`; a
transformers release that moves one fails `check_engine()` at start, not a request.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import threading
from typing import AsyncIterator

import torch

from .ops import guidance
from .params import GuidanceParams, sample_requests
from .engine import EngineUnavailable, Output, branches

TESTED_TRANSFORMERS = "5.24"
log = logging.getLogger("cfg_triton.serve")


# The engine's private surface, in one place. Names `check_engine()` can verify on the classes:
_HOOKS = (
    ("scheduler", "SCHEDULER_MAPPING"),                    # registers PairScheduler by name
    ("scheduler", "FIFOScheduler._process_candidates"),    # overridden: pairs all or nothing
    ("scheduler", "Scheduler._infer_request_tokens"),
    ("scheduler", "Scheduler._schedule_request"),
    ("scheduler", "Scheduler._try_to_meet_safety_margin"),
    ("model_runner", "ModelRunner._sample"),               # replaced per instance: the fused draw
    ("scheduler", "Scheduler.clear_cancelled_requests"),   # extended: a cancellation unblocks
    ("cache", "PagedAttentionCache.can_store_request_tokens"),
    ("continuous_api", "ContinuousBatchingManager._create_batch_processor"),
    ("requests", "RequestState._true_initial_tokens"),     # a soft reset moves outputs into the prompt
)
# ... and instance attributes, exercised by every request of tests/test_serve.py: the manager's
# `batch_processor` and `output_router` (its `result_handlers` and `_lock`: per-request delivery to
# asyncio queues), the processor's `scheduler`, `model_runner`, `cache` and
# `inputs_and_outputs.requests_in_batch` (the rows of a step), the cache's `num_sectors` and
# `cache_allocators` (their `needs_new_blocks` and `block_table`).


def check_engine():
    """Raises ImportError when transformers lacks a continuous-batching hook this module uses."""
    import importlib

    import transformers

    missing = []
    for module, path in _HOOKS:
        owner = importlib.import_module(f"transformers.generation.continuous_batching.{module}")
        *classes, name = path.split(".")
        for cls in classes:
            owner = getattr(owner, cls, None)
        if owner is None or not (hasattr(owner, name) or name in getattr(owner, "__dataclass_fields__", {})):
            missing.append(f"{module}.{path}")
    if missing:
        raise ImportError(f"transformers {transformers.__version__} lacks the continuous-batching "
                          f"hooks {', '.join(missing)}; cfg-triton serve is tested with "
                          f"transformers {TESTED_TRANSFORMERS}.* (pip install -e .[serve])")


@dataclasses.dataclass
class Request:
    """One front-end request and its engine sequences (`uncond_id` None when unguided).

    `logprobs`: how many top alternatives to report per token (None: no log-probabilities);
    `token_logprobs` gets, per generated token, (its guided log-probability, [(token, logprob)]
    of the `logprobs` best tokens), written by the engine thread before the token is delivered.
    """

    params: GuidanceParams
    seed: int
    cond_id: str  # also the request's id
    uncond_id: str | None
    logprobs: int | None = None
    token_logprobs: list = dataclasses.field(default_factory=list)


def _output_length(state) -> int:
    """Tokens a sequence has generated, also after a soft reset moved some into its prompt."""
    moved = len(state.initial_tokens) - state._true_initial_tokens if state._true_initial_tokens else 0
    return moved + len(state.generated_tokens)


def _pair_chunks(lengths, budget):
    """Query lengths for one step of a unit (one sequence or a pair) with `lengths` tokens left
    before its next logits, within `budget` tokens; None when it cannot advance.

    A pair either completes both members (both then yield logits in this step) or advances each
    by at most its length - 1, so that neither yields logits without the other.
    """
    if len(lengths) == 1:
        return [min(lengths[0], budget)] if budget > 0 else None
    if sum(lengths) <= budget:
        return list(lengths)
    chunks = []
    for length in lengths:
        take = max(0, min(length - 1, budget))
        chunks.append(take)
        budget -= take
    return chunks if any(chunks) else None


def _pages(cache, length) -> int:
    """KV-cache pages a sequence of `length` tokens holds at most, summed over the cache's allocators
    (one per attention type; a sliding-window allocator holds at most its window)."""
    return sum(allocator.needs_new_blocks("", 0, length) for allocator in cache.cache_allocators.values())


def _capacity(cache) -> int:
    """The pages the cache can hand out: one per sector. A sector holds one page of one allocator
    or several; an allocator's sectors each hold at least one of its used pages (fully free
    sectors go back to the pool before every step), so pages in use bound sectors in use."""
    return cache.num_sectors


def _scheduler_class():
    from transformers.generation.continuous_batching.requests import FutureRequestState, RequestStatus
    from transformers.generation.continuous_batching.scheduler import FIFOScheduler

    class PairScheduler(FIFOScheduler):
        """FIFO scheduling in units: an unguided request alone, a guided one with its partner.

        Admission reserves a unit's whole life in the cache: every member's prompt plus
        `max_new_tokens`, in pages. A unit is admitted (its members become active) only when
        its reservation fits beside those of the units already admitted, and in arrival order:
        a unit that does not fit holds back the units behind it. An admitted unit therefore
        never runs out of cache, is never offloaded, and ends within its own token count of
        steps once the units before it have; nothing waits forever.

        `partners` (set by the engine) maps each member's request id to its partner's.
        """

        partners: dict = {}

        def _units(self, candidates):
            seen = set()
            for state in candidates:
                if state.request_id in seen:
                    continue
                seen.add(state.request_id)
                partner_id = self.partners.get(state.request_id)
                if partner_id is None:
                    yield [state]
                    continue
                seen.add(partner_id)
                # Look the partner up wherever it is: queued or active.
                partner = self.active_requests.get(partner_id) or self.waiting_requests.get(partner_id)
                if partner is not None:  # else: not arrived yet, or being cancelled
                    yield [state, partner]

        def unit_pages(self, unit) -> int:
            """Pages `unit` (its members' states) reserves: each member's prompt plus its
            `max_new_tokens`, rounded up to whole pages per member."""
            return sum(_pages(self.cache, len(s.initial_tokens) + (s.max_new_tokens or 0)) for s in unit)

        def reserved_pages(self) -> int:
            """Pages reserved by the admitted units: their active members and the partners of
            those still queued."""
            members = dict(self.active_requests)
            for rid in self.active_requests:
                partner = self.partners.get(rid)
                if partner in self.waiting_requests:
                    members[partner] = self.waiting_requests[partner]
            return self.unit_pages(members.values())

        def clear_cancelled_requests(self):
            cancelled = super().clear_cancelled_requests()
            if cancelled:  # a request that ends by cancellation frees its pages as one that finishes
                self.block_new_requests = False
            return cancelled

        def _process_candidates(self, candidates, token_budget, cache_budget, remove_from_waiting):
            scheduled, allocation_failed = [], False
            self.starved_requests = []
            fast_path = self.cache.max_blocks_per_request > 0
            start_tokens, start_cache = token_budget, cache_budget
            requests_left = self.max_requests_per_batch
            in_margin = self._try_to_meet_safety_margin()
            free_pages = _capacity(self.cache) - self.reserved_pages()
            admitting = True  # FIFO admission: the first unit that does not fit stops the rest
            for unit in self._units(candidates):
                admitted = any(s.request_id in self.active_requests for s in unit)
                if not admitted:
                    if not admitting:
                        continue
                    pages = self.unit_pages(unit)
                    if pages > free_pages:
                        admitting = False
                        continue
                if len(unit) > requests_left:
                    continue
                if not in_margin and scheduled and any(s.status != RequestStatus.DECODING for s in unit):
                    break
                tokens = [self._infer_request_tokens(s, remove_from_waiting) for s in unit]
                if not admitted:
                    free_pages -= pages  # reserved from here on, even if it runs nothing this step
                chunks = _pair_chunks([len(t) for t in tokens], token_budget)
                if chunks is None:
                    continue
                reads = []
                for state, n in zip(unit, chunks):
                    read = state.current_len()
                    if self.cache.read_cache_limit is not None:
                        read = min(read, self.cache.read_cache_limit)
                    eligible = n == 1 and state.position_offset < self.cache.max_decode_fast_path_length
                    reads.append(0 if (fast_path and eligible) or n == 0 else read)
                if sum(reads) > cache_budget:
                    continue
                # All or nothing: a member whose blocks were allocated keeps them for its next turn.
                if not all(self.cache.can_store_request_tokens(s, n) for s, n in zip(unit, chunks) if n):
                    allocation_failed = True
                    self.starved_requests += [(s, n) for s, n in zip(unit, chunks)
                                              if n and s.request_id in self.active_requests]
                    continue
                for state, request_tokens, n in zip(unit, tokens, chunks):
                    if n == 0:
                        continue
                    self._schedule_request(state, request_tokens, n, remove_from_waiting)
                    n = len(state.tokens_to_process)
                    fast_path &= n == 1 and state.position_offset < self.cache.max_decode_fast_path_length
                    blocks = self.cache.count_new_complete_blocks(state, n)
                    scheduled.append(FutureRequestState(state, not state.remaining_prefill_tokens, blocks, n))
                    token_budget -= n
                    requests_left -= 1
                    if self.waiting_requests.pop(state.request_id, None) is not None:
                        remove_from_waiting.add(state.request_id)
                cache_budget -= sum(reads)
                if token_budget == 0 or (cache_budget <= 0 and not fast_path) or requests_left <= 0:
                    break
            return (scheduled, allocation_failed, fast_path, start_tokens - token_budget,
                    start_cache - cache_budget)

    return PairScheduler


class TransformersEngine:
    """CFG requests served by one transformers continuous-batching engine (a background thread).

    `model` is any transformers causal LM; the cache holds `num_blocks` pages of `page_size`
    tokens; a step runs at most `max_batch_tokens` query tokens of at most `max_requests` sequences
    (a guided request counts two). None leaves a size to transformers' defaults. A configuration
    that could never run a guided request (fewer than 2 sequences or 2 query tokens a step, fewer
    than 2 pages) raises ValueError here.
    """

    guided_logprobs = True  # logprobs are the guided distribution's (see _draw)

    def __init__(self, model, tokenizer, *, num_blocks=None, page_size=256, max_batch_tokens=None,
                 max_requests=None):
        check_engine()
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        from transformers.generation.continuous_batching import scheduler as scheduler_module

        self.model, self.tokenizer = model, tokenizer
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_token_ids = set() if eos is None else set(eos if isinstance(eos, list) else [eos])
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        scheduler_module.SCHEDULER_MAPPING["cfg_pairs"] = _scheduler_class()
        # No logits processors (greedy config): the fused step below does all of the sampling.
        config = GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=sorted(self.eos_token_ids)
                                  or None, pad_token_id=model.generation_config.pad_token_id)
        cb = ContinuousBatchingConfig(page_size=page_size, num_blocks=num_blocks,
                                      max_batch_tokens=max_batch_tokens,
                                      max_requests_per_batch=max_requests, scheduler_type="cfg_pairs",
                                      use_async_batching=False, use_cuda_graph=False,
                                      allow_block_sharing=True)
        self._manager = model.init_continuous_batching(generation_config=config,
                                                       continuous_batching_config=cb)
        self._requests: dict[str, Request] = {}  # by member id (cond and uncond)
        self._partners: dict[str, str] = {}
        self._lock = threading.Lock()
        self._counter = 0
        self.counters = {"steps": 0, "guided_tokens": 0, "unguided_tokens": 0, "degraded_tokens": 0}
        processor = self._manager._create_batch_processor()
        self._manager.batch_processor = processor
        processor.scheduler.partners = self._partners
        runner = processor.model_runner
        runner._sample = lambda scores, output_ids: self._fused_sample(processor, scores, output_ids)
        self._cache = processor.cache
        self.page_size = page_size
        self.capacity_pages = _capacity(self._cache)
        if min(self.capacity_pages, processor.max_batch_tokens, processor.scheduler.max_requests_per_batch) < 2:
            raise ValueError(f"this cache ({self.capacity_pages} pages), step ({processor.max_batch_tokens} "
                             f"tokens) or request limit ({processor.scheduler.max_requests_per_batch}) "
                             "cannot run a guided request: each needs at least 2")
        self._scheduler = processor.scheduler
        self._manager.start()

    # ------------------------------------------------------------------ front-end interface

    def check_fits(self, prompt_ids, negative_ids, params: GuidanceParams):
        """Raises ValueError when a request could never be held by this engine's KV cache: the
        pages its admission reserves (each branch's prompt plus max_tokens, rounded up to whole
        pages per branch) exceed the cache's."""
        lengths = [len(ids) + params.max_new_tokens for ids in branches(prompt_ids, negative_ids, params)]
        pages = sum(_pages(self._cache, n) for n in lengths)
        if pages > self.capacity_pages:
            raise ValueError(f"the request needs {pages} KV-cache pages of {self.page_size} tokens (its "
                             f"prompt{' and negative prompt' if len(lengths) > 1 else ''} plus max_tokens, "
                             f"{' + '.join(map(str, lengths))} tokens, each branch in whole pages); this "
                             f"server's cache holds {self.capacity_pages}")

    async def generate(self, prompt_ids: list[int], negative_ids: list[int] | None,
                       params: GuidanceParams, *, logprobs: int | None = None) -> AsyncIterator[Output]:
        """Runs one request; yields an `Output` per new token, the last with `finished` set.

        `negative_ids` is the unconditional branch (None: the prompt's last token); ignored
        when `params` is unguided. Raises ValueError when the cache could never hold it.
        Closing the iterator early (a client gone, a stop string) cancels both sequences and
        frees their cache.
        """
        self.check_fits(prompt_ids, negative_ids, params)  # else it would wait forever
        request = self._register(prompt_ids, negative_ids, params, logprobs)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        router = self._manager.output_router
        members = [request.cond_id] + ([request.uncond_id] if request.uncond_id else [])
        with router._lock:
            router.result_handlers[request.cond_id] = (queue.put_nowait, loop)
            if request.uncond_id:  # its outputs repeat cond's: dropped rather than queued
                router.result_handlers[request.uncond_id] = (lambda output: None, loop)
        finished = False
        try:
            common = dict(max_new_tokens=params.max_new_tokens, eos_token_id=sorted(self.eos_token_ids) or -1)
            added = [self._manager.add_request(ids, request_id=member, streaming=member == request.cond_id,
                                               **common)
                     for ids, member in zip(branches(prompt_ids, negative_ids, params), members)]
            if None in added or not self._manager.is_running():
                raise EngineUnavailable("the engine is not running")
            while not finished:
                result = await queue.get()
                finished = result.is_finished()
                if result.error is not None:
                    yield Output(list(result.generated_tokens), True, None, result.error)
                    return
                tokens = list(result.generated_tokens)
                reason = None
                if finished:
                    reason = "stop" if tokens and tokens[-1] in self.eos_token_ids else "length"
                lps = None if logprobs is None else request.token_logprobs[: len(tokens)]
                yield Output(tokens, finished, reason, logprobs=lps)
        finally:
            if not finished:
                for member in members:
                    self._manager.cancel_request(member)
            with router._lock:
                for member in members:
                    router.result_handlers.pop(member, None)
            self._forget(request)

    def busy_sequences(self) -> set[str]:
        """Ids of the engine sequences that hold KV-cache blocks (empty when idle)."""
        return {rid for allocator in self._cache.cache_allocators.values()
                for rid, blocks in allocator.block_table.items() if blocks}

    def running(self) -> bool:
        return self._manager.is_running()

    async def stats(self) -> dict:
        return dict(self.counters)

    def stop(self):
        self._manager.stop(block=True, timeout=30)

    # ------------------------------------------------------------------ engine thread

    def _register(self, prompt_ids, negative_ids, params, logprobs) -> Request:
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        with self._lock:
            self._counter += 1
            rid = f"cfg-{self._counter}"
        uncond_id = f"{rid}/uncond" if params.guided else None
        request = Request(params, seed, rid, uncond_id, logprobs)
        self._requests[rid] = request
        if uncond_id:
            self._requests[uncond_id] = request
            self._partners[rid], self._partners[uncond_id] = uncond_id, rid
        return request

    def _forget(self, request):
        for member in (request.cond_id, request.uncond_id):
            if member:
                self._requests.pop(member, None)
                self._partners.pop(member, None)

    def _fused_sample(self, processor, scores, output_ids):
        """The engine's sampling step: `scores` `[1, N, V]` float32, one row per sequence that
        yields a token this step, in `requests_in_batch` order; writes the tokens to `output_ids[0]`."""
        states = [f.state for f in processor.inputs_and_outputs.requests_in_batch if f.has_new_token]
        logits = scores[0]
        row_of = {state.request_id: i for i, state in enumerate(states)}
        groups = {}  # mix is None or not: two modes of `sample`, one call each
        for i, state in enumerate(states):
            request = self._requests.get(state.request_id)
            if request is None:  # cancelled since this step was scheduled: any token will do
                output_ids[0, i] = 0
                continue
            if state.request_id != request.cond_id:
                if request.cond_id not in row_of:
                    self._degraded(request, "its unconditional sequence yields logits alone")
                    output_ids[0, i] = 0
                continue  # the unconditional row takes its conditional row's token
            j = i
            if request.uncond_id is not None:
                if request.uncond_id in row_of:
                    j = row_of[request.uncond_id]
                else:
                    self._degraded(request, "its conditional sequence yields logits alone")
            groups.setdefault(request.params.mix is None, []).append((i, j, request, _output_length(state)))
        for normalized, rows in groups.items():
            tokens = self._draw(logits, rows, normalized)
            for (i, j, request, _), token in zip(rows, tokens.tolist()):
                output_ids[0, i] = token
                output_ids[0, j] = token
        self.counters["steps"] += 1
        for rows in groups.values():
            for _, _, request, _ in rows:
                self.counters["guided_tokens" if request.uncond_id else "unguided_tokens"] += 1

    def _degraded(self, request, why):
        # The pair scheduler never lets this happen; if it does, the token is drawn unguided
        # (uncond := cond) rather than failing every request in the engine, and it is counted.
        self.counters["degraded_tokens"] += 1
        log.error("request %s: %s (drawn without guidance this step)", request.cond_id, why)

    def _draw(self, logits, rows, normalized):
        """One `sample` call for `rows` [(cond row, uncond row, request, step)] of one mode."""
        cond = logits[[i for i, *_ in rows]]
        uncond = logits[[j for _, j, *_ in rows]]
        params = [r[2].params for r in rows]
        tokens = sample_requests(cond, uncond, params, [r[2].seed for r in rows], [r[3] for r in rows],
                                 normalized=normalized)
        wanted = [k for k, r in enumerate(rows) if r[2].logprobs is not None]
        if wanted:
            # Log-probabilities of the guided distribution (before temperature and filters).
            picked = [params[k] for k in wanted]
            gamma = torch.tensor([p.guidance_scale for p in picked], device=logits.device)
            mix = None if normalized else torch.tensor([p.mix for p in picked], device=logits.device)
            scores = guidance(cond[wanted], uncond[wanted], gamma, mix=mix).log_softmax(-1)
            for k, lp in zip(wanted, scores):
                request, token = rows[k][2], int(tokens[k])
                top = []
                if request.logprobs:
                    values, ids = lp.topk(request.logprobs)
                    top = list(zip(ids.tolist(), values.tolist()))
                request.token_logprobs.append((float(lp[token]), top))
        return tokens
