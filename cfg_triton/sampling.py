"""`cfg_triton.sample`: the next token drawn from both branches' logits, guided and warped.

The drawn token is `argmax over kept tokens of (s_i + T·ln2·g_i)` (Gumbel-max, an exact draw from
`softmax(s / T)` restricted to the kept tokens), where `s` are the guided scores of `guidance`, `T`
the temperature and `g` the counter-based base-2 Gumbel noise of `cfg_triton.rng`, keyed by (seed,
row, step, token). Both paths below compute that same function, so they agree token for token up to float32
rounding of near ties.
"""
from __future__ import annotations

import contextlib
import functools
import numbers
from typing import NamedTuple

import torch

from . import rng, torch_impl
from .processors import MAX_TEMPERATURE
from .ops import _aligned, _num_sms, _per_row, _stats_scratch, checked_inputs, uses_triton

try:
    from .kernels import guidance as _guidance_kernels
    from .kernels import sampling as _kernels
except ImportError:  # pragma: no cover - exercised only where triton is absent
    _kernels = None


class Sample(NamedTuple):
    """`tokens`: int64 `[B]`; `logprobs`: float32 `[B]` (float64 for float64 logits)."""

    tokens: torch.Tensor
    logprobs: torch.Tensor


def _integers(name, value, like, *, low):
    """An int or an integer `[B]` tensor -> int64 `[B]` tensor on like's device (values >= low are
    checked on the CPU only)."""
    batch = like.shape[0]
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.Tensor)):
        raise TypeError(f"{name} must be an integer or an integer [B] tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must hold integers, got {value.dtype}")
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device} but the logits are on {like.device}")
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
            raise ValueError(f"{name} must be an integer or a [B] tensor with B = {batch}, got shape "
                             f"{tuple(value.shape)}")
        rows = value.to(torch.int64).expand(batch)
    else:
        rows = torch.full((batch,), _int64(name, value), dtype=torch.int64, device=like.device)
    if low is not None and rows.device.type == "cpu" and batch and bool((rows < low).any()):
        raise ValueError(f"{name} must be >= {low}")
    return rows


def _int64(name, value) -> int:
    # A seed or step beyond int64 would hash as its low 64 bits, alike with another's.
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{name} must fit in int64, got {value}")
    return int(value)


def _plain_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _filter_value(name, value, like, low, high, *, low_open=False):
    """A float or `[B]` tensor in [low, high] ((low, high] with low_open) -> (float, rows)."""
    scalar, rows = _per_row(name, value, like, unit_interval=False)
    values = [scalar] if rows is None else (rows.tolist() if rows.device.type == "cpu" else [])
    for v in values:
        if v > high or v < low or (low_open and v == low):
            raise ValueError(f"{name} must be in {'(' if low_open else '['}{low:g}, {high:g}], got {v:g}")
    return scalar, rows


