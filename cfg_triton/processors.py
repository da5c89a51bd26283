"""Drop-in logits processors for `model.generate`, the sampling warpers, and `patch_transformers`."""
from __future__ import annotations

import math
import numbers

import torch

from .lm import forward_last, positions
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


def check_warpers(temperature=1.0, top_k=None, top_p=None):
    """Raises a ValueError naming the first bad sampling parameter."""
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not MIN_TEMPERATURE <= temperature < math.inf):
        raise ValueError(f"temperature must be a finite number >= {MIN_TEMPERATURE:g} (below it the "
                         f"scaled scores overflow; use greedy decoding instead), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral)
                              or top_k < 1):
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


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
    through `model` once per call with its own cache; returns normalized CFG log-probabilities `[B, V]`
    (interpolated with `mix=α`), or `log_softmax(scores)` when `guidance_scale == 1` and no mix.
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
            ids = self.ids
        else:
            self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
            self.ids = torch.cat([self.ids, input_ids[:, -1:]], dim=1)
            ids = input_ids[:, -1:] if self.use_cache else self.ids
        pos = positions(self.mask)[:, -ids.shape[1]:]
        logits, cache = forward_last(self.model, ids, self.mask, pos, self.cache)
        self.cache = cache if self.use_cache else None
        return logits

    def __call__(self, input_ids, scores):
        if isinstance(self.guidance_scale, numbers.Real) and self.guidance_scale == 1 and self.mix is None:
            return torch.log_softmax(scores, dim=-1)
        uncond = self._unconditional_logits(input_ids).to(scores.dtype)
        return guidance(scores, uncond, self.guidance_scale, mix=self.mix, out_dtype=scores.dtype)


class patch_transformers:
    """Makes unchanged `model.generate(guidance_scale=…, negative_prompt_ids=…)` calls use the fused
    processor. Undo with `.undo()`, or use it as a context manager::

        with cfg_triton.patch_transformers():
            model.generate(ids, guidance_scale=1.5)
    """

    def __init__(self):
        from transformers.generation import utils

        self._utils = utils
        self._original = utils.UnbatchedClassifierFreeGuidanceLogitsProcessor
        utils.UnbatchedClassifierFreeGuidanceLogitsProcessor = UnbatchedCFGLogitsProcessor

    def undo(self):
        self._utils.UnbatchedClassifierFreeGuidanceLogitsProcessor = self._original

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False
