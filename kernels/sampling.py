"""Guided sampling: one read of both branches in, token ids out.

Argmax, temperature, min-p and Gumbel noise ignore a per-row constant, and every guided score is a
per-token key plus a constant per group (tokens live in both branches: `c + κ (u − c)`; tokens
masked only in uncond: `c`; see `token_logprobs.py`). The kernels work with σ, the guided score
on the live group's key scale (`_sigma`): σ = key for live tokens, `c − δ` for the others, where
δ, the difference of the two groups' constants, comes from the guidance statistics.

So one statistics pass draws the token: each split keeps its best live key, its best noisy live
key `key + T·ln2·g` (`g` the base-2 Gumbel noise of `cfg_triton.rng`), the online sum of
`exp(key / T)` for log-probabilities, and the best key among tokens masked in uncond alone. In the
common case that group is empty and nothing else is needed: no guidance statistics at all (a
row's constant changes no draw). Rows where it is not empty (known after the pass) get the
guidance statistics for δ and a pass over that group (its noisy winner and sum); every other row
returns at once from both. A per-row finish merges the splits and picks the token. Greedy is T = 0.

Every filter keeps the tokens at or above a threshold: min-p's is `σ_max + T ln(min_p)`, top-k's
the k-th score, top-p's the lowest score whose strictly higher tokens hold less than `top_p` of the
(top-k) mass. The unfiltered draw stands when it is kept: the argmax of `σ + T·ln2·g` over all
tokens is then the argmax over the kept ones. For min-p alone the finish knows; with top-k or
top-p a check pass (one re-read) counts the tokens and mass above the draw. Otherwise, and whenever
a log-probability under the filtered distribution is asked for, search passes find the exact
thresholds: each re-read counts tokens and mass at 16 pivots spread over the order-preserving
int32 codes of the scores between the bounds found so far, so a threshold is exact after at most 8
re-reads. A last read draws among the kept tokens only.

Reads of both branches: greedy and temperature 1; min-p 1, or 2 when the draw falls below the
threshold; top-p 2 when the draw is kept (probability at least `top_p`), at most 1 + 1 + 8 + 1 = 11
otherwise (expected at most 2 + 9 (1 - top_p), 2.9 at 0.9); top-k and top-p together at most 19.
Rows with tokens masked in uncond alone read up to twice more. Every pass is launched whatever the
data, and rows with nothing left to do return at once, so nothing waits on the host. Nothing of
size `[B, V]` is written. Each streaming loop keeps per-lane running statistics, as `guidance.py`
describes.

Per (row, split), SAMPLE_STATS floats: the guidance statistics (slots 0-6, as `guidance.py`; only
for rows with tokens masked in uncond alone), 1.0 if the split holds NaN or +inf, then (best,
index) pairs: noisy live, noisy masked, plain live, plain masked; then (max, sum) of `exp(key / T)`
for live and masked tokens. Indices are int32 bits.
"""
import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

from cfg_triton.modes import INTERPOLATED, NORMALIZED, RAW

from .guidance import (_BYTES, _FLOOR, _LOG2E, _MAX_SPLITS, BLOCK, MAX_SPLITS, NUM_WARPS, _columns,
                       _guidance_stats_kernel, _lanes_lse, _lanes_total, _load_full, _load_tile,
                       _row_constants, _row_start, _run, _whole_tiles_end, group,
                       launch_group)
from .token_logprobs import (_NO_INDEX, _best_of_lanes, _group_keys, _is_poisoned, _kappa,
                             _lanes_best, _lanes_poison, _pick, _split_best, _split_sum, _store_best)

SAMPLE_STATS = 20
_SAMPLE_STATS = tl.constexpr(SAMPLE_STATS)
DRAW_STATS = 4  # per (row, split) of the draw pass: best, index, max, sum
_DRAW_STATS = tl.constexpr(DRAW_STATS)
# Per row between passes, fp32: pending draw (1.0 or 0.0), its threshold, σ_max, 1/T, the
# unfiltered draw's σ, the top-k mass Z_k, the min-p threshold, the mass at the search's lo, δ.
STATE = 10
_STATE = tl.constexpr(STATE)
# Per row, int64: search phase, lo, hi (order-preserving int codes of fp32 scores).
ISTATE = 4
_ISTATE = tl.constexpr(ISTATE)
_IDLE = tl.constexpr(0)
_CHECK = tl.constexpr(1)
_TOP_K = tl.constexpr(2)
_TOP_P = tl.constexpr(3)
PIVOTS = 16
# A search narrows a code interval of at most 2**32 by a factor PIVOTS per pass: 8 passes per
# threshold, after one pass that checks the unfiltered draw.
SEARCH_PASSES = 1 + 8 + 8
_CODE_MIN = tl.constexpr(-2139095040)  # the code of -FLT_MAX; -inf is one below
_RAW = tl.constexpr(RAW)
_INTERPOLATED = tl.constexpr(INTERPOLATED)
_LN2 = tl.constexpr(0.6931471805599453)
MASKED_KEY = 14  # the statistics slot of a split's best key among tokens masked in uncond alone
_MASKED_KEY = tl.constexpr(MASKED_KEY)
# The interpreter runs numpy and knows no libdevice: it takes the exact log2.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _mix32(h):
    """The MurmurHash3 32-bit finalizer (uint32 in, uint32 out); `cfg_triton.rng.mix32` in torch."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _hash_constants(keys_ptr, row):
    """A row's token-hash multiplier and offset (`cfg_triton.rng.token_hash_constants`)."""
    key = tl.load(keys_ptr + row).to(tl.uint32)
    return key | 1, _mix32(key)


@triton.jit
def _log2(x):
    """log2 in one MUFU.LG2 (the hardware approximation, within 2**-22 relative; exact below 1e-7
    relative is all a Gumbel key needs: draws differ only at such near ties)."""
    if _INTERPRETED:
        return tl.math.log2(x)
    else:
        return libdevice.fast_log2f(x)


