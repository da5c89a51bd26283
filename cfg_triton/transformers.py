"""Drop-in acceleration of unchanged `model.generate(guidance_scale=…)` calls: `patch_transformers`.

transformers runs classifier-free guidance as a logits processor that calls the model a second
time every step for the unconditional branch: two sequential forwards per token. While a
`patch_transformers()` handle is active:

* our fused processors stand in for transformers' two CFG processors, in every transformers module
  that imports them (the generation utilities, MusicGen and the like, also modules imported later);
* a compatible `generate(guidance_scale=γ ≠ 1)` call on a decoder-only model runs both branches as
  one `[2B]` forward per step.

Design of the second point. Rather than re-implement generation, the call runs transformers' own
loop, so every logits processor and warper, stopping criterion, stop string, streamer, output option
and `generation_config` default behaves exactly as transformers has it, on a *paired view* of the
model: an instance of a subclass of the model's class that shares all of its modules, parameters and
configuration, whose forward takes the conditional rows transformers gives it, runs them together
with the unconditional rows as one batch, returns the conditional logits and leaves the
unconditional ones for the CFG processor, which transformers still builds first in its list. The
model itself is never modified, and every call gets its own view, so concurrent calls do not
interact. Calls the view cannot serve (beam search, assisted or contrastive decoding, static caches,
encoder-decoder models, embeddings as input) fall back to transformers' sequential path with the
fused processor, and warn once naming the cause; so does `patch_transformers(sequential=True)`,
for users short of memory.
"""
from __future__ import annotations

import functools
import inspect
import sys
import threading
import warnings
import weakref

import torch

from .lm import narrow_linears, positions
from .processors import CFGLogitsProcessor, UnbatchedCFGLogitsProcessor

_NAMES = ("ClassifierFreeGuidanceLogitsProcessor", "UnbatchedClassifierFreeGuidanceLogitsProcessor")
_OURS = {"ClassifierFreeGuidanceLogitsProcessor": CFGLogitsProcessor,
         "UnbatchedClassifierFreeGuidanceLogitsProcessor": UnbatchedCFGLogitsProcessor}
_lock = threading.RLock()
_active = []  # live handles; transformers is patched exactly while this is non-empty
_state = {}  # originals, saved at the first install
_warned = set()


class patch_transformers:
    """Makes unchanged `model.generate(guidance_scale=…, negative_prompt_ids=…)` calls use the fused
    op, with both branches in one `[2B]` forward per step (see the module docstring)::

        with cfg_triton.patch_transformers():
            model.generate(ids, guidance_scale=1.5)

    Handles nest and can be undone in any order, from any thread: transformers stays patched while
    any handle is live. `sequential=True` keeps transformers' two-pass loop (less memory) with the
    fused processor, for calls made while that handle is the newest.
    """

    def __init__(self, sequential: bool = False):
        self.sequential, self.live = sequential, True
        with _lock:
            if not _active:
                _install()
            _active.append(self)

    def undo(self):
        with _lock:
            if not self.live:
                return
            self.live = False
            _active.remove(self)
            if not _active:
                _uninstall()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False


def _transformers_modules():
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "transformers" or name.startswith("transformers."))]


def _install():
    from transformers.generation import logits_process
    from transformers.generation.utils import GenerationMixin

    if not _state:
        _state["classes"] = {n: getattr(logits_process, n) for n in _NAMES}
        _state["generate"] = GenerationMixin.generate
        _state["positional"] = [p.name for p in inspect.signature(GenerationMixin.generate).parameters.values()
                                if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD][1:]
    for module in _transformers_modules():
        for name in _NAMES:
            # __dict__, not getattr: a lazy module must not import everything it could.
            if module.__dict__.get(name) is _state["classes"][name]:
                setattr(module, name, _OURS[name])
    GenerationMixin.generate = _generate


def _uninstall():
    from transformers.generation.utils import GenerationMixin

    for module in _transformers_modules():  # also modules imported while patched
        for name in _NAMES:
            if module.__dict__.get(name) is _OURS[name]:
                setattr(module, name, _state["classes"][name])
    GenerationMixin.generate = _state["generate"]


