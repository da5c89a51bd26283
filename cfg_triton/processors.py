"""Drop-in logits processors for `model.generate` and the sampling warpers."""
from __future__ import annotations

import inspect
import numbers

import torch

from .lm import positions
from .ops import guidance


def warp_scores(scores, temperature=1.0, top_k=None, top_p=None):
    """Temperature, then top-k, then top-p (nucleus) on `[B, V]` scores; removed tokens become -inf.

    Same semantics as transformers' warpers: top-p keeps the smallest set of most likely tokens whose
    probability reaches `top_p`, and always at least one token.
    """
    check_warpers(temperature, top_k, top_p)
    if temperature != 1.0:
        scores = scores / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        tail_mass = sorted_scores.softmax(-1).cumsum(-1)
        drop = tail_mass <= 1 - top_p
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores


MIN_TEMPERATURE = 1e-6
# Beyond this the noise term of a draw, T·g (|g| < 18), could overflow float32 next to large scores,
# and every distribution is already uniform over its kept tokens to within (score spread) / 1e6.
MAX_TEMPERATURE = 1e6


def check_warpers(temperature=1.0, top_k=None, top_p=None, min_p=None):
    """Raises a ValueError naming the first bad sampling parameter."""
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        raise ValueError(f"temperature must be in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (below, the "
                         f"scaled scores overflow: use greedy decoding instead), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral)
                              or top_k < 1):
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if min_p is not None and (isinstance(min_p, bool) or not isinstance(min_p, numbers.Real)
                              or not 0.0 <= min_p <= 1.0):
        raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")


class CFGLogitsProcessor:
    """Fused replacement for transformers' `ClassifierFreeGuidanceLogitsProcessor` (2x batch).

    Called with `input_ids` `[B, T]` and `scores` `[2B, V]` (conditional rows first, then the
    unconditional rows); returns `[B, V]` guided scores: raw CFG `u + γ (c − u)` by default,
    normalized CFG with `normalize=True`, the interpolated variant with `mix=α`.
    """

    def __init__(self, guidance_scale, *, mix=None, normalize=False):
        self.guidance_scale, self.mix = guidance_scale, mix
        self.normalize = normalize or mix is not None

    def __call__(self, input_ids, scores):
        if scores.shape[0] != 2 * input_ids.shape[0]:
            raise ValueError(f"scores must hold 2B = {2 * input_ids.shape[0]} rows (conditional, then "
                             f"unconditional), got {scores.shape[0]}")
        cond, uncond = scores.chunk(2)
        return guidance(cond, uncond, self.guidance_scale, mix=self.mix, normalize=self.normalize,
                        out_dtype=scores.dtype)


class UnbatchedCFGLogitsProcessor:
    """Fused replacement for transformers' `UnbatchedClassifierFreeGuidanceLogitsProcessor`.

    Same contract: the unconditional branch (`unconditional_ids`, default the prompt's last token) runs
    through `model` (any callable returning an object with `.logits`) once per call with its own
    cache, called as transformers' processor calls it (ids first, then `attention_mask`, `use_cache`
    and the cache by keyword) plus `position_ids` from the mask where the callable takes them, so
    that left-padded negative prompts keep their positions. Rows are repeated to match prompts
    expanded by `num_return_sequences`. Returns normalized CFG log-probabilities shaped like
    `scores` (`[B, V]` or `[B, 1, V]`), interpolated with `mix=α`; `log_softmax(scores)` when
    `guidance_scale == 1` and no mix. Under `patch_transformers`, a paired model view supplies the
    unconditional logits from its own `[2B]` forward instead of a second model call.
    """

    def __init__(self, guidance_scale, model, unconditional_ids=None, unconditional_attention_mask=None,
                 use_cache=True, *, mix=None):
        self.guidance_scale, self.model, self.mix, self.use_cache = guidance_scale, model, mix, use_cache
        self.ids, self.mask = unconditional_ids, unconditional_attention_mask
        self.cache, self.first = None, True

    @torch.no_grad()  # a generation-time forward, also when the caller has grad mode on
    def _unconditional_logits(self, input_ids):
        if self.first:
            self.first = False
            if self.ids is None:
                self.ids = input_ids[:, -1:]
            if self.mask is None:
                self.mask = torch.ones_like(self.ids)
            if self.ids.shape[0] != input_ids.shape[0]:  # prompts expanded by num_return_sequences
                copies = input_ids.shape[0] // self.ids.shape[0]
                self.ids = self.ids.repeat_interleave(copies, dim=0)
                self.mask = self.mask.repeat_interleave(copies, dim=0)
            ids = self.ids
            # How to call the model is decided once: introspection has no place in every step.
            self.cache_keyword, self.pass_positions = cache_keyword(), accepts(self.model, "position_ids")
        else:
            self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
            self.ids = torch.cat([self.ids, input_ids[:, -1:]], dim=1)
            ids = input_ids[:, -1:] if self.use_cache else self.ids
        kw = {"attention_mask": self.mask, "use_cache": self.use_cache, self.cache_keyword: self.cache}
        if self.pass_positions:
            kw["position_ids"] = positions(self.mask)[:, -ids.shape[1]:]
        out = self.model(ids, **kw)
        self.cache = None
        if self.use_cache and hasattr(out, "get"):
            # transformers 5 warns on any read of the old name: read it only where `cache` is absent.
            self.cache = out.get("cache")
            if self.cache is None:
                self.cache = out.get("past_key_values")
        return out.logits[:, -1]

    def __call__(self, input_ids, scores):
        shape = scores.shape
        scores = scores.reshape(shape[0], shape[-1])
        if isinstance(self.guidance_scale, numbers.Real) and self.guidance_scale == 1 and self.mix is None:
            return torch.log_softmax(scores, dim=-1).reshape(shape)
        pairing = getattr(self.model, "_cfg_pairing", None)
        uncond = pairing.take() if pairing is not None else self._unconditional_logits(input_ids)
        out = guidance(scores, uncond.to(scores.dtype), self.guidance_scale, mix=self.mix,
                       out_dtype=scores.dtype)
        return out.reshape(shape)


def cache_keyword() -> str:
    """The keyword transformers' own CFG processor passes its cache under (5.x: `cache`)."""
    import transformers

    return "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"


def accepts(fn, name: str) -> bool:
    """Whether calling `fn` (a module: its forward) can take keyword `name`."""
    try:
        params = inspect.signature(fn.forward if isinstance(fn, torch.nn.Module) else fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