def sample(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale, *, mix=None,
           normalize: bool = True, temperature=1.0, top_k=None, top_p=None, min_p=None, seed=0,
           step=0, row=None, return_logprobs: bool = False):
    """Draws one token per row from the guided distribution of `[B, V]` `cond`/`uncond` logits.

    The guided scores `s` are `guidance(cond, uncond, guidance_scale, mix=mix, normalize=normalize)`;
    then, in transformers' order, temperature, top-k, top-p and min-p (`None` turns a filter off,
    as do `top_k=0`, `top_p=1` and `min_p=0`), and a draw from what remains. `temperature=0` is
    greedy: the argmax of `s`, ties to the lowest index; temperatures go up to `MAX_TEMPERATURE`
    (1e6), where every draw is already uniform over the kept tokens. Every parameter may be a
    number or a `[B]` tensor (one request per row); `seed` and `step` are int64 integers or `[B]`
    tensors (distinct values draw distinct noise), and the draw is a pure function of (seed, row,
    step, token), so the same arguments give the same token on every device and path, and a step
    on CUDA never reads a value back to the host (float64 logits excepted: they take the torch path).
    `row` (an integer or `[B]` tensor, >= 0) is the row each draw is keyed by, each row's position
    by default: a server passes 0 so a request draws what it would alone, wherever it sits.

    Returns int64 token ids `[B]`, or `Sample(tokens, logprobs)` with `return_logprobs`: the
    chosen token's log-probability under the distribution it was drawn from (log-softmax of
    `s / T` over the kept tokens; for greedy rows, log-softmax of `s`).

    Masks and bad input follow `guidance`: a token that is `-inf` in `cond` is never drawn. A row
    with no finite guided score (all `-inf` in `cond`), or holding NaN or `+inf`, has no
    distribution: its token is -1 (an invalid id, so that an embedding lookup fails loudly) and
    its log-probability NaN. Top-k keeps every token tied with the k-th score; top-p keeps each
    token whose strictly higher-scoring tokens hold less than `top_p` of the mass (the threshold
    form of transformers' sort-and-cumsum, identical without ties).

    CUDA tensors (fp16, bf16, fp32) run Triton kernels that never write `[B, V]`: one read of both
    branches draws the unfiltered token; min-p, top-k and top-p check that draw in a second read
    and keep it when it survives every filter (the argmax over all tokens is then the argmax over
    the kept ones); otherwise re-reads find the exact thresholds and a last read draws above them
    (see `kernels/sampling.py` for the read budget). CPU tensors and float64 run the torch path:
    the guided scores up to a row constant (one `lerp` of the branches), the argmax or the noise,
    and for filters a ranking of the best 256 tokens, widened only when a row keeps all of them.
    """
    cond, uncond, mode, gamma, gamma_rows, mix_value, mix_rows = checked_inputs(
        cond, uncond, guidance_scale, mix, normalize)
    if cond.shape[1] == 0:
        raise ValueError("cond and uncond have an empty vocabulary (V = 0)")
    temp, temp_rows = _filter_value("temperature", temperature, cond, 0.0, MAX_TEMPERATURE)
    top_k = None if top_k is None else _integers("top_k", top_k, cond, low=0)
    top_p = None if top_p is None else _filter_value("top_p", top_p, cond, 0.0, 1.0, low_open=True)
    min_p = None if min_p is None else _filter_value("min_p", min_p, cond, 0.0, 1.0)
    if _plain_int(seed) and _plain_int(step) and row is None:
        keys = functools.partial(rng.row_keys, _int64("seed", seed), _int64("step", step),
                                 cond.shape[0], cond.device)
    else:
        seeds, steps = _integers("seed", seed, cond, low=None), _integers("step", step, cond, low=None)
        rows = None if row is None else _integers("row", row, cond, low=0)
        keys = functools.partial(rng.row_keys, seeds, steps, rows=rows)
    if cond.shape[0] == 0:
        dtype = torch.float64 if cond.dtype == torch.float64 else torch.float32
        out = Sample(torch.empty(0, dtype=torch.int64, device=cond.device),
                     torch.empty(0, dtype=dtype, device=cond.device))
        return out if return_logprobs else out.tokens
    if uses_triton(cond):
        out = _run_triton(cond, uncond, keys(), mode, gamma, gamma_rows, mix_value, mix_rows, temp,
                          temp_rows, min_p, top_k, top_p, return_logprobs)
    else:
        out = _torch_path(cond, uncond, keys, mode, gamma, gamma_rows, mix_value, mix_rows, temp,
                          temp_rows, top_k, top_p, min_p, return_logprobs)
    return out if return_logprobs else out.tokens


def _rows(scalar, rows, batch, device):
    """A per-row fp32 `[B]` tensor: the kernels take every parameter per row (one specialization
    for scalars and tensors alike)."""
    if rows is not None:
        return rows.to(torch.float32)
    return torch.full((batch,), scalar, dtype=torch.float32, device=device)