def _warn_once(message):
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"cfg_triton: {message}", stacklevel=3)


# The cache keywords of generate: transformers 5 takes `cache`, 4.x `past_key_values`.
_CACHE_KEYWORDS = ("cache", "past_key_values")
# Caches returned by paired calls: they hold both branches, padded to one length.
_paired_caches = weakref.WeakSet()


def _generate(self, *args, **kwargs):
    """GenerationMixin.generate under the patch: a paired view where the call allows it."""
    # Positional arguments by name (a GenerationConfig is often passed second), so that the plan
    # sees the call as transformers will.
    names = _state["positional"]
    if len(args) > len(names):
        return _state["generate"](self, *args, **kwargs)  # transformers reports the bad call
    call = {**dict(zip(names, args)), **kwargs}
    pairing = _plan(self, call)
    if isinstance(pairing, str):
        _warn_once(f"CFG runs transformers' sequential loop (with the fused processor) because of "
                   f"{pairing}")
        pairing = None
    passed = [k for k in _CACHE_KEYWORDS if call.get(k) is not None]
    if passed and (pairing is not None or any(_is_paired(call[k]) for k in passed)):
        # A paired cache holds both branches, each padded to one length; any other holds the
        # conditional rows alone. Neither extends as the other, and re-reading the ids gives the
        # tokens of transformers' own continuation (whose unconditional branch restarts from the
        # negative prompt too), at the cost of one prefill.
        _warn_once("a guided generate given a cache re-reads its input ids: the paired view "
                   "cannot extend a cache (the one it returns holds both branches)")
        for k in passed:
            del call[k]
    if pairing is None:
        return _state["generate"](self, **call)
    # The paired forward's few rows take the same CPU matmul route as cfg_triton.generate's.
    with narrow_linears(self):
        out = _state["generate"](_paired_view(self, pairing), **call)
    cache = next((out[k] for k in _CACHE_KEYWORDS if isinstance(out, dict) and k in out), None)
    if cache is not None:
        try:
            _paired_caches.add(cache)
        except TypeError:  # a cache type that cannot be hashed or weakly referenced goes unrecorded
            pass
    return out


def _is_paired(cache) -> bool:
    try:
        return cache in _paired_caches
    except TypeError:
        return False


def _plan(model, call):
    """A `_Pairing` for a call (its arguments by name) the paired view serves, a reason string for
    one it cannot, or None for a call without guidance."""
    config = call.get("generation_config") or getattr(model, "generation_config", None)

    def option(name, default=None):
        return call[name] if name in call else getattr(config, name, default)

    scale = option("guidance_scale")
    if scale is None or scale == 1:
        return None
    with _lock:
        sequential = bool(_active) and _active[-1].sequential
    reasons = [
        (sequential, "patch_transformers(sequential=True)"),
        (getattr(model.config, "is_encoder_decoder", False), "an encoder-decoder model"),
        ((option("num_beams", 1) or 1) > 1, "beam search (num_beams > 1)"),
        (call.get("assistant_model") is not None or option("prompt_lookup_num_tokens") is not None,
         "assisted decoding"),
        ((option("penalty_alpha") or 0) > 0 and (option("top_k") or 0) > 1, "contrastive search"),
        (option("cache_implementation") is not None, "a cache_implementation (static caches)"),
        (call.get("inputs_embeds") is not None, "inputs_embeds"),
        (bool(call.get("synced_gpus")), "synced_gpus"),
        (call.get("custom_generate") is not None, "custom_generate"),
        ("forward" in vars(model), "a forward replaced on the model instance (offloading hooks)"),
    ]
    for applies, reason in reasons:
        if applies:
            return reason
    ids = call.get("input_ids", call.get("inputs"))
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return "inputs that are not a [B, T] tensor of token ids"
    negative = call.get("negative_prompt_ids")
    mask = call.get("negative_prompt_attention_mask")
    if negative is None:  # transformers' default unconditional input: the prompt's last token
        negative, mask = ids[:, -1:], None
    if negative.shape[1] > ids.shape[1] and (option("output_hidden_states")
                                             or option("output_attentions")):
        # Both branches are padded to the longer one's length, which these outputs would show.
        return "output_hidden_states or output_attentions with a negative prompt longer than the prompt"
    return _Pairing(ids.shape[1], negative, torch.ones_like(negative) if mask is None else mask)


