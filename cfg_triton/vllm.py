"""CFG on vLLM without a fork: a guided request is a pair of engine requests kept in lockstep.

Three pieces, all on vLLM's v1 engine:

* `GuidanceProcessor`, a logits processor: finds the pairs among the batch rows (tagged through
  `SamplingParams.extra_args[TAG]`), draws each pair's token with `cfg_triton.sample` on the
  pair's two rows (γ, α, temperature, top-k, top-p, min-p, and noise keyed by the request's seed
  and step, so a re-added request draws the same), and forces it into both rows (0 at the token,
  -inf elsewhere; both requests run greedy in vLLM, so vLLM's sampler takes it).
* `PairScheduler`, a `Scheduler` subclass: admits both requests of a pair or neither, never lets
  one member's last prefill chunk (the step that samples) run without the other's, schedules a
  pair's decodes together, and preempts and resumes pairs together. Without it a pair that is
  prefilled in different steps stays one step apart for the whole generation (unguided).
* `generate(llm, prompts, ...)`: the offline front end, and `VllmEngine`: the async engine behind
  `cfg-triton serve --engine vllm`.

Tested with vLLM 0.32 only (the `vllm` extra pins it) on its v1 model runner
(`VLLM_USE_V2_MODEL_RUNNER=0`, set by `engine_args`): the scheduler's internals are not public
API. Every private name used is in `_HOOKS`; `check_vllm()` fails at start when one is missing.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import secrets
import tempfile
import threading
import time
import uuid

import torch
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus
from vllm.v1.sample.logits_processor import LogitsProcessor, MoveDirectionality

from .engine import EngineUnavailable, Output, branches
from .params import GuidanceParams, sample_requests

TESTED_VLLM = "0.32"
TAG = "cfg_triton"  # the key of SamplingParams.extra_args that marks a pair member
log = logging.getLogger("cfg_triton.vllm")

# vLLM's private surface, in one place (checked by check_vllm()):
_HOOKS = (
    ("vllm.v1.core.sched.scheduler", "Scheduler.schedule"),
    ("vllm.v1.core.sched.scheduler", "Scheduler._reserve_prefill_lookahead"),  # the per-request gate
    ("vllm.v1.core.sched.scheduler", "Scheduler._update_after_schedule"),      # the repair pass
    ("vllm.v1.core.sched.scheduler", "Scheduler._preempt_request"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.add_request"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.finish_requests"),
    ("vllm.v1.sample.logits_processor", "LogitsProcessor.update_state"),
    ("vllm.v1.sample.logits_processor", "BatchUpdate"),
)
# ... and attributes of the scheduler: `running`, `waiting` (peek/prepend), `requests`,
# `kv_cache_manager.free`, `reset_preempted_req_ids` (the set this step's output carries),
# `prev_step_scheduled_req_ids`, `max_num_scheduled_tokens`, `max_num_running_reqs`; of
# `Request`: `num_tokens`, `num_computed_tokens`, `status`, `sampling_params`.

# Counters, counted where they happen: the scheduler in the engine core, the processor in each
# worker (the same process with one worker). Each process adds to its own dict and, when
# `COUNTERS_ENV` names a path (`engine_args` sets one), rewrites `<path>.<pid>` as JSON, so that
# `counters()` can sum them from the front end's process.
COUNTERS_ENV = "CFG_TRITON_VLLM_COUNTERS"
COUNTERS = {"guided_tokens": 0, "degraded_tokens": 0, "repaired_steps": 0, "preempted_members": 0}
_counters_lock = threading.Lock()


def _count(name, n=1):
    with _counters_lock:
        COUNTERS[name] += n
        path = os.environ.get(COUNTERS_ENV)
        if path:
            own = f"{path}.{os.getpid()}"
            with open(own + ".tmp", "w") as f:
                json.dump(COUNTERS, f)
            os.replace(own + ".tmp", own)


def counters() -> dict:
    """Guidance counters summed over this process and the engine processes it started (with
    tensor parallelism every worker's processor counts `degraded_tokens`):

    * `guided_tokens`: tokens pairs were scheduled to draw together (counted by the scheduler);
    * `degraded_tokens`: tokens a conditional request produced without its partner (drawn
      unguided; counted by the processor, at the engine's next step): 0 unless the pair
      scheduler failed, which is a bug;
    * `repaired_steps`: steps in which the scheduler took one member's sampling token back
      because its partner could not run (a failed allocation, the step's request limit);
    * `preempted_members`: pair members preempted (by vLLM for memory, or with their partner).
    """
    path = os.environ.get(COUNTERS_ENV)
    if not path:
        with _counters_lock:
            return dict(COUNTERS)
    total = dict.fromkeys(COUNTERS, 0)
    for name in glob.glob(glob.escape(path) + ".*[0-9]"):
        try:
            with open(name) as f:
                for key, value in json.load(f).items():
                    total[key] = total.get(key, 0) + value
        except (OSError, ValueError):  # a file being replaced: the next read sees it
            continue
    return total


def check_vllm():
    """Raises ImportError when vLLM lacks a hook this module uses."""
    import importlib

    import vllm

    missing = []
    for module, path in _HOOKS:
        owner = importlib.import_module(module)
        for name in path.split("."):
            owner = getattr(owner, name, None)
        if owner is None:
            missing.append(f"{module}.{path}")
    if missing:
        raise ImportError(f"vLLM {vllm.__version__} lacks {', '.join(missing)}; cfg_triton.vllm is "
                          f"tested with vLLM {TESTED_VLLM}.* (pip install -e .[vllm])")


# ---------------------------------------------------------------------------------------- tags

def _tag(sampling_params):
    extra = getattr(sampling_params, "extra_args", None) or {}
    return extra.get(TAG)


# Per-row vLLM features a forced row would defeat (or turn into an all -inf row): refused.
_REFUSED = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
            "min_tokens": 0, "logit_bias": None, "allowed_token_ids": None, "bad_words": None}


def pair_params(params: GuidanceParams, seed: int, sampling_params=None):
    """The two `SamplingParams` (cond, uncond) of one guided request.

    Both run greedy in vLLM (the processor forces the guided token into both rows); `max_tokens`,
    stop tokens and EOS handling come from `sampling_params` (None: defaults) and apply to both,
    so both members finish on the same token. Stop strings are cond's alone (the front end ends
    the pair). Raises ValueError for penalties, logit bias and the like (see `_REFUSED`).
    """
    from vllm import SamplingParams

    base = sampling_params or SamplingParams()
    for name, neutral in _REFUSED.items():
        if getattr(base, name, neutral) not in (neutral, None, [], {}):
            raise ValueError(f"{name} is not supported with guidance on vLLM: vLLM applies it per "
                             f"row after the guided token is forced (set it to {neutral!r})")
    if getattr(base, "n", 1) != 1:
        raise ValueError("n must be 1 with guidance (one completion per pair)")
    if getattr(base, "structured_outputs", None) is not None:
        raise ValueError("structured_outputs is not supported with guidance on vLLM: its grammar "
                         "mask would apply per row after the guided token is forced")
    pair = uuid.uuid4().hex
    tags = dataclasses.asdict(params)
    tags.update(seed=seed, pair=pair)
    common = dict(max_tokens=params.max_new_tokens, temperature=0.0, ignore_eos=base.ignore_eos,
                  stop_token_ids=base.stop_token_ids, skip_special_tokens=base.skip_special_tokens,
                  logprobs=base.logprobs)
    cond = SamplingParams(**common, stop=base.stop,
                          include_stop_str_in_output=base.include_stop_str_in_output,
                          extra_args={TAG: {**tags, "role": "cond"}})
    uncond = SamplingParams(**common, detokenize=False, extra_args={TAG: {**tags, "role": "uncond"}})
    return cond, uncond


# ------------------------------------------------------------------------------ logits processor

@dataclasses.dataclass
class _Row:
    pair: str
    cond: bool
    params: GuidanceParams
    seed: int
    output_ids: list  # vLLM's live list of the request's generated tokens


def _row(sampling_params, output_ids):
    tag = _tag(sampling_params)
    if tag is None:
        return None
    fields = {f.name: tag[f.name] for f in dataclasses.fields(GuidanceParams)}
    return _Row(tag["pair"], tag["role"] == "cond", GuidanceParams(**fields), int(tag["seed"]), output_ids)


class GuidanceProcessor(LogitsProcessor):
    """Draws each pair's guided token and forces it into both of the pair's rows.

    Rows of untagged requests are left alone. A tagged row without its partner in the batch
    is a partial prefill chunk (its sample is discarded) unless the scheduler failed: such a
    row is drawn unguided (as are members whose outputs differ in length). Partial chunks are
    not recognised when the draw happens; at the engine's next step, whose output grew says
    which rows produced tokens: a cond token drawn alone, or beside an uncond row that did
    not produce one (a partial chunk, so not the same position), is counted in
    `degraded_tokens` and logged.
    """

    def __init__(self, vllm_config, device, is_pin_memory):
        self.rows: dict[int, _Row] = {}
        # Rows drawn in the last step, with their output lengths then:
        self.lone: list[tuple[_Row, int]] = []               # (row, length) drawn alone
        self.paired: list[tuple[_Row, _Row, int]] = []       # (cond, uncond, length) drawn together

    @classmethod
    def validate_params(cls, sampling_params):
        tag = _tag(sampling_params)
        if tag is not None:
            if sampling_params.temperature != 0.0:
                raise ValueError(f"requests tagged {TAG!r} must run at temperature 0 in vLLM "
                                 "(their sampling is the guided draw); use pair_params()")
            _row(sampling_params, [])  # checks the guidance parameters

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update):
        # Known one step late, from whose output grew (a partial prefill chunk's draw is
        # discarded): a cond token drawn alone, or beside an uncond row that was a partial chunk.
        degraded = [row for row, length in self.lone if row.cond and len(row.output_ids) > length]
        degraded += [cond for cond, uncond, length in self.paired
                     if len(cond.output_ids) > length and len(uncond.output_ids) == length]
        for row in degraded:
            _count("degraded_tokens")
            log.error("pair %s: its conditional request produced a token in a step its "
                      "unconditional one did not (drawn without proper guidance)", row.pair)
        self.lone, self.paired = [], []
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _, output_ids in batch_update.added:
            row = _row(params, output_ids)
            if row is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = row
        for a, b, direction in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if rb is not None and direction == MoveDirectionality.SWAP:
                self.rows[a] = rb

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        pairs: dict[str, list] = {}
        for index, row in self.rows.items():
            if index < logits.shape[0]:
                pairs.setdefault(row.pair, [None, None])[0 if row.cond else 1] = (index, row)
        groups: dict[bool, list] = {}  # normalized or mixed CFG: one `sample` call each
        for cond, uncond in pairs.values():
            # Members a token apart (the scheduler failed earlier) are not guided either.
            lone = (cond is None or uncond is None
                    or len(cond[1].output_ids) != len(uncond[1].output_ids))
            if lone:
                for member in (cond, uncond):
                    if member is not None:
                        self.lone.append((member[1], len(member[1].output_ids)))
                        groups.setdefault(member[1].params.mix is None, []).append((member, member, True))
                continue
            self.paired.append((cond[1], uncond[1], len(cond[1].output_ids)))
            groups.setdefault(cond[1].params.mix is None, []).append((cond, uncond, False))
        rows, tokens = [], []
        for normalized, members in groups.items():
            drawn = _draw(logits, members, normalized).tolist()
            for (cond, uncond, lone), token in zip(members, drawn):
                rows += [cond[0]] if lone else [cond[0], uncond[0]]
                tokens += [token] if lone else [token, token]
        rows_t = torch.tensor(rows, device=logits.device)
        logits[rows_t] = float("-inf")
        logits[rows_t, torch.tensor(tokens, device=logits.device)] = 0.0
        return logits


def _draw(logits, members, normalized):
    """One `sample` call over pairs [((cond row, _Row), (uncond row, _Row), lone)] of one mode;
    a lone row is drawn without guidance."""
    return sample_requests(logits[[c[0] for c, _, _ in members]].float(),
                           logits[[u[0] for _, u, _ in members]].float(),
                           [c[1].params for c, _, _ in members], [c[1].seed for c, _, _ in members],
                           [len(c[1].output_ids) for c, _, _ in members], normalized=normalized,
                           guided=[not lone for *_, lone in members])


# ------------------------------------------------------------------------------ pair scheduler

@dataclasses.dataclass
class _Step:
    """What the gate has decided in the step being scheduled."""

    budget: int                                   # tokens left (mirrors the scheduler's budget)
    decided: set = dataclasses.field(default_factory=set)
    reserved: dict = dataclasses.field(default_factory=dict)  # partner id -> tokens kept for it


class PairScheduler(Scheduler):
    """vLLM's scheduler with the two members of a guided pair kept in lockstep.

    A member *completes* in a step when the step runs the rest of its tokens (its last
    prefill chunk, or a decode): it then samples. The invariant: a pair's members complete
    in the same steps. Kept by three means:

    * arrival: the first member is held until its partner arrives; both then queue together;
    * the gate (`_reserve_prefill_lookahead`, called for every request the scheduler is about
      to schedule, with the tokens it would run): the first member of a pair may complete
      only when the budget left holds its partner's remaining tokens too (kept for it); a
      member whose partner does not complete runs at most all but one of its tokens (a
      decode then waits);
    * the repair pass (before the step's output is committed): where a member would still
      complete alone (its partner's allocation failed, the step's request limit), it runs
      one token less, or when it runs one token only, it is taken out of the step
      (preempted; a request admitted in this step is put back in the queue). Counted in
      `repaired_steps`.

    A running member whose partner was preempted is preempted too, so pairs resume together;
    a pair member finished or aborted finishes its partner.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.scheduler_config
        problems = []
        if getattr(config, "async_scheduling", False):
            problems.append("async scheduling (async_scheduling=False)")
        if str(getattr(config, "policy", "fcfs")).lower().endswith("priority"):
            problems.append("the priority policy (policy='fcfs')")
        if getattr(config, "long_prefill_token_threshold", 0):
            problems.append("long_prefill_token_threshold (0)")
        if self.vllm_config.speculative_config is not None:
            problems.append("speculative decoding")
        if self.max_num_running_reqs < 2:
            problems.append(f"max_num_seqs={self.max_num_running_reqs} (a pair is two sequences: at least 2)")
        if config.max_num_batched_tokens < 2:
            problems.append(f"max_num_batched_tokens={config.max_num_batched_tokens} (a pair's decode "
                            "step is two tokens: at least 2)")
        if problems:
            raise ValueError("cfg_triton's PairScheduler does not support " + ", ".join(problems))
        self._partner: dict[str, str] = {}
        self._held: dict[str, object] = {}  # pair -> the member that arrived first
        self._step = _Step(0)

    # ---------------------------------------------------------------- arrival and exit

    def add_request(self, request) -> None:
        tag = _tag(request.sampling_params)
        if tag is None:
            return super().add_request(request)
        first = self._held.pop(tag["pair"], None)
        if first is None:
            self._held[tag["pair"]] = request
            return
        cond, uncond = (request, first) if tag["role"] == "cond" else (first, request)
        self._partner[cond.request_id] = uncond.request_id
        self._partner[uncond.request_id] = cond.request_id
        # The longer member queues first: it can prefill its chunks alone (all but its last token)
        # while the shorter one waits, whereas a short first member that cannot complete without
        # a partner longer than the step budget would hold the queue's head forever.
        for member in sorted((cond, uncond), key=lambda r: -r.num_tokens):
            super().add_request(member)

    def finish_requests(self, request_ids, finished_status):
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        if request_ids is not None:
            request_ids = set(request_ids)
            for held in list(self._held.values()):
                if held.request_id in request_ids:
                    self._held.pop(_tag(held.sampling_params)["pair"])
            request_ids |= {self._partner[r] for r in request_ids if r in self._partner}
        finished = super().finish_requests(request_ids, finished_status)
        self._forget()
        return finished

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        # Both members stop on the same token; a member gone alone (a stop the front end
        # saw on cond only) takes its partner with it.
        orphans = [p for r, p in self._partner.items() if r not in self.requests and p in self.requests]
        if orphans:
            super().finish_requests(orphans, RequestStatus.FINISHED_ABORTED)
        self._forget()
        return outputs

    def _partner_of(self, request_id):
        return self.requests.get(self._partner.get(request_id, ""))

    def _forget(self):
        for r in [r for r in self._partner if r not in self.requests]:
            self._partner.pop(r)

    # ---------------------------------------------------------------- one step

    def schedule(self, *args, **kwargs):
        self._pair_preemptions()
        self._pair_running()
        self._step = _Step(min(self.max_num_scheduled_tokens, self.scheduler_config.max_num_batched_tokens))
        return super().schedule(*args, **kwargs)

    def _pair_preemptions(self):
        """Preempts each running member whose partner was preempted: both resume together."""
        lone = [r for r in self.running
                if getattr(self._partner_of(r.request_id), "status", None) == RequestStatus.PREEMPTED]
        for request in lone:
            self.running.remove(request)
            self._preempt_request(request, time.monotonic())

    def _pair_running(self):
        """Puts each running pair's members next to each other (the first one's place)."""
        running = {id(r) for r in self.running}
        ordered, placed = [], set()
        for request in self.running:
            if id(request) in placed:
                continue
            ordered.append(request)
            placed.add(id(request))
            partner = self._partner_of(request.request_id)
            if partner is not None and id(partner) in running and id(partner) not in placed:
                ordered.append(partner)
                placed.add(id(partner))
        self.running = ordered

    def _reserve_prefill_lookahead(self, request, num_computed_tokens, num_new_tokens):
        n = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        step, rid = self._step, request.request_id
        remaining = request.num_tokens - num_computed_tokens  # the token that samples included
        free = step.budget - sum(step.reserved.values())
        partner = self._partner_of(rid)
        if partner is None:
            n = min(n, free)
        elif partner.request_id in step.decided:  # the partner went first in this step
            if rid in step.reserved:
                n = min(n, step.reserved.pop(rid) + free)
            else:
                n = min(n, remaining - 1, free)
        else:
            partner_left = partner.num_tokens - partner.num_computed_tokens
            follows = self._partner_follows(request, partner)
            if n >= remaining and remaining + partner_left <= free and follows:
                n = remaining
                step.reserved[partner.request_id] = partner_left
            else:
                n = min(n, remaining - 1, free)
        n = max(n, 0)
        step.decided.add(rid)
        step.budget -= n
        return n

    def _partner_follows(self, request, partner) -> bool:
        """Whether `partner` is scheduled right after `request` in this step, barring a
        failed allocation (which the repair pass handles)."""
        if partner.status == RequestStatus.RUNNING:
            return request.status != RequestStatus.RUNNING or partner in self.running
        # The partner waits: admitted next only from the head of the queue, with room for two.
        room = len(self.running) + (request.status != RequestStatus.RUNNING) + 1 <= self.max_num_running_reqs
        return room and not self.kv_holding_waiting and bool(self.waiting) and (
            self.waiting.peek_request() is partner
            or (request.status != RequestStatus.RUNNING and self._second_in_queue(partner)))

    def _second_in_queue(self, partner) -> bool:
        queue = iter(self.waiting)
        next(queue, None)
        return next(queue, None) is partner

    def _preempt_request(self, request, *args, **kwargs):
        if request.request_id in self._partner:
            _count("preempted_members")
        return super()._preempt_request(request, *args, **kwargs)

    def _update_after_schedule(self, scheduler_output) -> None:
        scheduled = scheduler_output.num_scheduled_tokens
        for rid in list(scheduled):
            partner = self._partner_of(rid)
            if partner is None or rid not in scheduled:
                continue
            request = self.requests[rid]
            if self._completes(request, scheduled) and not self._completes(partner, scheduled):
                self._repair(scheduler_output, request)
        members = [self.requests[rid] for rid in scheduled if rid in self._partner]
        guided = sum(1 for r in members
                     if _tag(r.sampling_params)["role"] == "cond" and self._completes(r, scheduled))
        if guided:
            _count("guided_tokens", guided)
        super()._update_after_schedule(scheduler_output)

    @staticmethod
    def _completes(request, scheduled) -> bool:
        return scheduled.get(request.request_id, 0) >= request.num_tokens - request.num_computed_tokens

    def _repair(self, out, request):
        """Keeps `request` from completing in this step (its partner does not)."""
        _count("repaired_steps")
        rid = request.request_id
        if out.num_scheduled_tokens[rid] > 1:
            out.num_scheduled_tokens[rid] -= 1
            out.total_num_scheduled_tokens -= 1
            return
        out.total_num_scheduled_tokens -= out.num_scheduled_tokens.pop(rid)
        self.prev_step_scheduled_req_ids.discard(rid)
        self.running.remove(request)
        new = [d for d in out.scheduled_new_reqs if d.req_id == rid]
        if new:  # admitted in this step: the worker has not seen it, so back to the queue
            out.scheduled_new_reqs.remove(new[0])
            self.kv_cache_manager.free(request)
            request.status = RequestStatus.WAITING
            request.num_computed_tokens = 0
            self.waiting.prepend_request(request)
            return
        cached = out.scheduled_cached_reqs
        i = cached.req_ids.index(rid)
        for field in ("req_ids", "new_token_ids", "new_block_ids", "num_computed_tokens",
                      "num_output_tokens"):
            values = getattr(cached, field)
            if len(values) > i:
                del values[i]
        cached.resumed_req_ids.discard(rid)
        cached.all_token_ids.pop(rid, None)
        self._preempt_request(request, time.monotonic())  # adds rid to this step's preempted ids


def engine_args(**overrides) -> dict:
    """Keyword arguments for `vllm.LLM(...)` / `AsyncEngineArgs(...)` that install the pair
    scheduler and the guidance processor (and the settings they need), updated by `overrides`.

    Also sets, unless set already, `VLLM_USE_V2_MODEL_RUNNER=0` in this process's environment
    (the processor and the scheduler are written for the v1 model runner) and `COUNTERS_ENV`.
    Raises ImportError when vLLM lacks a hook the scheduler or processor use (`check_vllm`).
    """
    check_vllm()
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    # Inherited by the engine processes: where their counters go (see `counters()`).
    os.environ.setdefault(COUNTERS_ENV, os.path.join(tempfile.mkdtemp(prefix="cfg_triton_vllm-"), "counters"))
    args = dict(scheduler_cls=f"{__name__}.PairScheduler",
                logits_processors=[f"{__name__}:GuidanceProcessor"], async_scheduling=False,
                enable_chunked_prefill=True)
    args.update(overrides)
    return args


# ------------------------------------------------------------------------------ offline front end

@dataclasses.dataclass
class Completion:
    """One prompt's result: the generated token ids and text, and why it ended ("stop": an EOS or
    stop token or a stop string; "length"). `logprobs`, when `sampling_params.logprobs` asked
    for them, are vLLM's for the conditional branch (its raw log-probabilities), not the
    guided distribution's."""

    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list | None = None


def generate(llm, prompts, negative_prompts=None, *, guidance_scale: float = 1.5,
             mix: float | None = None, sampling_params=None, params: GuidanceParams | None = None,
             seed: int | None = None) -> list[Completion]:
    """Runs CFG requests through an `LLM` built with `engine_args()`; one `Completion` per prompt.

    `prompts` and `negative_prompts` are strings or lists of token ids; a missing negative prompt
    (None, or a None entry) is the prompt's last token. `sampling_params` (a vLLM
    `SamplingParams`) gives temperature, top-k, top-p, min-p, `max_tokens`, stop strings and stop
    tokens; `params` (a `GuidanceParams`) may be given instead of γ, α and the sampling fields.
    `seed` (or `sampling_params.seed`) keys the noise of every request (request i: seed + i,
    wrapped into the signed 64-bit range); unset, each pair draws its own.
    """
    from vllm import SamplingParams

    base = sampling_params or SamplingParams(max_tokens=16)
    if params is None:
        params = GuidanceParams(
            guidance_scale=guidance_scale, mix=mix, temperature=base.temperature,
            top_k=base.top_k if base.top_k and base.top_k > 0 else None, top_p=base.top_p,
            min_p=base.min_p, max_new_tokens=base.max_tokens or 16,
            seed=seed if seed is not None else base.seed)
    tokenizer = llm.get_tokenizer()
    negative_prompts = negative_prompts or [None] * len(prompts)
    if len(negative_prompts) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
    engine = llm.llm_engine
    context = engine.model_config.max_model_len
    # Everything is checked before anything is submitted; a submission that fails anyway takes
    # back what was added, so the engine is left as it was found (as vLLM's own generate does).
    requests = []
    for i, (prompt, negative) in enumerate(zip(prompts, negative_prompts)):
        ids = _ids(tokenizer, prompt, special=True)
        uncond_ids = ids[-1:] if negative is None else _ids(tokenizer, negative, special=False)
        _check_context([ids, uncond_ids], params.max_new_tokens, context, f"prompt {i}: ")
        request_seed = _seed_of(params.seed, i) if params.seed is not None else secrets.randbits(63)
        requests.append((f"cfg-{uuid.uuid4().hex}", ids, uncond_ids, *pair_params(params, request_seed, base)))
    pending, added, last = {}, [], {}
    try:
        for i, (rid, ids, uncond_ids, cond_params, uncond_params) in enumerate(requests):
            added += [rid, rid + "/uncond"]
            engine.add_request(rid, {"prompt_token_ids": ids}, cond_params)
            engine.add_request(rid + "/uncond", {"prompt_token_ids": uncond_ids}, uncond_params)
            pending[rid] = i
    except BaseException:
        engine.abort_request(added)
        raise
    results: list[Completion | None] = [None] * len(prompts)
    try:
        while pending:
            for output in engine.step():
                last[output.request_id] = output
                if output.request_id in pending and output.finished:
                    results[pending.pop(output.request_id)] = _completion(output, output.outputs[0].finish_reason)
                    engine.abort_request([output.request_id + "/uncond"])
            if pending and not engine.has_unfinished_requests():
                # Ended without a final output (a member aborted from outside takes its partner).
                for rid, i in pending.items():
                    results[i] = _completion(last.get(rid), "abort")
                pending = {}
    except BaseException:
        engine.abort_request([r for rid in pending for r in (rid, rid + "/uncond")])
        raise
    return results


def _check_context(branch_ids, max_new_tokens, context, where=""):
    """Raises ValueError when a branch plus `max_new_tokens` exceeds the model's context."""
    longest = max(len(ids) for ids in branch_ids)
    if longest + max_new_tokens > context:
        raise ValueError(f"{where}a branch needs {longest + max_new_tokens} tokens (its prompt plus "
                         f"max_tokens); the engine's context (max_model_len) is {context}")


def _seed_of(seed: int, i: int) -> int:
    """Request i's seed, `seed + i` wrapped into the signed 64-bit range seeds are kept in."""
    return (seed + i + 2**63) % 2**64 - 2**63


def _completion(output, reason) -> Completion:
    if output is None:
        return Completion([], "", reason)
    done = output.outputs[0]
    return Completion(list(done.token_ids), done.text, reason, done.logprobs)


def _ids(tokenizer, text_or_ids, special):
    if isinstance(text_or_ids, str):
        ids = tokenizer(text_or_ids, add_special_tokens=special).input_ids
    else:
        ids = list(text_or_ids)
    if not ids:
        raise ValueError("a prompt or negative prompt is empty (no tokens)")
    return ids


# ------------------------------------------------------------------------------ server engine

class VllmEngine:
    """CFG requests on vLLM's async engine, behind `cfg_triton.server.create_app` (implements
    `cfg_triton.engine.Engine`).

    `model` is a checkpoint folder; `engine_kwargs` go to `AsyncEngineArgs` on top of
    `engine_args()`. A guided request is two engine requests (`pair_params`); an unguided one
    (γ = 1 without a mix) is a single request sampled by vLLM itself (`seed` honored).
    Log-probabilities are not offered: vLLM would report the conditional branch's, not the
    guided distribution's.
    """

    guided_logprobs = False

    def __init__(self, model: str, **engine_kwargs):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(model=str(model), **engine_args(**engine_kwargs))
        self._llm = AsyncLLM.from_engine_args(args)
        self.tokenizer = self._llm.get_tokenizer()
        self.context_length = self._llm.model_config.max_model_len

    def running(self) -> bool:
        return not self._llm.errored

    async def stats(self) -> dict:
        return counters()

    def check_fits(self, prompt_ids, negative_ids, params: GuidanceParams):
        """Raises ValueError when a branch could never fit the model's context."""
        _check_context(branches(prompt_ids, negative_ids, params), params.max_new_tokens, self.context_length)

    async def generate(self, prompt_ids, negative_ids, params: GuidanceParams, *, logprobs=None):
        """Runs one request; yields a `server.Output` per new token, the last with `finished`
        set. Closing the iterator early aborts both engine requests."""
        from vllm import SamplingParams
        from vllm.v1.engine.exceptions import EngineDeadError

        if logprobs is not None:
            raise ValueError("this engine does not report guided log-probabilities")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        rid = f"cfg-{uuid.uuid4().hex}"
        ids = branches(prompt_ids, negative_ids, params)
        if params.guided:
            requests = list(zip((rid, rid + "/uncond"), ids, pair_params(params, seed)))
        else:
            requests = [(rid, ids[0], SamplingParams(
                max_tokens=params.max_new_tokens, temperature=params.temperature,
                top_k=params.top_k or 0, top_p=params.top_p or 1.0, min_p=params.min_p or 0.0,
                seed=seed % 2**63))]
        finished = False
        try:
            try:
                queues = [await self._llm.add_request(r, {"prompt_token_ids": i}, p) for r, i, p in requests]
            except EngineDeadError as e:
                raise EngineUnavailable(str(e)) from e
            while not finished:  # the uncond request's queue is never read: its tokens are cond's
                try:
                    result = await queues[0].get()
                except EngineDeadError as e:
                    raise EngineUnavailable(str(e)) from e
                done = result.outputs[0]
                finished = result.finished
                yield Output(list(done.token_ids), finished, done.finish_reason if finished else None)
        finally:
            await self._llm.abort([r for r, *_ in requests] if not finished or params.guided else [])

    def stop(self):
        self._llm.shutdown()