@triton.jit
def _noise(multiplier, offset, idx):
    """Base-2 Gumbel noise of tokens `idx` (`cfg_triton.rng.gumbel`): one finalizer, then
    `u = (k + 1/2) 2**-23` built from the hash's top 23 bits as a float in [1, 2) minus
    (1 - 2**-24) (exact), and two hardware log2."""
    h = _mix32(idx.to(tl.uint32) * multiplier + offset)
    u = ((h >> 9) | 0x3F800000).to(tl.float32, bitcast=True) - 0.999999940395355224609375
    return -_log2(-_log2(u))


@triton.jit
def _inverse_temperature(temp):
    # Greedy rows (T = 0) report log-probabilities at T = 1: their partition sums use 1/T = 1.
    return 1.0 / tl.where(temp > 0, temp, 1.0)


@triton.jit
def _sample_row(c_ptr, u_ptr, stride_c, stride_u, gamma_ptr, mix_ptr, temp_ptr):
    """This program's row: its row pointers and its γ, α and temperature (all per row: one
    specialization serves scalars and tensors alike)."""
    row, c_row, u_row, gamma = _row_start(c_ptr, u_ptr, stride_c, stride_u, 0.0, gamma_ptr, True)
    return row, c_row, u_row, gamma, tl.load(mix_ptr + row), tl.load(temp_ptr + row)


@triton.jit
def _sample_fold(c, u, offset, lanes, kappa, t_ln2, inv_t, multiplier, hash_offset, live_best,
                 live_at, masked_best, masked_at, noisy_best, noisy_at, z_max, z_sum, worst,
                 NOISE: tl.constexpr, PARTITION: tl.constexpr, BLOCK: tl.constexpr,
                 GROUP: tl.constexpr):
    cs = _columns(c, BLOCK, GROUP)
    us = _columns(u, BLOCK, GROUP)
    for e in tl.static_range(GROUP):
        live_key, masked_key = _group_keys(cs[e], us[e], kappa)
        live_best, live_at = _lanes_best(live_key, offset + e, live_best, live_at)
        masked_best, masked_at = _lanes_best(masked_key, offset + e, masked_best, masked_at)
        if NOISE:
            noise = _noise(multiplier, hash_offset, lanes * GROUP + (offset + e))
            noisy_best, noisy_at = _lanes_best(live_key + t_ln2 * noise, offset + e, noisy_best,
                                               noisy_at)
        if PARTITION:
            z_max, z_sum, _, _ = _lanes_lse(z_max, z_sum, live_key * inv_t)
        worst = _lanes_poison(worst, cs[e], us[e])
    return live_best, live_at, masked_best, masked_at, noisy_best, noisy_at, z_max, z_sum, worst


