"""Calling a transformers causal LM: one cached forward, static caches, positions from masks, and a
thread-local CPU matmul route for few-row linear layers."""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
import time
import weakref

import torch
import torch.nn.functional as F


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


# Static caches handed back after a generation, per model and (rows, length): reusing one keeps its
# tensors' addresses, so a CUDA graph recorded for it replays instead of being recorded again.
_free_caches = weakref.WeakKeyDictionary()
_free_lock = threading.Lock()


def take_static_cache(model, rows: int, length: int):
    """A reset static cache from the pool (or a new one); give it back with `give_back_cache`."""
    with _free_lock:
        free = _free_caches.get(model, {}).get((rows, length))
        cache = free.pop() if free else None
    if cache is None:
        return static_cache(model, rows, length)
    cache.reset()
    return cache


def give_back_cache(model, rows: int, length: int, cache) -> None:
    with _free_lock:
        _free_caches.setdefault(model, {}).setdefault((rows, length), []).append(cache)


_NARROW_ROWS = 32


def _narrow_linear(x, weight, bias):
    rows = x.numel() // x.shape[-1]
    out = (weight @ x.reshape(rows, -1).T).T.contiguous()
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


_PLAIN = (torch.Tensor, torch.nn.Parameter)


class _NarrowLinears(torch.overrides.TorchFunctionMode):
    """Routes few-row CPU `F.linear` calls to `W @ x.T`; see `narrow_linears`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            # Plain dense CPU weights only: tensor subclasses (quantized, sharded) keep their path.
            if (type(weight) in _PLAIN and weight.device.type == "cpu" and x.dtype == weight.dtype
                    and x.numel() <= _NARROW_ROWS * x.shape[-1] and x.numel() > 0):
                return _narrow_linear(x, weight, bias)
        return func(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def narrow_product_is_faster() -> bool:
    """Whether this CPU's `W @ x.T` beats `F.linear` at 2 rows, timed once per process (~50 ms).

    Set `CFG_TRITON_NARROW_LINEAR=1` or `0` to force the answer. The gap depends on the CPU and its
    BLAS: on an AMD EPYC `F.linear` at 2 rows ran 2-3x slower than `W @ x.T`; on an Intel Xeon
    `W @ x.T` ran 3x slower than `F.linear` (bench/results/narrow-linear.txt).
    """
    forced = os.environ.get("CFG_TRITON_NARROW_LINEAR")
    if forced in ("0", "1"):
        return forced == "1"
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(8192, 576, generator=gen), torch.randn(2, 576, generator=gen)

    def best(fn):
        fn()
        times = []
        for _ in range(7):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.inference_mode():
        return best(lambda: _narrow_linear(x, weight, None)) < 0.8 * best(lambda: F.linear(x, weight))


@contextlib.contextmanager
def narrow_linears(model):
    """Computes few-row CPU linear layers as `W @ x.T` in this thread while the block runs, where
    that measured faster on this CPU (`narrow_product_is_faster`).

    Where MKL's `F.linear` with 2 or 3 rows is slow, a 2x batch at B = 1 lands on it in every layer
    at every step. A torch function mode, not a patch of the model: modes are thread-local, so the
    model and every other thread using it keep their usual `forward`. The mode costs a few µs per
    torch call in this thread, so it is entered only where the product pays for it.
    """
    weight = next(model.parameters(), None)
    if weight is None or weight.device.type != "cpu" or not narrow_product_is_faster():
        yield
        return
    with _NarrowLinears():
        yield


def positions(mask):
    # Left padding must not shift positions: each row counts only its real tokens.
    return (mask.cumsum(-1) - 1).clamp(min=0)
