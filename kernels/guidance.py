"""Fused classifier-free guidance over the vocabulary: a statistics pass, then a write pass.

Every semantics is, per row, an affine combination of the raw logits plus a row constant, so one read
of `cond` and `uncond` gathers all the row statistics (online log-sum-exps) and a second pass writes
the result. Rows are split across programs along the vocabulary when the batch alone would leave SMs
idle; the write pass merges the per-split statistics of its row before writing.

Normalized and interpolated CFG depend on each branch only up to a per-row constant, so the write
pass works with `c' = c - max(c)` and `u' = u - max(u)`: a large constant added to a row's logits
then costs no digits. The statistics pass takes h' against fixed references instead (each branch's
maximum over the split's first tile), moves h's statistics onto the split's maxima once at the end,
and re-reads the split for h in the rare case where those maxima lie far from the references.

The streaming loops are built to issue about one warp-instruction per vocabulary entry (see
`cfg_triton.budget`): a lane folds the entries of its 128-bit load into its own running statistics,
one after the other in registers, at one exponential per entry and statistic (`_lanes_lse`), and
the lanes are reduced once, after the loop. Whole tiles load unmasked; only a ragged last tile is
masked.

Statistics kept per (row, split), each a (max, sum of exp(x - max)) pair:
    c    log-sum-exp of cond                                     (normalized, interpolated)
    u    log-sum-exp of uncond                                   (normalized, interpolated)
    h    log-sum-exp of h' = c' + (1 - γ)(u' - c') over live tokens, with c', u' taken against the
         split's maxima                                          (interpolated)
    m    log-sum-exp of cond over tokens masked only in uncond   (interpolated; shares c's max)
"""
import functools

import triton
import triton.language as tl

from cfg_triton.modes import INTERPOLATED, NORMALIZED, RAW