@triton.jit
def _sample_stats_kernel(
    c_ptr, u_ptr, stats_ptr, keys_ptr, gamma_ptr, mix_ptr, temp_ptr, V, stride_c, stride_u,
    split_len,
    MODE: tl.constexpr, NOISE: tl.constexpr, PARTITION: tl.constexpr, BLOCK: tl.constexpr,
    GROUP: tl.constexpr,
):
    """The one read every draw makes, live group only (tokens masked in uncond alone are only
    found here: `_sample_masked_kernel` and the guidance statistics follow for their rows)."""
    row, c_row, u_row, gamma, mix, temp = _sample_row(c_ptr, u_ptr, stride_c, stride_u, gamma_ptr,
                                                      mix_ptr, temp_ptr)
    split = tl.program_id(1)
    kappa = _kappa(gamma, mix, MODE)
    inv_t = _inverse_temperature(temp)
    t_ln2 = temp * _LN2
    multiplier, hash_offset = _hash_constants(keys_ptr, row)
    lanes = tl.arange(0, BLOCK // GROUP)
    live_best = tl.full([BLOCK // GROUP], float("-inf"), tl.float32)
    live_at = tl.zeros([BLOCK // GROUP], dtype=tl.int32)
    masked_best, masked_at, noisy_best, noisy_at, worst = live_best, live_at, live_best, live_at, live_best
    z_max = tl.full([BLOCK // GROUP], _FLOOR, tl.float32)
    z_sum = tl.zeros([BLOCK // GROUP], dtype=tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, V)
    whole = _whole_tiles_end(start, end, BLOCK)
    for offset in range(start, whole, BLOCK):
        c, u = _load_full(c_row, u_row, offset + tl.arange(0, BLOCK))
        live_best, live_at, masked_best, masked_at, noisy_best, noisy_at, z_max, z_sum, worst = \
            _sample_fold(c, u, offset, lanes, kappa, t_ln2, inv_t, multiplier, hash_offset, live_best,
                         live_at, masked_best, masked_at, noisy_best, noisy_at, z_max, z_sum, worst,
                         NOISE, PARTITION, BLOCK, GROUP)
    if whole < end:
        c, u, _ = _load_tile(c_row, u_row, whole + tl.arange(0, BLOCK), end)
        live_best, live_at, masked_best, masked_at, noisy_best, noisy_at, z_max, z_sum, worst = \
            _sample_fold(c, u, whole, lanes, kappa, t_ln2, inv_t, multiplier, hash_offset, live_best,
                         live_at, masked_best, masked_at, noisy_best, noisy_at, z_max, z_sum, worst,
                         NOISE, PARTITION, BLOCK, GROUP)
    out = stats_ptr + (row * tl.num_programs(1) + split) * _SAMPLE_STATS
    tl.store(out + 7, _is_poisoned(worst).to(tl.float32))
    if NOISE:
        best, index = _best_of_lanes(noisy_best, noisy_at, BLOCK // GROUP, GROUP)
        _store_best(out + 8, best, index)
    # The masked group's slots hold "empty" unless `_sample_masked_kernel` fills them.
    _store_best(out + 10, float("-inf"), tl.full([], _NO_INDEX, tl.int32))
    best, index = _best_of_lanes(live_best, live_at, BLOCK // GROUP, GROUP)
    _store_best(out + 12, best, index)
    best, index = _best_of_lanes(masked_best, masked_at, BLOCK // GROUP, GROUP)
    _store_best(out + 14, best, index)
    top, total = _lanes_total(z_max, z_sum)
    tl.store(out + 16, top)
    tl.store(out + 17, total)
    tl.store(out + 18, float("-inf"))
    tl.store(out + 19, 0.0)


@triton.jit
def _masked_fold(c, u, offset, lanes, t_ln2, inv_t, multiplier, hash_offset, noisy_best, noisy_at,
                 z_max, z_sum, NOISE: tl.constexpr, PARTITION: tl.constexpr, BLOCK: tl.constexpr,
                 GROUP: tl.constexpr):
    cs = _columns(c, BLOCK, GROUP)
    us = _columns(u, BLOCK, GROUP)
    for e in tl.static_range(GROUP):
        key = tl.where(us[e] == float("-inf"), cs[e], float("-inf"))
        if NOISE:
            noise = _noise(multiplier, hash_offset, lanes * GROUP + (offset + e))
            noisy_best, noisy_at = _lanes_best(key + t_ln2 * noise, offset + e, noisy_best, noisy_at)
        if PARTITION:
            z_max, z_sum, _, _ = _lanes_lse(z_max, z_sum, key * inv_t)
    return noisy_best, noisy_at, z_max, z_sum


@triton.jit
def _sample_masked_kernel(
    c_ptr, u_ptr, stats_ptr, keys_ptr, temp_ptr, V, stride_c, stride_u, split_len,
    NOISE: tl.constexpr, PARTITION: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr,
):
    """For rows with tokens masked in uncond alone (rare): that group's noisy winner and partition
    sum, which the statistics pass left empty."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    stats_row = stats_ptr + row * n_splits * _SAMPLE_STATS
    if _split_best(stats_row, _MASKED_KEY, n_splits, _SAMPLE_STATS, _MAX_SPLITS) == _NO_INDEX:
        return
    c_row = c_ptr + row.to(tl.int64) * stride_c
    u_row = u_ptr + row.to(tl.int64) * stride_u
    temp = tl.load(temp_ptr + row)
    inv_t = _inverse_temperature(temp)
    t_ln2 = temp * _LN2
    multiplier, hash_offset = _hash_constants(keys_ptr, row)
    lanes = tl.arange(0, BLOCK // GROUP)
    noisy_best = tl.full([BLOCK // GROUP], float("-inf"), tl.float32)
    noisy_at = tl.zeros([BLOCK // GROUP], dtype=tl.int32)
    z_max = tl.full([BLOCK // GROUP], _FLOOR, tl.float32)
    z_sum = tl.zeros([BLOCK // GROUP], dtype=tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, V)
    whole = _whole_tiles_end(start, end, BLOCK)
    for offset in range(start, whole, BLOCK):
        c, u = _load_full(c_row, u_row, offset + tl.arange(0, BLOCK))
        noisy_best, noisy_at, z_max, z_sum = _masked_fold(
            c, u, offset, lanes, t_ln2, inv_t, multiplier, hash_offset, noisy_best, noisy_at, z_max,
            z_sum, NOISE, PARTITION, BLOCK, GROUP)
    if whole < end:
        c, u, _ = _load_tile(c_row, u_row, whole + tl.arange(0, BLOCK), end)
        noisy_best, noisy_at, z_max, z_sum = _masked_fold(
            c, u, whole, lanes, t_ln2, inv_t, multiplier, hash_offset, noisy_best, noisy_at, z_max,
            z_sum, NOISE, PARTITION, BLOCK, GROUP)
    out = stats_row + split * _SAMPLE_STATS
    if NOISE:
        best, index = _best_of_lanes(noisy_best, noisy_at, BLOCK // GROUP, GROUP)
        _store_best(out + 10, best, index)
    if PARTITION:
        top, total = _lanes_total(z_max, z_sum)
        tl.store(out + 18, top)
        tl.store(out + 19, total)


@triton.jit
def _split_logsum(stats_row, max_slot: tl.constexpr, n_splits, STRIDE: tl.constexpr,
                  MAX_SPLITS: tl.constexpr):
    """log Σ exp over a group from its per-split (max, sum) pairs; -inf for an empty group."""
    j = tl.arange(0, MAX_SPLITS)
    live = j < n_splits
    m = tl.load(stats_row + j * STRIDE + max_slot, mask=live, other=float("-inf"))
    s = tl.load(stats_row + j * STRIDE + max_slot + 1, mask=live, other=0.0)
    top = tl.max(m, axis=0)
    ref = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(s * tl.exp(m - ref), axis=0)
    return tl.where(total > 0, ref + tl.log(total), float("-inf"))


@triton.jit
def _split_max(stats_row, slot: tl.constexpr, n_splits, STRIDE: tl.constexpr,
               MAX_SPLITS: tl.constexpr):
    """The largest of a row's per-split values at `slot`."""
    j = tl.arange(0, MAX_SPLITS)
    return tl.max(tl.load(stats_row + j * STRIDE + slot, mask=j < n_splits, other=float("-inf")),
                  axis=0)


@triton.jit
def _sigma(c, u, kappa, delta):
    """σ, the guided score on the live tokens' key scale: `c + κ (u − c)` for live tokens, `c − δ`
    for tokens masked in uncond alone (δ puts their group on the same scale), -inf for tokens
    masked in cond."""
    s = tl.where(u == float("-inf"), c - delta, c + kappa * (u - c))
    return tl.where(c == float("-inf"), float("-inf"), s)


@triton.jit
def _sigma_at(c_row, u_row, i, kappa, delta):
    return _sigma(tl.load(c_row + i).to(tl.float32), tl.load(u_row + i).to(tl.float32), kappa, delta)


@triton.jit
def _masked_offset(stats_row, n_splits, gamma, mix, MODE: tl.constexpr):
    """δ: the masked group's key offset relative to the live group's (guided score = key - A per
    group, δ = A_masked - A_live), from the row's guidance statistics. 0 in raw mode."""
    delta = 0.0
    if MODE != _RAW:
        c_ref, u_ref, lse_c, live_const, masked_const = _row_constants(
            stats_row, n_splits, gamma, _SAMPLE_STATS, MODE, _MAX_SPLITS)
        delta = masked_const - live_const - (1.0 - gamma) * (u_ref - c_ref)
        if MODE == _INTERPOLATED:
            delta = mix * delta
    return delta


@triton.jit
def _sample_finish_kernel(
    c_ptr, u_ptr, tokens_ptr, logprobs_ptr, stats_ptr, state_ptr, keys_ptr, gamma_ptr, mix_ptr,
    temp_ptr, min_p_ptr, istate_ptr, V, stride_c, stride_u, n_splits,
    MODE: tl.constexpr, MIN_P: tl.constexpr, NOISE: tl.constexpr, LOGPROBS: tl.constexpr,
    FILTERS: tl.constexpr, MAX_SPLITS: tl.constexpr,
):
    row, c_row, u_row, gamma, mix, temp = _sample_row(c_ptr, u_ptr, stride_c, stride_u, gamma_ptr,
                                                      mix_ptr, temp_ptr)
    stats_row = stats_ptr + row * n_splits * _SAMPLE_STATS
    kappa = _kappa(gamma, mix, MODE)
    live = _split_best(stats_row, 12, n_splits, _SAMPLE_STATS, MAX_SPLITS)
    masked = _split_best(stats_row, 14, n_splits, _SAMPLE_STATS, MAX_SPLITS)
    has_masked = masked != _NO_INDEX
    # Without tokens masked in uncond alone (the common case) the guidance statistics were never
    # computed, and nothing needs them.
    delta = 0.0
    if has_masked:
        delta = _masked_offset(stats_row, n_splits, gamma, mix, MODE)
    live_at = tl.where(live == _NO_INDEX, 0, live)
    masked_at = tl.where(has_masked, masked, 0)
    live_top = tl.where(live == _NO_INDEX, float("-inf"), _sigma_at(c_row, u_row, live_at, kappa, delta))
    masked_top = tl.where(has_masked, _sigma_at(c_row, u_row, masked_at, kappa, delta), float("-inf"))
    token, s_max = _pick(live, live_top, masked, masked_top)
    dead = (token == _NO_INDEX) | (_split_sum(stats_row, 7, n_splits, _SAMPLE_STATS, MAX_SPLITS) > 0)
    score = s_max
    if NOISE:  # T > 0 rows take the noisy winner; greedy rows keep the plain one
        noisy_live = _split_best(stats_row, 8, n_splits, _SAMPLE_STATS, MAX_SPLITS)
        noisy_masked = _split_best(stats_row, 10, n_splits, _SAMPLE_STATS, MAX_SPLITS)
        live_noisy = _split_max(stats_row, 8, n_splits, _SAMPLE_STATS, MAX_SPLITS)
        masked_noisy = _split_max(stats_row, 10, n_splits, _SAMPLE_STATS, MAX_SPLITS) - delta
        noisy, _ = _pick(noisy_live, live_noisy, noisy_masked, masked_noisy)
        sampled = temp > 0
        token = tl.where(sampled, noisy, token)
        noisy_score = _sigma_at(c_row, u_row, tl.where(noisy == _NO_INDEX, 0, noisy), kappa, delta)
        score = tl.where(sampled, noisy_score, score)
    inv_t = _inverse_temperature(temp)
    if LOGPROBS:
        # log Σ exp((σ - σ_max) / T) from each group's Σ exp(key / T).
        live_z = _split_logsum(stats_row, 16, n_splits, _SAMPLE_STATS, MAX_SPLITS) - s_max * inv_t
        masked_z = _split_logsum(stats_row, 18, n_splits, _SAMPLE_STATS, MAX_SPLITS) \
            - (s_max + delta) * inv_t
        top_z = tl.maximum(live_z, masked_z)
        ref = tl.where(top_z == float("-inf"), 0.0, top_z)
        log_z = ref + tl.log(tl.exp(live_z - ref) + tl.exp(masked_z - ref))
        lp = (score - s_max) * inv_t - log_z
        tl.store(logprobs_ptr + row, tl.where(dead, float("nan"), lp))
    pending = 0.0
    threshold = float("-inf")
    if MIN_P:
        min_p = tl.load(min_p_ptr + row)
        threshold = tl.where((min_p > 0) & (temp > 0), s_max + temp * tl.log(min_p), float("-inf"))
        # The unfiltered draw stands when it is kept; a filtered log-probability needs the kept mass.
        redraw = score < threshold
        if LOGPROBS:
            redraw = redraw | (threshold > float("-inf"))
        pending = tl.where(redraw & (dead == 0), 1.0, 0.0)
    state = state_ptr + row * _STATE
    if FILTERS:  # top-k / top-p: the search passes check the draw, and find the threshold if needed
        searching = tl.where((temp > 0) & (dead == 0), _CHECK, _IDLE)
        tl.store(istate_ptr + row * _ISTATE, searching.to(tl.int64))
        tl.store(state + 4, score)
        tl.store(state + 6, threshold)
        pending = 0.0
    tl.store(state + 0, pending)
    tl.store(state + 1, threshold)
    tl.store(state + 2, s_max)
    tl.store(state + 3, inv_t)
    tl.store(state + 8, delta)
    tl.store(tokens_ptr + row, tl.where(dead, -1, token).to(tl.int64))


@triton.jit
def _code(s):
    """Order-preserving int32 codes of fp32 values (-0.0 counts as +0.0)."""
    bits = (s + 0.0).to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _value(code):
    """The fp32 value of an int code (`_code`'s inverse)."""
    bits = code.to(tl.int32)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _pivots(phase, lo, hi, s_x0, PIVOTS: tl.constexpr):
    """Where a pass counts `code >= pivot`: evenly inside (lo, hi) while searching; while checking
    the unfiltered draw x0, just above its code, at it, and at the lowest finite code."""
    j = tl.arange(0, PIVOTS).to(tl.int64)
    search = lo + 1 + (j * (hi - lo - 1)) // PIVOTS
    x0 = _code(s_x0).to(tl.int64)
    check = tl.where(j == 0, x0 + 1, tl.where(j == 1, x0, _CODE_MIN))
    # Every pivot is a code or one past the largest finite one: int32 holds them all.
    return tl.where(phase == _CHECK, check, search).to(tl.int32)


@triton.jit
def _tally(s, s_max, inv_t, pivots, counts, masses, PIVOTS: tl.constexpr):
    """Adds one entry per lane (σ `s`) to the lanes' counts and masses at or above each pivot."""
    codes = _code(s)
    weights = tl.math.exp2((s - s_max) * inv_t)  # 0 for masked tokens, whose code is below every pivot
    new_counts = ()
    new_masses = ()
    for j in tl.static_range(PIVOTS):
        above = codes >= pivots[j]
        new_counts = new_counts + (counts[j] + above.to(tl.float32),)
        new_masses = new_masses + (masses[j] + tl.where(above, weights, 0.0),)
    return new_counts, new_masses


@triton.jit
def _search_fold(c, u, kappa, delta, s_max, inv_t, pivots, counts, masses, PIVOTS: tl.constexpr,
                 BLOCK: tl.constexpr, GROUP: tl.constexpr):
    cs = _columns(c, BLOCK, GROUP)
    us = _columns(u, BLOCK, GROUP)
    for e in tl.static_range(GROUP):
        counts, masses = _tally(_sigma(cs[e], us[e], kappa, delta), s_max, inv_t, pivots, counts,
                                masses, PIVOTS)
    return counts, masses


@triton.jit
def _sample_search_kernel(
    c_ptr, u_ptr, part_ptr, state_ptr, istate_ptr, gamma_ptr, mix_ptr, temp_ptr,
    V, stride_c, stride_u, split_len, n_splits,
    MODE: tl.constexpr, PIVOTS: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr,
):
    """One re-read for rows still searching: per pivot, the count and the mass (Σ exp((σ - σ_max)
    / T)) of tokens whose σ's code is at least the pivot, per split."""
    row = tl.program_id(0)
    phase = tl.load(istate_ptr + row * _ISTATE)
    if phase == _IDLE:
        return
    lo = tl.load(istate_ptr + row * _ISTATE + 1)
    hi = tl.load(istate_ptr + row * _ISTATE + 2)
    row, c_row, u_row, gamma, mix, temp = _sample_row(c_ptr, u_ptr, stride_c, stride_u, gamma_ptr,
                                                      mix_ptr, temp_ptr)
    split = tl.program_id(1)
    state = state_ptr + row * _STATE
    s_max = tl.load(state + 2)
    inv_t = tl.load(state + 3) * _LOG2E  # the mass is summed in base 2
    kappa = _kappa(gamma, mix, MODE)
    delta = tl.load(state + 8)
    every = _pivots(phase, lo, hi, tl.load(state + 4), PIVOTS)
    pivots = ()
    counts = ()
    for j in tl.static_range(PIVOTS):
        pivots = pivots + (_at(every, j, PIVOTS),)
        counts = counts + (tl.zeros([BLOCK // GROUP], dtype=tl.float32),)
    masses = counts
    lanes = tl.arange(0, BLOCK)
    start = split * split_len
    end = tl.minimum(start + split_len, V)
    whole = _whole_tiles_end(start, end, BLOCK)
    for offset in range(start, whole, BLOCK):
        c, u = _load_full(c_row, u_row, offset + lanes)
        counts, masses = _search_fold(c, u, kappa, delta, s_max, inv_t, pivots, counts, masses, PIVOTS,
                                      BLOCK, GROUP)
    if whole < end:
        c, u, _ = _load_tile(c_row, u_row, whole + lanes, end)
        counts, masses = _search_fold(c, u, kappa, delta, s_max, inv_t, pivots, counts, masses, PIVOTS,
                                      BLOCK, GROUP)
    out = part_ptr + (row * n_splits + split) * PIVOTS * 2
    for j in tl.static_range(PIVOTS):
        tl.store(out + 2 * j, tl.sum(counts[j], axis=0))
        tl.store(out + 2 * j + 1, tl.sum(masses[j], axis=0))


@triton.jit
def _bisect(values, target, pivots, lo, hi, PIVOTS: tl.constexpr):
    """Narrows (lo, hi), where F(lo) >= target > F(hi) for a decreasing F, with F at the pivots:
    (new lo, new hi, index of the pivot that became lo or -1)."""
    j = tl.arange(0, PIVOTS)
    reached = values >= target  # a prefix of the increasing pivots
    new_lo = tl.max(tl.where(reached, pivots, lo), axis=0)
    new_hi = tl.min(tl.where(reached, hi, pivots), axis=0)
    return new_lo, new_hi, tl.max(tl.where(reached, j, -1), axis=0)


@triton.jit
def _at(values, index, PIVOTS: tl.constexpr):
    """values[index] of a `[PIVOTS]` tensor, in its own dtype."""
    return tl.sum(tl.where(tl.arange(0, PIVOTS) == index, values, 0), axis=0)


@triton.jit
def _sample_step_kernel(
    part_ptr, state_ptr, istate_ptr, top_k_ptr, top_p_ptr, n_splits,
    LOGPROBS: tl.constexpr, MAX_SPLITS: tl.constexpr, PIVOTS: tl.constexpr,
):
    """Per row, after a search pass: merges the splits in order and moves the row's search on
    (check -> top-k threshold -> top-p threshold -> a pending draw above the threshold)."""
    row = tl.program_id(0)
    ist = istate_ptr + row * _ISTATE
    phase = tl.load(ist)
    if phase == _IDLE:
        return
    state = state_ptr + row * _STATE
    lo = tl.load(ist + 1)
    hi = tl.load(ist + 2)
    s_max = tl.load(state + 2)
    pivots = _pivots(phase, lo, hi, tl.load(state + 4), PIVOTS)
    sp = tl.arange(0, MAX_SPLITS)[:, None]
    part = part_ptr + ((row * n_splits + sp) * PIVOTS + tl.arange(0, PIVOTS)[None, :]) * 2
    count = tl.sum(tl.load(part, mask=sp < n_splits, other=0.0), axis=0)
    mass = tl.sum(tl.load(part + 1, mask=sp < n_splits, other=0.0), axis=0)
    k = tl.load(top_k_ptr + row).to(tl.float32)
    p = tl.load(top_p_ptr + row)
    p_on = p < 1.0
    min_p_floor = tl.load(state + 6)
    top = _code(s_max).to(tl.int64) + 1
    next_phase = phase
    threshold = min_p_floor
    if phase == _CHECK:
        total = _at(mass, 2, PIVOTS)
        k_on = (k > 0) & (k < _at(count, 2, PIVOTS))  # k at least the finite tokens keeps them all
        above = _at(mass, 0, PIVOTS)
        # With top-k, top-p's mass is the top-k set's, at least the mass at or above x0: a
        # sufficient test here, the exact one after the searches.
        ok_p = tl.where(k_on, above < p * _at(mass, 1, PIVOTS), above < p * total)
        accept = ((k_on == 0) | (_at(count, 0, PIVOTS) < k)) & ((p_on == 0) | ok_p) \
            & (tl.load(state + 4) >= min_p_floor)
        if LOGPROBS:  # a filtered log-probability needs the kept mass: the draw pass sums it
            accept = accept & (k_on == 0) & (p_on == 0) & (min_p_floor == float("-inf"))
        search = tl.where(k_on, _TOP_K, tl.where(p_on, _TOP_P, _IDLE))
        next_phase = tl.where(accept, _IDLE, search).to(tl.int64)
        tl.store(ist + 1, lo * 0 + _CODE_MIN)  # both searches start from the lowest finite code
        tl.store(ist + 2, top)
        tl.store(state + 5, total)
        tl.store(state + 7, total)
        tl.store(state + 0, tl.where(accept | (next_phase != _IDLE), 0.0, 1.0))
    else:
        target = tl.where(phase == _TOP_K, k, p * tl.load(state + 5))
        values = tl.where(phase == _TOP_K, count, mass)
        new_lo, new_hi, j_lo = _bisect(values, target, pivots, lo, hi, PIVOTS)
        mass_lo = tl.where(j_lo >= 0, _at(mass, j_lo, PIVOTS), tl.load(state + 7))
        done = new_hi == new_lo + 1
        to_top_p = done & (phase == _TOP_K) & p_on
        # Entering the top-p search: its lo is the top-k threshold, its target p times that mass.
        tl.store(state + 5, tl.where(to_top_p, mass_lo, tl.load(state + 5)))
        tl.store(state + 7, mass_lo)
        tl.store(ist + 1, new_lo)
        tl.store(ist + 2, tl.where(to_top_p, top, new_hi))
        next_phase = tl.where(done, tl.where(to_top_p, _TOP_P, _IDLE), phase).to(tl.int64)
        threshold = tl.maximum(_value(new_lo), min_p_floor)
        tl.store(state + 0, tl.where(done & (to_top_p == 0), 1.0, 0.0))
    tl.store(ist, next_phase)
    tl.store(state + 1, threshold)


@triton.jit
def _draw_fold(c, u, offset, lanes, kappa, delta, threshold, s_max, t_ln2, inv_t, multiplier,
               hash_offset, best, best_at, mass, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    cs = _columns(c, BLOCK, GROUP)
    us = _columns(u, BLOCK, GROUP)
    for e in tl.static_range(GROUP):
        s = _sigma(cs[e], us[e], kappa, delta)
        kept = s >= threshold
        noise = _noise(multiplier, hash_offset, lanes * GROUP + (offset + e))
        best, best_at = _lanes_best(tl.where(kept, s + t_ln2 * noise, float("-inf")), offset + e, best,
                                    best_at)
        mass += tl.where(kept, tl.math.exp2((s - s_max) * inv_t), 0.0)
    return best, best_at, mass


@triton.jit
def _sample_draw_kernel(
    c_ptr, u_ptr, draw_ptr, state_ptr, keys_ptr, gamma_ptr, mix_ptr, temp_ptr,
    V, stride_c, stride_u, split_len, n_splits,
    MODE: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr,
):
    """Second read, for rows the finish marked pending: the noisy argmax of `σ + T·ln2·g` over kept
    tokens (`σ >= threshold`), and Σ exp((σ - σ_max) / T) over them, per split."""
    row = tl.program_id(0)
    state = state_ptr + row * _STATE
    if tl.load(state + 0) == 0.0:
        return
    row, c_row, u_row, gamma, mix, temp = _sample_row(c_ptr, u_ptr, stride_c, stride_u, gamma_ptr,
                                                      mix_ptr, temp_ptr)
    split = tl.program_id(1)
    # -FLT_MAX at the lowest: a masked token (σ = -inf) is never kept.
    threshold = tl.maximum(tl.load(state + 1), _FLOOR)
    s_max = tl.load(state + 2)
    inv_t = tl.load(state + 3) * _LOG2E  # the mass is summed in base 2
    delta = tl.load(state + 8)
    kappa = _kappa(gamma, mix, MODE)
    t_ln2 = temp * _LN2
    multiplier, hash_offset = _hash_constants(keys_ptr, row)
    lanes = tl.arange(0, BLOCK // GROUP)
    best = tl.full([BLOCK // GROUP], float("-inf"), tl.float32)
    best_at = tl.zeros([BLOCK // GROUP], dtype=tl.int32)
    mass = tl.zeros([BLOCK // GROUP], dtype=tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, V)
    whole = _whole_tiles_end(start, end, BLOCK)
    for offset in range(start, whole, BLOCK):
        c, u = _load_full(c_row, u_row, offset + tl.arange(0, BLOCK))
        best, best_at, mass = _draw_fold(c, u, offset, lanes, kappa, delta, threshold, s_max, t_ln2,
                                         inv_t, multiplier, hash_offset, best, best_at, mass, BLOCK,
                                         GROUP)
    if whole < end:
        c, u, _ = _load_tile(c_row, u_row, whole + tl.arange(0, BLOCK), end)
        best, best_at, mass = _draw_fold(c, u, whole, lanes, kappa, delta, threshold, s_max, t_ln2,
                                         inv_t, multiplier, hash_offset, best, best_at, mass, BLOCK,
                                         GROUP)
    out = draw_ptr + (row * n_splits + split) * _DRAW_STATS
    best, index = _best_of_lanes(best, best_at, BLOCK // GROUP, GROUP)
    _store_best(out, best, index)
    tl.store(out + 2, tl.sum(mass, axis=0))


@triton.jit
def _sample_draw_finish_kernel(
    c_ptr, u_ptr, tokens_ptr, logprobs_ptr, draw_ptr, state_ptr, gamma_ptr, mix_ptr,
    temp_ptr, V, stride_c, stride_u, n_splits,
    MODE: tl.constexpr, LOGPROBS: tl.constexpr, MAX_SPLITS: tl.constexpr,
):
    row = tl.program_id(0)
    state = state_ptr + row * _STATE
    if tl.load(state + 0) == 0.0:
        return
    row, c_row, u_row, gamma, mix, temp = _sample_row(c_ptr, u_ptr, stride_c, stride_u, gamma_ptr,
                                                      mix_ptr, temp_ptr)
    draw_row = draw_ptr + row * n_splits * _DRAW_STATS
    token = _split_best(draw_row, 0, n_splits, _DRAW_STATS, MAX_SPLITS)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    if LOGPROBS:
        s = _sigma_at(c_row, u_row, token, _kappa(gamma, mix, MODE), tl.load(state + 8))
        mass = _split_sum(draw_row, 2, n_splits, _DRAW_STATS, MAX_SPLITS)
        tl.store(logprobs_ptr + row, (s - tl.load(state + 2)) * tl.load(state + 3) - tl.log(mass))


def _search_block(group: int) -> int:
    """The search's tile: one load per lane, so that each of its 2 x PIVOTS running sums is a single
    register a lane (4-byte inputs at the full block would hold two, past 128 registers)."""
    return group * 32 * NUM_WARPS


def launch(cond, uncond, keys, tokens, logprobs, stats, draw, state, istate, part, mode, gamma, mix,
           temp, min_p, top_k, top_p, noise, n_splits, split_len, key=None):
    """Draws one token per row of `[B, V]` row-strided `cond`/`uncond` into int64 `tokens` `[B]`
    (and fp32 `logprobs` `[B]` unless it is None).

    `keys`: int64 `[B]` row keys (`cfg_triton.rng.row_keys`). `gamma`, `mix`, `temp`: fp32 `[B]`;
    `min_p`: fp32 `[B]` or None; `top_k` (int64 `[B]`, 0 = off) and `top_p` (fp32 `[B]`, 1 = off):
    both or neither None. `noise` False: every row is greedy (temperature 0) and no noise is
    computed. Scratch (fp32 unless said): `stats` of `B * n_splits * SAMPLE_STATS`, `draw` of
    `B * n_splits * DRAW_STATS`, `state` of `B * STATE`, int64 `istate` of `B * ISTATE` and `part`
    of `B * n_splits * PIVOTS * 2`. `key` as in `guidance.launch`.

    Launches a fixed sequence whatever the data (statistics, finish, then with top-k/top-p
    SEARCH_PASSES search and step passes, then with any filter a draw and its finish): rows with
    nothing left to do return at once, so the sequence never waits on the host.
    """
    batch, vocab = cond.shape
    grid = (batch, n_splits)
    lanes = launch_group(cond)
    rows = (gamma, mix, temp)
    shape = (vocab, cond.stride(0), uncond.stride(0))
    with_logprobs = logprobs is not None
    filters = top_k is not None and noise
    _run(_sample_stats_kernel, grid, key and ("sample-stats",) + key,
         (cond, uncond, stats, keys, *rows, *shape, split_len),
         dict(MODE=mode, NOISE=noise, PARTITION=with_logprobs, BLOCK=BLOCK, GROUP=lanes))
    # Rows with tokens masked in uncond alone: the guidance statistics (for δ), and that group's
    # noisy winner and partition sum.
    if mode != RAW:
        _run(_guidance_stats_kernel, grid, key and ("sample-guidance",) + key,
             (cond, uncond, stats, 0.0, gamma, *shape, split_len),
             dict(MODE=mode, GAMMA_PER_ROW=True, BLOCK=BLOCK, GROUP=lanes, STRIDE=SAMPLE_STATS,
                  WHEN_FINITE=MASKED_KEY))
    if noise or with_logprobs:
        _run(_sample_masked_kernel, grid, key and ("sample-masked",) + key,
             (cond, uncond, stats, keys, temp, *shape, split_len),
             dict(NOISE=noise, PARTITION=with_logprobs, BLOCK=BLOCK, GROUP=lanes))
    _run(_sample_finish_kernel, (batch,), key and ("sample-finish",) + key,
         (cond, uncond, tokens, logprobs, stats, state, keys, *rows, min_p, istate, *shape, n_splits),
         dict(MODE=mode, MIN_P=min_p is not None, NOISE=noise, LOGPROBS=with_logprobs,
              FILTERS=filters, MAX_SPLITS=MAX_SPLITS))
    if filters:
        for _ in range(SEARCH_PASSES):
            _run(_sample_search_kernel, grid, key and ("sample-search",) + key,
                 (cond, uncond, part, state, istate, *rows, *shape, split_len, n_splits),
                 dict(MODE=mode, PIVOTS=PIVOTS, BLOCK=_search_block(lanes), GROUP=lanes))
            _run(_sample_step_kernel, (batch,), key and ("sample-step",) + key,
                 (part, state, istate, top_k, top_p, n_splits),
                 dict(LOGPROBS=with_logprobs, MAX_SPLITS=MAX_SPLITS, PIVOTS=PIVOTS))
    if (min_p is not None or filters) and noise:
        _run(_sample_draw_kernel, grid, key and ("sample-draw",) + key,
             (cond, uncond, draw, state, keys, *rows, *shape, split_len, n_splits),
             dict(MODE=mode, BLOCK=BLOCK, GROUP=lanes))
        _run(_sample_draw_finish_kernel, (batch,), key and ("sample-draw-finish",) + key,
             (cond, uncond, tokens, logprobs, draw, state, *rows, *shape, n_splits),
             dict(MODE=mode, LOGPROBS=with_logprobs, MAX_SPLITS=MAX_SPLITS))


def specializations():
    """Every (kernel, signature, constexprs, num_warps) that `launch` can produce, for AOT checks
    (see `guidance.specializations`)."""
    rows = {"gamma_ptr": "*fp32", "mix_ptr": "*fp32", "temp_ptr": "*fp32"}
    shape = {"V": "i32", "stride_c": "i32", "stride_u": "i32"}
    for in_t in ("*fp32", "*fp16", "*bf16"):
        logits = {"c_ptr": in_t, "u_ptr": in_t}
        lanes = group(_BYTES[in_t])
        for mode in (RAW, NORMALIZED, INTERPOLATED):
            for noise in (False, True):
                for partition in (False, True):
                    yield (_sample_stats_kernel,
                           {**logits, "stats_ptr": "*fp32", "keys_ptr": "*i64", **rows, **shape,
                            "split_len": "i32", "MODE": "constexpr", "NOISE": "constexpr",
                            "PARTITION": "constexpr", "BLOCK": "constexpr", "GROUP": "constexpr"},
                           dict(MODE=mode, NOISE=noise, PARTITION=partition, BLOCK=BLOCK, GROUP=lanes),
                           NUM_WARPS)
                    for with_min_p in (False, True):
                        for filters in ((False, True) if noise else (False,)):
                            flags = dict(MODE=mode, MIN_P=with_min_p, NOISE=noise, LOGPROBS=partition,
                                         FILTERS=filters, MAX_SPLITS=MAX_SPLITS)
                            if not partition:
                                flags["logprobs_ptr"] = None
                            if not with_min_p:
                                flags["min_p_ptr"] = None
                            yield (_sample_finish_kernel,
                                   {**logits, "tokens_ptr": "*i64",
                                    "logprobs_ptr": "*fp32" if partition else "constexpr",
                                    "stats_ptr": "*fp32", "state_ptr": "*fp32", "keys_ptr": "*i64",
                                    **rows, "min_p_ptr": "*fp32" if with_min_p else "constexpr",
                                    "istate_ptr": "*i64", **shape, "n_splits": "i32",
                                    "MODE": "constexpr", "MIN_P": "constexpr", "NOISE": "constexpr",
                                    "LOGPROBS": "constexpr", "FILTERS": "constexpr",
                                    "MAX_SPLITS": "constexpr"},
                                   flags, NUM_WARPS)
            yield (_sample_search_kernel,
                   {**logits, "part_ptr": "*fp32", "state_ptr": "*fp32", "istate_ptr": "*i64", **rows,
                    **shape, "split_len": "i32", "n_splits": "i32", "MODE": "constexpr",
                    "PIVOTS": "constexpr", "BLOCK": "constexpr", "GROUP": "constexpr"},
                   dict(MODE=mode, PIVOTS=PIVOTS, BLOCK=_search_block(lanes), GROUP=lanes), NUM_WARPS)
            yield (_sample_draw_kernel,
                   {**logits, "draw_ptr": "*fp32", "state_ptr": "*fp32", "keys_ptr": "*i64", **rows,
                    **shape, "split_len": "i32", "n_splits": "i32", "MODE": "constexpr",
                    "BLOCK": "constexpr", "GROUP": "constexpr"},
                   dict(MODE=mode, BLOCK=BLOCK, GROUP=lanes), NUM_WARPS)
            if mode != RAW:
                yield (_guidance_stats_kernel,
                       {**logits, "stats_ptr": "*fp32", "gamma": "fp32", "gamma_ptr": "*fp32",
                        **shape, "split_len": "i32", "MODE": "constexpr",
                        "GAMMA_PER_ROW": "constexpr", "BLOCK": "constexpr", "GROUP": "constexpr",
                        "STRIDE": "constexpr", "WHEN_FINITE": "constexpr"},
                       dict(MODE=mode, GAMMA_PER_ROW=True, BLOCK=BLOCK, GROUP=lanes,
                            STRIDE=SAMPLE_STATS, WHEN_FINITE=MASKED_KEY), NUM_WARPS)
            for with_logprobs in (False, True):
                flags = dict(MODE=mode, LOGPROBS=with_logprobs, MAX_SPLITS=MAX_SPLITS)
                if not with_logprobs:
                    flags["logprobs_ptr"] = None
                yield (_sample_draw_finish_kernel,
                       {**logits, "tokens_ptr": "*i64",
                        "logprobs_ptr": "*fp32" if with_logprobs else "constexpr",
                        "draw_ptr": "*fp32", "state_ptr": "*fp32", **rows, **shape, "n_splits": "i32",
                        "MODE": "constexpr", "LOGPROBS": "constexpr", "MAX_SPLITS": "constexpr"},
                       flags, NUM_WARPS)
        for noise, partition in ((False, True), (True, False), (True, True)):
            yield (_sample_masked_kernel,
                   {**logits, "stats_ptr": "*fp32", "keys_ptr": "*i64", "temp_ptr": "*fp32", **shape,
                    "split_len": "i32", "NOISE": "constexpr", "PARTITION": "constexpr",
                    "BLOCK": "constexpr", "GROUP": "constexpr"},
                   dict(NOISE=noise, PARTITION=partition, BLOCK=BLOCK, GROUP=lanes), NUM_WARPS)
    for with_logprobs in (False, True):
        yield (_sample_step_kernel,
               {"part_ptr": "*fp32", "state_ptr": "*fp32", "istate_ptr": "*i64", "top_k_ptr": "*i64",
                "top_p_ptr": "*fp32", "n_splits": "i32", "LOGPROBS": "constexpr",
                "MAX_SPLITS": "constexpr", "PIVOTS": "constexpr"},
               dict(LOGPROBS=with_logprobs, MAX_SPLITS=MAX_SPLITS, PIVOTS=PIVOTS), NUM_WARPS)