def _run_triton(cond, uncond, keys, mode, gamma, gamma_rows, mix, mix_rows, temp, temp_rows, min_p,
                top_k, top_p, return_logprobs):
    batch, vocab = cond.shape
    device = cond.device
    k = _kernels
    n_splits, split_len = _guidance_kernels.plan(batch, vocab, _num_sms(device))
    sizes = [batch * n_splits * k.SAMPLE_STATS, batch * n_splits * k.DRAW_STATS, batch * k.STATE,
             batch * n_splits * k.PIVOTS * 2]
    stats, draw, state, part = torch.split(_stats_scratch(device, sum(sizes))[: sum(sizes)], sizes)
    istate = torch.zeros(batch * k.ISTATE, dtype=torch.int64, device=device)
    tokens = torch.empty(batch, dtype=torch.int64, device=device)
    logprobs = torch.empty(batch, dtype=torch.float32, device=device) if return_logprobs else None
    noise = temp_rows is not None or temp > 0
    filtered = top_k is not None or top_p is not None
    params = [_rows(gamma, gamma_rows, batch, device), _rows(mix, mix_rows, batch, device),
              _rows(temp, temp_rows, batch, device),
              None if min_p is None else _rows(*min_p, batch, device),
              None if not filtered else (top_k if top_k is not None else
                                         torch.zeros(batch, dtype=torch.int64, device=device)),
              None if not filtered else _rows(*(top_p or (1.0, None)), batch, device)]
    key = None
    if cond.is_cuda:  # see ops._run_triton: everything Triton specializes on (fresh tensors align)
        key = (device.index, mode, cond.dtype, batch, vocab, cond.stride(0), uncond.stride(0),
               n_splits, _aligned(cond) and _aligned(uncond), min_p is None, filtered, noise,
               return_logprobs)
    with torch.cuda.device(device) if cond.is_cuda else contextlib.nullcontext():
        k.launch(cond, uncond, keys, tokens, logprobs, stats, draw, state, istate, part, mode,
                 *params, noise, n_splits, split_len, key)
    if logprobs is None:
        logprobs = torch.full((batch,), float("nan"), device=device)
    return Sample(tokens, logprobs)


def _column(scalar, rows, like):
    return rows.to(like.dtype)[:, None] if rows is not None else torch.full(
        (like.shape[0], 1), scalar, dtype=like.dtype, device=like.device)


# Tokens ranked first by the filtered torch path; it widens the ranking (x8, then the whole
# vocabulary) only for calls where a row's filters keep all of them.
_PREFIX = 256


def _torch_path(cond, uncond, keys, mode, gamma, gamma_rows, mix, mix_rows, temp, temp_rows, top_k,
                top_p, min_p, return_logprobs) -> Sample:
    """The reference semantics, written plainly: guided scores (up to a row constant, which no
    draw sees), each filter as a mask over the best-ranked tokens, then the Gumbel-max draw.
    `keys()` gives the row keys; greedy calls (temperature 0 for every row) need none."""
    compute = torch.float64 if cond.dtype == torch.float64 else torch.float32
    g = gamma if gamma_rows is None else gamma_rows[:, None]
    a = mix if mix_rows is None else mix_rows[:, None]
    s = torch_impl.guided_keys(cond, uncond, g, a, mode, compute)
    # NaN or +inf in the input makes the guided row (raw mode: the token) NaN, and max propagates
    # NaN: one reduction finds dead and poisoned rows, and the greedy token (the first maximum, as
    # argmax gives it; max is several times faster on the CPU).
    s_max, first = s.max(-1, keepdim=True)
    dead = ~(s_max[:, 0] > float("-inf"))
    s_max = torch.where(dead[:, None], torch.zeros_like(s_max), s_max)
    nan = torch.full_like(s_max[:, 0], float("nan"))
    t = _column(temp, temp_rows, s)
    greedy = t == 0
    t_safe = torch.where(greedy, torch.ones_like(t), t)
    sampled = temp_rows is not None or temp > 0
    filtered = sampled and (top_k is not None or top_p is not None or min_p is not None)
    if filtered:
        # Every filter keeps the tokens at or above a score threshold, so the kept set is a prefix
        # of the ranking: the draw and its log-probability need only that prefix.
        ranked, order, keep = _kept_prefix(s, s_max, t_safe, greedy | dead[:, None], top_k, top_p, min_p)
        noise = rng.gumbel_at(keys(), order, s.shape[1]).to(compute)
    elif sampled:  # every live token is kept; masked ones are -inf in s, and stay so under noise
        ranked, order, keep = s, None, None
        noise = rng.gumbel(keys(), s.shape[1]).to(compute)
    tokens = first[:, 0] if not sampled or bool(greedy.any()) else None
    logprobs = nan
    if sampled:
        noisy = noise.mul_(t * rng.LN2).add_(ranked)
        if keep is not None:
            noisy.masked_fill_(~keep, float("-inf"))
        best, drawn = noisy.max(-1, keepdim=True)
        if order is not None:  # the first maximum in token order, as over the whole vocabulary
            drawn = torch.where(noisy == best, order, s.shape[1]).amin(-1, keepdim=True)
        drawn = drawn[:, 0]
        tokens = drawn if tokens is None else torch.where(greedy[:, 0], tokens, drawn)
        if return_logprobs:  # log-softmax(s / T) over the kept tokens
            scaled = (ranked - s_max) / t_safe
            if keep is not None:
                scaled.masked_fill_(~keep, float("-inf"))
            logprobs = (s.gather(1, tokens[:, None])[:, 0] - s_max[:, 0]) / t_safe[:, 0] \
                - torch.logsumexp(scaled, dim=-1)
    if return_logprobs and (not sampled or bool(greedy.any())):  # greedy rows: log-softmax(s)
        plain = s.gather(1, tokens[:, None])[:, 0] - s_max[:, 0] - torch.logsumexp(s - s_max, dim=-1)
        logprobs = plain if not sampled else torch.where(greedy[:, 0], plain, logprobs)
    tokens = torch.where(dead, -1, tokens)
    logprobs = torch.where(dead, float("nan"), logprobs)
    return Sample(tokens, logprobs.to(compute))


