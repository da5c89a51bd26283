"""Calling a transformers causal LM: one cached forward, positions from masks, a CPU matmul fix."""
from __future__ import annotations

import contextlib
import inspect

import torch


_FORWARD_PARAMS = {}


def _forward_params(model_type) -> frozenset:
    # A plain dict rather than lru_cache: torch.compile traces through this lookup.
    params = _FORWARD_PARAMS.get(model_type)
    if params is None:
        params = _FORWARD_PARAMS[model_type] = frozenset(inspect.signature(model_type.forward).parameters)
    return params


def forward_last(model, ids, mask, position_ids, cache, cache_position=None):
    """One forward over `ids` `[R, T]`; returns the last position's fp32 logits `[R, V]` and the cache.

    `cache_position` (`[T]`, the slots of a static cache being written) is passed to transformers
    versions whose models still take it; newer ones track it inside the cache.
    """
    params = _forward_params(type(model))
    # transformers 5 names the KV cache argument `cache`; 4.x names it `past_key_values`.
    kw = {"cache" if "cache" in params else "past_key_values": cache}
    if cache_position is not None and "cache_position" in params:
        kw["cache_position"] = cache_position
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=1, **kw)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    return out.logits[:, -1].float(), cache


def static_cache(model, rows: int, length: int):
    """A transformers `StaticCache` for `rows` sequences of up to `length` tokens.

    The keyword arguments after `max_cache_len` are what transformers 4.x requires; later versions
    size the cache lazily at its first update and ignore them.
    """
    from transformers import StaticCache

    weight = next(model.parameters())
    return StaticCache(config=model.config, max_cache_len=length, max_batch_size=rows,
                       device=weight.device, dtype=weight.dtype)


_NARROW_ROWS = 32


def _narrow_linear(self, x):
    rows = x.numel() // x.shape[-1]
    if rows > _NARROW_ROWS:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    out = (self.weight @ x.reshape(rows, -1).T).T.contiguous()
    if self.bias is not None:
        out += self.bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


@contextlib.contextmanager
def narrow_linears(model):
    """Computes a CPU model's linear layers as `W @ x.T` while few rows go through them.

    MKL's `F.linear` with 2 or 3 rows runs 2-3x slower than with 1 or 4, and a 2x batch at B = 1
    lands on it in every layer at every step. SmolLM2's output head (49,152 x 576) measured 15.5 ms
    at 2 rows through `F.linear` and 4.4 ms as `W @ x.T` (7.8 ms at 1 row either way).
    """
    # Exact nn.Linear only: subclasses (quantized layers and the like) keep their own forward.
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear
              and m.weight.device.type == "cpu" and "forward" not in vars(m)]
    for layer in layers:
        layer.forward = _narrow_linear.__get__(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def positions(mask):
    # Left padding must not shift positions: each row counts only its real tokens.
    return (mask.cumsum(-1) - 1).clamp(min=0)