class _Pairing:
    """One call's unconditional branch, and the logits its last forward left for the processor.

    Stateless across steps apart from that hand-off: every step's paired inputs are derived from
    what transformers passes (the conditional ids and mask), so the cache, `use_cache=False` and
    `num_return_sequences` need no bookkeeping here.
    """

    def __init__(self, prompt_len, negative, negative_mask):
        self.prompt_len, self.negative, self.negative_mask = prompt_len, negative, negative_mask
        self.uncond = self._total = None

    def take(self):
        uncond, self.uncond = self.uncond, None
        if uncond is None:
            raise RuntimeError("cfg_triton: the paired forward left no unconditional logits")
        return uncond

    def run(self, forward, input_ids, attention_mask, kwargs):
        rows, width = input_ids.shape
        if attention_mask is not None:
            total = attention_mask.shape[1]
        else:  # no mask, no padding: one new token after a cached step, else the whole sequence
            total = self._total + 1 if self._total is not None and width == 1 else width
        self._total = total
        generated = total - self.prompt_len
        if self.negative.shape[0] != rows:  # prompts expanded by num_return_sequences: expand once
            copies = rows // self.negative.shape[0]
            self.negative = self.negative.repeat_interleave(copies, dim=0)
            self.negative_mask = self.negative_mask.repeat_interleave(copies, dim=0)
        negative, negative_mask = self.negative, self.negative_mask
        # Both branches left-padded to one length, so that they share the cache's sequence axis.
        length = max(self.prompt_len, negative.shape[1])
        cond_pad, uncond_pad = length - self.prompt_len, length - negative.shape[1]
        cond_mask = attention_mask if attention_mask is not None else input_ids.new_ones((rows, total))
        cond_mask = _left_pad(cond_mask.to(negative_mask.dtype), cond_pad, 0)
        uncond_mask = torch.cat([_left_pad(negative_mask, uncond_pad, 0),
                                 negative_mask.new_ones((rows, generated))], dim=1)
        if width == total:  # the whole sequence: prefill, or a call without a cache
            cond_ids = _left_pad(input_ids, cond_pad, 0)
            uncond_ids = torch.cat([_left_pad(negative, uncond_pad, 0), input_ids[:, self.prompt_len:]], 1)
        else:  # the newest tokens, the same in both branches
            cond_ids = uncond_ids = input_ids
        fed = cond_ids.shape[1]
        mask = torch.cat([cond_mask, uncond_mask])
        kwargs["position_ids"] = positions(mask)[:, -fed:]  # each row's own, padding skipped
        if kwargs.get("cache_position") is not None:  # transformers 4.x: slots in the padded cache
            end = length + generated
            kwargs["cache_position"] = torch.arange(end - fed, end, device=input_ids.device)
        out = forward(input_ids=torch.cat([cond_ids, uncond_ids]), attention_mask=mask, **kwargs)
        self.uncond = out.logits[rows:, -1]
        out.logits = out.logits[:rows]
        for name in ("hidden_states", "attentions"):
            if getattr(out, name, None) is not None:
                setattr(out, name, tuple(t[:rows] for t in getattr(out, name)))
        return out


def _left_pad(t, columns, value):
    if columns == 0:
        return t
    return torch.cat([t.new_full((t.shape[0], columns), value), t], dim=1)


@functools.lru_cache(maxsize=None)
def _paired_class(cls):
    """A subclass of the model's class whose forward pairs the branches; same name and signature,
    so that transformers' argument checks and introspection see the model's own."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return self._cfg_pairing.run(super(paired, self).forward, input_ids, attention_mask, kwargs)

    forward.__signature__ = inspect.signature(cls.forward)
    paired = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})
    return paired


def _paired_view(model, pairing):
    """The model's paired view: a new instance sharing the model's attributes (its modules,
    parameters, buffers, configs), so that nothing on the model itself changes."""
    view = object.__new__(_paired_class(type(model)))
    view.__dict__.update(vars(model))
    view.__dict__["_cfg_pairing"] = pairing
    return view