def _kept_prefix(s, s_max, t, skip, top_k, top_p, min_p):
    """The best-ranked tokens of `[B, V]` scores `s` and which of them the filters keep:
    (scores `[B, L]` descending, their token ids, keep mask). `L` grows until, in every row not
    in `skip` (`[B, 1]`: greedy or dead rows), the filters drop the last ranked token, so that no
    kept token lies beyond the prefix."""
    vocab = s.shape[1]
    length = _PREFIX if top_k is None else max(_PREFIX, int(top_k.max()))
    whole = None  # the mass behind top-p where top-k does not bound it: every live token's
    while True:
        length = min(length, vocab)
        if length == vocab:
            ranked, order = torch.sort(s, dim=-1, descending=True, stable=True)
        else:
            ranked, order = torch.topk(s, length, dim=-1)
        keep = ranked > float("-inf")
        if top_k is not None:
            on = top_k[:, None] > 0
            kth = ranked.gather(1, (top_k.clamp(min=1, max=length) - 1)[:, None])
            keep &= (ranked >= kth) | ~on
            # Ties with the k-th score beyond the prefix would be kept too: widen.
            short = on & (ranked[:, -1:] == kth) & (kth > float("-inf"))
        else:
            short = torch.zeros_like(skip)
        if top_p is not None:
            p = _column(*top_p, s).double()
            mass = torch.where(keep, torch.exp((ranked - s_max) / t).double(), 0.0)
            total = mass.sum(-1, keepdim=True)
            if top_k is None or bool((top_k == 0).any()):
                if whole is None:  # computed once, however often the ranking widens
                    whole = torch.sub(s, s_max).div_(t).exp_().sum(-1, keepdim=True).double()
                total = whole if top_k is None else torch.where(top_k[:, None] > 0, total, whole)
            before = torch.cumsum(mass, dim=-1) - mass  # mass ranked strictly before each token
            # Tied tokens share the mass strictly above their score: that of the first of their run.
            starts = torch.ones_like(keep)
            starts[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
            first = torch.cummax(torch.where(starts, torch.arange(length, device=s.device), 0),
                                 dim=-1).values
            keep &= (before.gather(1, first) < p * total) | (p >= 1)
        if min_p is not None:
            m = _column(*min_p, s)
            keep &= ranked >= torch.where(m > 0, s_max + t * torch.log(m), float("-inf"))
        if length == vocab or not bool(((keep[:, -1:] | short) & ~skip).any()):
            return ranked, order, keep
        length *= 8