_RAW = tl.constexpr(RAW)
_NORMALIZED = tl.constexpr(NORMALIZED)
_INTERPOLATED = tl.constexpr(INTERPOLATED)
STATS = 8  # floats per (row, split): c_max, c_sum, u_max, u_sum, h_max, h_sum, m_sum, unused
_STATS = tl.constexpr(STATS)
MAX_SPLITS = 128
_MAX_SPLITS = tl.constexpr(MAX_SPLITS)
BLOCK = 2048
NUM_WARPS = 8
# The write pass with fp64 output runs half the block on half the warps: each lane keeps its 128-bit
# loads, and the unaligned sm_90 specializations do not spill (at the full block two do).
FP64_WRITE = (BLOCK // 2, NUM_WARPS // 2)
_FLOOR = tl.constexpr(-3.4028234663852886e38)  # -FLT_MAX
_LOG2E = tl.constexpr(1.4426950408889634)
_NEG_LOG2E = tl.constexpr(-1.4426950408889634)
# How far (in logits) a split's maximum may lie from h's reference before h is recomputed against
# it: h' then holds values up to about this large, and its sums lose at most a few float32 ulps of it.
# Real logits stay well inside (SmolLM2: at most 15 over 616 prompt positions and splits).
_REBASE = tl.constexpr(32.0)


@triton.jit
def _finite_or_zero(m):
    # A reference point: a running maximum while it is finite-or-+inf, 0 while everything is -inf
    # (so that exp() sees -inf, never -inf - -inf).
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _split_stats(stats_row, max_slot: tl.constexpr, sum_slot: tl.constexpr, n_splits,
                 STRIDE: tl.constexpr, MAX_SPLITS: tl.constexpr):
    """One statistic's per-split (max, sum) pairs, padded to MAX_SPLITS with empty ones; a split's
    statistics are STRIDE floats apart."""
    j = tl.arange(0, MAX_SPLITS)
    live = j < n_splits
    m = tl.load(stats_row + j * STRIDE + max_slot, mask=live, other=float("-inf"))
    s = tl.load(stats_row + j * STRIDE + sum_slot, mask=live, other=0.0)
    return m, s


@triton.jit
def _merge(m, s):
    """(reference, log Σ s·exp(m - reference)) of per-split pairs: their log-sum-exp, split in two
    so that callers can work relative to the reference."""
    ref = _finite_or_zero(tl.max(m, axis=0))
    return ref, tl.log(tl.sum(s * tl.exp(m - ref), axis=0))


@triton.jit
def _logaddexp(a, b):
    ref = _finite_or_zero(tl.maximum(a, b))
    return ref + tl.log(tl.exp(a - ref) + tl.exp(b - ref))


@triton.jit
def _row_start(c_ptr, u_ptr, stride_c, stride_u, gamma, gamma_ptr, GAMMA_PER_ROW: tl.constexpr):
    """This program's row: its two row pointers (64-bit offsets) and its guidance scale."""
    row = tl.program_id(0)
    if GAMMA_PER_ROW:
        gamma = tl.load(gamma_ptr + row)
    return row, c_ptr + row.to(tl.int64) * stride_c, u_ptr + row.to(tl.int64) * stride_u, gamma


@triton.jit
def _load_tile(c_row, u_row, idx, end):
    """Both branches at `idx` in fp32; lanes past `end` read as masked tokens (-inf), which every
    statistic and the write pass ignore."""
    inside = idx < end
    c = tl.load(c_row + idx, mask=inside, other=float("-inf")).to(tl.float32)
    u = tl.load(u_row + idx, mask=inside, other=float("-inf")).to(tl.float32)
    return c, u, inside


@triton.jit
def _load_full(c_row, u_row, idx):
    """Both branches at `idx` in fp32, all inside the split: no mask, so no lane predicate and no
    fill values to set up per tile."""
    return tl.load(c_row + idx).to(tl.float32), tl.load(u_row + idx).to(tl.float32)


@triton.jit
def _whole_tiles_end(start, end, BLOCK: tl.constexpr):
    """Where a split's whole tiles end: loops run unmasked up to it, then one masked tile if any."""
    return start + (end - start) // BLOCK * BLOCK


@triton.jit
def _columns(x, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    """A tile as GROUP tensors of `[BLOCK // GROUP]`, column e holding entry `GROUP * lane + e`.
    A lane's GROUP entries are the ones its 128-bit load brought, so this moves no data: the
    streaming loops fold a tile into one running statistic per lane, entry after entry, in
    registers (no shuffle, no barrier, and a few registers per statistic)."""
    if GROUP == 1:
        return (x,)
    elif GROUP == 8:
        y0, y1 = tl.split(tl.reshape(x, [BLOCK // 8, 2, 2, 2]))
        y00, y01 = tl.split(y0)
        y10, y11 = tl.split(y1)
        e0, e4 = tl.split(y00)
        e2, e6 = tl.split(y01)
        e1, e5 = tl.split(y10)
        e3, e7 = tl.split(y11)
        return e0, e1, e2, e3, e4, e5, e6, e7
    else:
        tl.static_assert(GROUP == 4)
        y0, y1 = tl.split(tl.reshape(x, [BLOCK // 4, 2, 2]))
        e0, e2 = tl.split(y0)
        e1, e3 = tl.split(y1)
        return e0, e1, e2, e3


@triton.jit
def _lanes_lse(m, s, x):
    """Folds `x` into per-lane log-sum-exp pairs (running max `m`, `s` = Σ exp(entry - m)) at one
    exponential per entry: exp(-|x - m|) rescales the old sum when x is the new maximum and is x's
    own term otherwise. `m` starts at -FLT_MAX, never -inf: a masked entry then adds exp(-inf) = 0
    and no lane meets -inf - -inf; NaN makes the sum NaN, +inf makes the lane's total NaN
    (`_lanes_total`). Returns (m, s, the old sum's scale, x's term)."""
    d = x - m
    e = tl.math.exp2(tl.abs(d) * _NEG_LOG2E)
    up = d > 0
    scale = tl.where(up, e, 1.0)
    term = tl.where(up, 1.0, e)
    return tl.maximum(m, x), s * scale + term, scale, term


@triton.jit
def _lanes_total(m, s):
    """(max, Σ exp(entry - max)) of a statistic from its per-lane pairs; the max is the lanes' own
    (-FLT_MAX when nothing was summed: see `_settled`)."""
    top = tl.max(m, axis=0)
    return top, tl.sum(s * tl.exp(m - top), axis=0)


@triton.jit
def _settled(top, total):
    """A statistic's max as stored: -inf when it summed nothing."""
    return tl.where(total == 0.0, float("-inf"), top)


@triton.jit
def _lanes_empty(LANES: tl.constexpr):
    """Per-lane statistics before any entry: (c_max, c_sum, u_max, u_sum, h_max, h_sum, m_sum)."""
    floor = tl.full([LANES], _FLOOR, tl.float32)
    zeros = tl.zeros([LANES], dtype=tl.float32)
    return floor, zeros, floor, zeros, floor, zeros, zeros


@triton.jit
def _h(c, u, kappa, c_at, u_at):
    """h' = c' + κ (u' - c') of live tokens (-inf elsewhere), with c' = c - c_at, u' = u - u_at:
    differences of nearby values, so a large constant in a row costs no digits."""
    c_shift = c - c_at
    h = c_shift + kappa * ((u - u_at) - c_shift)
    return tl.where((c != float("-inf")) & (u != float("-inf")), h, float("-inf"))


@triton.jit
def _fold_entry(c, u, kappa, c_at, u_at, c_max, c_sum, u_max, u_sum, h_max, h_sum, m_sum,
                MODE: tl.constexpr):
    """Folds one entry per lane of both branches (fp32, -inf past the end) into the per-lane
    statistics; h' is taken against the fixed references (c_at, u_at), κ = 1 - γ."""
    if MODE != _RAW:
        c_max, c_sum, c_scale, c_term = _lanes_lse(c_max, c_sum, c)
        u_max, u_sum, _, _ = _lanes_lse(u_max, u_sum, u)
        if MODE == _INTERPOLATED:
            h_max, h_sum, _, _ = _lanes_lse(h_max, h_sum, _h(c, u, kappa, c_at, u_at))
            # Masked-in-uncond tokens share cond's maximum and exponential: no fourth exp.
            m_sum = m_sum * c_scale + tl.where(u == float("-inf"), c_term, 0.0)
    return c_max, c_sum, u_max, u_sum, h_max, h_sum, m_sum


@triton.jit
def _fold_lanes(c, u, kappa, c_at, u_at, c_max, c_sum, u_max, u_sum, h_max, h_sum, m_sum,
                MODE: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    """Folds a tile (`[BLOCK]` of each branch) into the per-lane statistics, entry by entry."""
    if MODE != _RAW:
        cs = _columns(c, BLOCK, GROUP)
        us = _columns(u, BLOCK, GROUP)
        for e in tl.static_range(GROUP):
            c_max, c_sum, u_max, u_sum, h_max, h_sum, m_sum = _fold_entry(
                cs[e], us[e], kappa, c_at, u_at, c_max, c_sum, u_max, u_sum, h_max, h_sum, m_sum,
                MODE)
    return c_max, c_sum, u_max, u_sum, h_max, h_sum, m_sum


@triton.jit
def _references(c_row, u_row, start, end, BLOCK: tl.constexpr):
    """h's fixed references for a split: each branch's maximum over its first tile (0 if none is
    finite). A row shifted by a constant shifts them alike; a split whose maxima end up far from
    them recomputes h (`_store_lanes`)."""
    c, u, _ = _load_tile(c_row, u_row, start + tl.arange(0, BLOCK), end)
    return _finite_or_zero(tl.max(c, axis=0)), _finite_or_zero(tl.max(u, axis=0))


@triton.jit
def _fold_h(c, u, kappa, c_at, u_at, h_max, h_sum, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    cs = _columns(c, BLOCK, GROUP)
    us = _columns(u, BLOCK, GROUP)
    for e in tl.static_range(GROUP):
        h_max, h_sum, _, _ = _lanes_lse(h_max, h_sum, _h(cs[e], us[e], kappa, c_at, u_at))
    return h_max, h_sum


@triton.jit
def _h_lanes(c_row, u_row, start, end, kappa, c_at, u_at, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    """h's per-lane statistics over a split against references (c_at, u_at)."""
    lanes = tl.arange(0, BLOCK)
    h_max = tl.full([BLOCK // GROUP], _FLOOR, tl.float32)
    h_sum = tl.zeros([BLOCK // GROUP], dtype=tl.float32)
    whole = _whole_tiles_end(start, end, BLOCK)
    for offset in range(start, whole, BLOCK):
        c, u = _load_full(c_row, u_row, offset + lanes)
        h_max, h_sum = _fold_h(c, u, kappa, c_at, u_at, h_max, h_sum, BLOCK, GROUP)
    if whole < end:
        c, u, _ = _load_tile(c_row, u_row, whole + lanes, end)
        h_max, h_sum = _fold_h(c, u, kappa, c_at, u_at, h_max, h_sum, BLOCK, GROUP)
    return h_max, h_sum


@triton.jit
def _store_lanes(out, c_row, u_row, start, end, kappa, c_at, u_at, c_max, c_sum, u_max, u_sum,
                 h_max, h_sum, m_sum, MODE: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    """Reduces a split's per-lane statistics and stores them (slots 0-6 of the `STATS` layout), h'
    moved onto the split's maxima. Returns whether cond's or uncond's sum is NaN: the split holds
    NaN or +inf (raw mode keeps no sums: False)."""
    poisoned = False
    if MODE != _RAW:
        c_top, c_total = _lanes_total(c_max, c_sum)
        u_top, u_total = _lanes_total(u_max, u_sum)
        c_top = _settled(c_top, c_total)
        u_top = _settled(u_top, u_total)
        tl.store(out + 0, c_top)
        tl.store(out + 1, c_total)
        tl.store(out + 2, u_top)
        tl.store(out + 3, u_total)
        if MODE == _INTERPOLATED:
            tl.store(out + 6, tl.sum(m_sum * tl.exp(c_max - tl.max(c_max, axis=0)), axis=0))
            c_move = _finite_or_zero(c_top) - c_at
            u_move = _finite_or_zero(u_top) - u_at
            if (tl.abs(c_move) > _REBASE) | (tl.abs(u_move) > _REBASE):
                # The first tile was no guide to the split's maxima: h' held large values and lost
                # digits. Rare (a row's first tile far below its peak); one more read fixes it.
                h_max, h_sum = _h_lanes(c_row, u_row, start, end, kappa, _finite_or_zero(c_top),
                                        _finite_or_zero(u_top), BLOCK, GROUP)
                c_move = 0.0
                u_move = 0.0
            h_top, h_total = _lanes_total(h_max, h_sum)
            # h' against the split's maxima moves by c_move + κ (u_move - c_move).
            h_top = h_top - (c_move + kappa * (u_move - c_move))
            tl.store(out + 4, _settled(h_top, h_total))
            tl.store(out + 5, h_total)
        poisoned = (c_total != c_total) | (u_total != u_total)
    return poisoned


@triton.jit
def _guidance_stats_kernel(
    c_ptr, u_ptr, stats_ptr, gamma, gamma_ptr, V, stride_c, stride_u, split_len,
    MODE: tl.constexpr, GAMMA_PER_ROW: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr,
    STRIDE: tl.constexpr, WHEN_FINITE: tl.constexpr,
):
    """Statistics of each (row, split), STRIDE floats apart. With WHEN_FINITE >= 0, only rows that
    need them: rows where a split's statistics hold a finite value at that slot (the sampling
    passes compute them only for rows with tokens masked in uncond alone)."""
    row = tl.program_id(0)
    n_splits = tl.num_programs(1)
    if WHEN_FINITE >= 0:
        j = tl.arange(0, _MAX_SPLITS)
        flags = tl.load(stats_ptr + (row * n_splits + j) * STRIDE + WHEN_FINITE, mask=j < n_splits,
                        other=float("-inf"))
        if tl.max(flags, axis=0) == float("-inf"):
            return
    row, c_row, u_row, gamma = _row_start(c_ptr, u_ptr, stride_c, stride_u, gamma, gamma_ptr,
                                          GAMMA_PER_ROW)
    split = tl.program_id(1)
    lanes = tl.arange(0, BLOCK)
    kappa = 1.0 - gamma
    start = split * split_len
    end = tl.minimum(start + split_len, V)
    c_at, u_at = _references(c_row, u_row, start, end, BLOCK)
    c_max, c_sum, u_max, u_sum, h_max, h_sum, m_sum = _lanes_empty(BLOCK // GROUP)
    whole = _whole_tiles_end(start, end, BLOCK)
    for offset in range(start, whole, BLOCK):
        c, u = _load_full(c_row, u_row, offset + lanes)
        c_max, c_sum, u_max, u_sum, h_max, h_sum, m_sum = _fold_lanes(
            c, u, kappa, c_at, u_at, c_max, c_sum, u_max, u_sum, h_max, h_sum, m_sum, MODE, BLOCK,
            GROUP)
    if whole < end:
        c, u, _ = _load_tile(c_row, u_row, whole + lanes, end)
        c_max, c_sum, u_max, u_sum, h_max, h_sum, m_sum = _fold_lanes(
            c, u, kappa, c_at, u_at, c_max, c_sum, u_max, u_sum, h_max, h_sum, m_sum, MODE, BLOCK,
            GROUP)
    _store_lanes(stats_ptr + (row * n_splits + split) * STRIDE, c_row, u_row, start, end, kappa, c_at,
                 u_at, c_max, c_sum, u_max, u_sum, h_max, h_sum, m_sum, MODE, BLOCK, GROUP)


@triton.jit
def _row_constants(stats_row, n_splits, gamma, STRIDE: tl.constexpr, MODE: tl.constexpr,
                   MAX_SPLITS: tl.constexpr):
    """Merges one row's per-split statistics (in split order) into the constants of `_guided`:
    (c_ref, u_ref, lse_c, live_const, masked_const). Raw mode needs none (all zero)."""
    # Everything is relative to the row maxima (c_ref, u_ref): c' = c - c_ref, u' = u - u_ref.
    # Row constants: u-live tokens get h' - live_const, tokens masked only in uncond get
    # c' - masked_const (their guided log-prob is their conditional one).
    c_ref = 0.0
    u_ref = 0.0
    live_const = 0.0
    masked_const = 0.0
    lse_c = 0.0
    if MODE != _RAW:
        c_maxes, c_sums = _split_stats(stats_row, 0, 1, n_splits, STRIDE, MAX_SPLITS)
        u_maxes, u_sums = _split_stats(stats_row, 2, 3, n_splits, STRIDE, MAX_SPLITS)
        c_ref, lse_c = _merge(c_maxes, c_sums)
        u_ref, lse_u = _merge(u_maxes, u_sums)
        # (1 - γ) LSE(u') + γ LSE(c'): the normalized-CFG row constant.
        z = lse_c + (1.0 - gamma) * (lse_u - lse_c)
        live_const = z
        masked_const = lse_c
        if MODE == _INTERPOLATED:
            h_maxes, h_sums = _split_stats(stats_row, 4, 5, n_splits, STRIDE, MAX_SPLITS)
            # Each split's h' is relative to its own maxima: move it onto the row's.
            c_move = _finite_or_zero(c_maxes) - c_ref
            h_maxes = h_maxes + (c_move + (1.0 - gamma) * ((_finite_or_zero(u_maxes) - u_ref) - c_move))
            h_top, h_logsum = _merge(h_maxes, h_sums)
            lse_h = h_top + h_logsum
            _, m_sums = _split_stats(stats_row, 0, 6, n_splits, STRIDE, MAX_SPLITS)
            _, lse_m = _merge(c_maxes, m_sums)
            # LSE of the normalized CFG scores g; guarded so an empty set contributes -inf, not NaN.
            live_mass = tl.where(lse_h == float("-inf"), float("-inf"), lse_h - z)
            masked_mass = tl.where(lse_m == float("-inf"), float("-inf"), lse_m - lse_c)
            lse_g = _logaddexp(live_mass, masked_mass)
            # Equals lse_h exactly when nothing is masked only in uncond (so γ = 1 returns cl bit
            # for bit, whatever the mix).
            live_const = tl.where(masked_mass == float("-inf"), lse_h, z + lse_g)
            masked_const = lse_c + lse_g
            # LSE(u) cancels above, so NaN or +inf in uncond (lse_u is then NaN) must be passed on.
            live_const = tl.where(lse_u != lse_u, lse_u, live_const)
            masked_const = tl.where(lse_u != lse_u, lse_u, masked_const)
    return c_ref, u_ref, lse_c, live_const, masked_const


@triton.jit
def _guided(c, u, gamma, mix, c_ref, u_ref, lse_c, live_const, masked_const, MODE: tl.constexpr):
    """The guided score of tokens with logits `c`, `u` (fp32 tiles or scalars), given the row's
    constants from `_row_constants`."""
    u_live = u != float("-inf")
    c_live = c != float("-inf")  # before the shift: a +inf maximum turns finite c' into -inf
    c = c - c_ref
    u = u - u_ref
    h = c + (1.0 - gamma) * (u - c)
    if MODE == _RAW:
        # No row statistic carries +inf into NaN here, so flag it token by token.
        poisoned = (c == float("inf")) | (u == float("inf"))
        val = tl.where(poisoned, float("nan"), tl.where(u_live, h, c))
    elif MODE == _NORMALIZED:
        val = tl.where(u_live, h - live_const, c - masked_const)
    else:
        cl = c - lse_c
        gl = tl.where(u_live, h - live_const, c - masked_const)
        val = cl + mix * (gl - cl)
    return tl.where(c_live, val, float("-inf"))


@triton.jit
def _guidance_write_kernel(
    c_ptr, u_ptr, out_ptr, stats_ptr, gamma, gamma_ptr, mix, mix_ptr,
    V, stride_c, stride_u, split_len, n_splits,
    MODE: tl.constexpr, GAMMA_PER_ROW: tl.constexpr, MIX_PER_ROW: tl.constexpr,
    MAX_SPLITS: tl.constexpr, BLOCK: tl.constexpr,
):
    row, c_row, u_row, gamma = _row_start(c_ptr, u_ptr, stride_c, stride_u, gamma, gamma_ptr,
                                          GAMMA_PER_ROW)
    split = tl.program_id(1)
    out_row = out_ptr + row.to(tl.int64) * V
    if MIX_PER_ROW:
        mix = tl.load(mix_ptr + row)
    c_ref, u_ref, lse_c, live_const, masked_const = _row_constants(
        stats_ptr + row * n_splits * _STATS, n_splits, gamma, _STATS, MODE, MAX_SPLITS)
    lanes = tl.arange(0, BLOCK)
    start = split * split_len
    end = tl.minimum(start + split_len, V)
    for offset in range(start, end, BLOCK):
        idx = offset + lanes
        c, u, inside = _load_tile(c_row, u_row, idx, end)
        val = _guided(c, u, gamma, mix, c_ref, u_ref, lse_c, live_const, masked_const, MODE)
        tl.store(out_row + idx, val.to(out_ptr.dtype.element_ty), mask=inside)


def group(element_size: int) -> int:
    """Entries of one 128-bit load: what each lane of a streaming loop folds per tile."""
    return 16 // element_size


# Triton's interpreter runs each of a tile's columns as its own numpy operations: it folds one entry
# per lane (the same kernels, several times faster to interpret). None: as compiled (a test runs
# each family so).
INTERPRETER_GROUP = 1


def launch_group(tensor) -> int:
    """GROUP for a launch on `tensor`'s device."""
    if tensor.is_cuda or INTERPRETER_GROUP is None:
        return group(tensor.element_size())
    return INTERPRETER_GROUP


_BYTES = {"*fp32": 4, "*fp16": 2, "*bf16": 2}


@functools.lru_cache(maxsize=1024)
def plan(batch: int, vocab: int, num_sms: int) -> tuple[int, int]:
    """(number of vocabulary splits per row, elements per split) for a `[batch, vocab]` problem.

    Enough programs to cover every SM about four times, never more splits than tiles, and a split
    length that is a whole number of tiles so that splits never share a tile.
    """
    tiles = triton.cdiv(max(vocab, 1), BLOCK)
    wanted = triton.cdiv(4 * num_sms, max(batch, 1))
    tiles_per_split = triton.cdiv(tiles, max(1, min(tiles, wanted, MAX_SPLITS)))
    return triton.cdiv(tiles, tiles_per_split), tiles_per_split * BLOCK


# Kernels already compiled for one specialization, called without Triton's JIT dispatch: binding,
# specializing and hashing the arguments costs more host time than a decode-sized launch itself.
_compiled = {}


def _run(kernel, grid, key, args, constexprs, num_warps=NUM_WARPS):
    """Launches `kernel(*args, **constexprs)` on `grid`.

    The first launch of a specialization goes through Triton's JIT, which compiles it and returns the
    compiled kernel; later launches with the same `key` call that compiled kernel directly, with every
    parameter positional (constexprs included) as the JIT itself does. `key` must determine the
    specialization: the caller includes dtypes, integer values and pointer alignment in it.
    """
    runner = _compiled.get(key)
    if runner is not None:
        runner(*args, *constexprs.values())
        return
    compiled = kernel[grid](*args, **constexprs, num_warps=num_warps)
    if key is not None and compiled is not None and hasattr(compiled, "__getitem__"):
        _compiled[key] = compiled[grid]


def launch(cond, uncond, out, stats, mode, gamma, gamma_rows, mix, mix_rows, n_splits, split_len,
           key=None):
    """Runs the guidance kernels on `[B, V]` row-strided `cond`/`uncond` into contiguous `out`.

    `stats` is fp32 scratch of at least `B * n_splits * STATS` floats (unused in raw mode). `gamma` and
    `mix` are floats used when `gamma_rows` / `mix_rows` (fp32 `[B]`) are None. With a `key` that fixes
    the specialization (see `_run`), repeated launches skip Triton's JIT dispatch; None always uses it.
    """
    batch, vocab = cond.shape
    grid = (batch, n_splits)
    gamma_per_row, mix_per_row = gamma_rows is not None, mix_rows is not None
    if mode != RAW:
        _run(_guidance_stats_kernel, grid, key and ("stats",) + key,
             (cond, uncond, stats, gamma, gamma_rows, vocab, cond.stride(0), uncond.stride(0), split_len),
             dict(MODE=mode, GAMMA_PER_ROW=gamma_per_row, BLOCK=BLOCK, GROUP=launch_group(cond),
                  STRIDE=STATS, WHEN_FINITE=-1))
    block, warps = FP64_WRITE if out.element_size() == 8 else (BLOCK, NUM_WARPS)
    _run(_guidance_write_kernel, grid, key and ("write",) + key,
         (cond, uncond, out, stats, gamma, gamma_rows, mix, mix_rows, vocab, cond.stride(0),
          uncond.stride(0), split_len, n_splits),
         dict(MODE=mode, GAMMA_PER_ROW=gamma_per_row, MIX_PER_ROW=mix_per_row, MAX_SPLITS=MAX_SPLITS,
              BLOCK=block), warps)


def specializations():
    """Every (kernel, signature, constexprs, num_warps) that `launch` can produce, for AOT checks.

    Integer arguments are typed i32 (`cfg_triton.aot` compiles each entry with and without the
    16-divisibility hint the JIT attaches); a row stride past 2**31 elements would make them i64.
    """
    dtypes = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
    for in_t in dtypes.values():
        for mode in (NORMALIZED, INTERPOLATED):
            for gamma_rows in (False, True):
                sig = {"c_ptr": in_t, "u_ptr": in_t, "stats_ptr": "*fp32", "gamma": "fp32",
                       "gamma_ptr": "*fp32" if gamma_rows else "constexpr", "V": "i32",
                       "stride_c": "i32", "stride_u": "i32", "split_len": "i32",
                       "MODE": "constexpr", "GAMMA_PER_ROW": "constexpr", "BLOCK": "constexpr",
                       "GROUP": "constexpr", "STRIDE": "constexpr", "WHEN_FINITE": "constexpr"}
                const = {"MODE": mode, "GAMMA_PER_ROW": gamma_rows, "BLOCK": BLOCK,
                         "GROUP": group(_BYTES[in_t]), "STRIDE": STATS, "WHEN_FINITE": -1}
                if not gamma_rows:
                    const["gamma_ptr"] = None
                yield _guidance_stats_kernel, sig, const, NUM_WARPS
        for out_t in (*dtypes.values(), "*fp64"):
            for mode in (RAW, NORMALIZED, INTERPOLATED):
                for gamma_rows in (False, True):
                    for mix_rows in ((False, True) if mode == INTERPOLATED else (False,)):
                        sig = {"c_ptr": in_t, "u_ptr": in_t, "out_ptr": out_t, "stats_ptr": "*fp32",
                               "gamma": "fp32", "gamma_ptr": "*fp32" if gamma_rows else "constexpr",
                               "mix": "fp32", "mix_ptr": "*fp32" if mix_rows else "constexpr",
                               "V": "i32", "stride_c": "i32", "stride_u": "i32", "split_len": "i32",
                               "n_splits": "i32", "MODE": "constexpr", "GAMMA_PER_ROW": "constexpr",
                               "MIX_PER_ROW": "constexpr", "MAX_SPLITS": "constexpr",
                               "BLOCK": "constexpr"}
                        block, warps = FP64_WRITE if out_t == "*fp64" else (BLOCK, NUM_WARPS)
                        const = {"MODE": mode, "GAMMA_PER_ROW": gamma_rows, "MIX_PER_ROW": mix_rows,
                                 "MAX_SPLITS": MAX_SPLITS, "BLOCK": block}
                        if not gamma_rows:
                            const["gamma_ptr"] = None
                        if not mix_rows:
                            const["mix_ptr"] = None
                        yield _guidance_write_kernel, sig, const, warps
