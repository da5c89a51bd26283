"""Guided log-probability of one target token per row, in one read of both branches.

A statistics pass reads `cond` and `uncond` once, as the guidance statistics pass does, and also
keeps each split's best token for the guided argmax. A finish pass per row merges the splits in
split order, evaluates the guided score of the target (two scalar loads) exactly as the guidance
write pass would, and writes `O(1)` per row: nothing of size `[N, V]` is ever written.

The argmax ranks tokens within two groups by keys that differ from their guided scores by one row
constant per group:
    live tokens (finite in both branches)   c + κ (u − c), κ = 1 − γ (interpolated: α (1 − γ))
    tokens masked only in uncond            c
The two group winners are then scored with the guidance formula and compared (ties to the lower
index). Rows holding NaN or +inf are flagged so that the finish pass can report "not greedy".
The loop keeps per-lane running statistics and best keys, as `guidance.py` describes.

Statistics per (row, split), TOKEN_STATS floats: the guidance statistics in slots 0-6 (same layout),
then 1.0 if the split holds NaN or +inf (else 0.0), the live winner's key and index, the masked
winner's key and index (indices stored as int32 bit patterns).
"""
import triton
import triton.language as tl

from cfg_triton.modes import INTERPOLATED, NORMALIZED, RAW

_RAW = tl.constexpr(RAW)
from .guidance import (_BYTES, BLOCK, MAX_SPLITS, NUM_WARPS, _columns, _fold_entry, _guided,
                       _lanes_empty, _load_full, _load_tile, _references, _row_constants, _row_start,
                       _run, _store_lanes, _whole_tiles_end, group,
                       launch_group)

_INTERPOLATED = tl.constexpr(INTERPOLATED)
TOKEN_STATS = 12
_TOKEN_STATS = tl.constexpr(TOKEN_STATS)
_NO_INDEX = tl.constexpr(2**31 - 1)


@triton.jit
def _lanes_best(key, at, best, best_at):
    """Folds one key per lane into per-lane (best key, where it came: the tile offset plus the
    entry's column). A lane sees its tokens in index order and only a strictly larger key wins,
    so its ties keep the lowest index; NaN never wins."""
    better = key > best
    return tl.where(better, key, best), tl.where(better, at, best_at)


@triton.jit
def _best_of_lanes(best, best_at, LANES: tl.constexpr, GROUP: tl.constexpr):
    """(key, token index) of the best lane (lane l holds tokens `GROUP * l + column` of each tile),
    ties to the lowest index; _NO_INDEX when no key beat -inf."""
    top = tl.max(best, axis=0)
    index = tl.where(best == top, best_at + tl.arange(0, LANES) * GROUP, _NO_INDEX)
    return top, tl.where(top == float("-inf"), _NO_INDEX, tl.min(index, axis=0))


@triton.jit
def _lanes_poison(worst, c, u):
    """Per-lane running max of both branches that keeps NaN: NaN or +inf at the end marks the
    split as holding NaN or +inf inputs (`_is_poisoned`)."""
    both = tl.maximum(c, u, propagate_nan=tl.PropagateNan.ALL)
    return tl.maximum(worst, both, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _is_poisoned(worst):
    top = tl.max(tl.where(worst != worst, float("inf"), worst), axis=0)
    return top == float("inf")


@triton.jit
def _kappa(gamma, mix, MODE: tl.constexpr):
    """κ of the live tokens' key `c + κ (u − c)`: 1 − γ, or α (1 − γ) interpolated."""
    kappa = 1.0 - gamma
    if MODE == _INTERPOLATED:
        kappa = mix * kappa
    return kappa


@triton.jit
def _store_best(out, best, index):
    """A (key, index) pair into fp32 statistics, the index as its int32 bits."""
    tl.store(out, best)
    tl.store(out + 1, index.to(tl.float32, bitcast=True))


@triton.jit
def _split_sum(stats_row, slot: tl.constexpr, n_splits, STRIDE: tl.constexpr, MAX_SPLITS: tl.constexpr):
    """One statistic summed over a row's splits, in split order."""
    j = tl.arange(0, MAX_SPLITS)
    return tl.sum(tl.load(stats_row + j * STRIDE + slot, mask=j < n_splits, other=0.0), axis=0)


@triton.jit
def _group_keys(c, u, kappa):
    """Ranking keys of a tile: (live tokens' `c + κ (u − c)`, masked-in-uncond tokens' `c`), -inf
    outside each group."""
    u_dead = u == float("-inf")
    live = tl.where((c != float("-inf")) & ~u_dead, c + kappa * (u - c), float("-inf"))
    return live, tl.where(u_dead, c, float("-inf"))


@triton.jit
def _group_winners(c_row, u_row, stats_row, key_slot: tl.constexpr, n_splits, STRIDE: tl.constexpr,
                   MAX_SPLITS: tl.constexpr, gamma, mix, c_ref, u_ref, lse_c, live_const,
                   masked_const, MODE: tl.constexpr):
    """Both groups' winners from the per-split (key, index) pairs at `key_slot` (live) and
    `key_slot + 2` (masked), scored as the guidance output would hold them: (live index, a valid
    index to read it at, its score, the same three for the masked group)."""
    live = _split_best(stats_row, key_slot, n_splits, STRIDE, MAX_SPLITS)
    masked = _split_best(stats_row, key_slot + 2, n_splits, STRIDE, MAX_SPLITS)
    live_at = tl.where(live == _NO_INDEX, 0, live)
    masked_at = tl.where(masked == _NO_INDEX, 0, masked)
    live_score = _score_at(c_row, u_row, live_at, gamma, mix, c_ref, u_ref, lse_c, live_const,
                           masked_const, MODE)
    masked_score = _score_at(c_row, u_row, masked_at, gamma, mix, c_ref, u_ref, lse_c, live_const,
                             masked_const, MODE)
    return live, live_at, live_score, masked, masked_at, masked_score


@triton.jit
def _pick(live_idx, live_score, masked_idx, masked_score):
    """The better of two group winners (index, score); ties to the lower index, none -> _NO_INDEX."""
    live_score = tl.where(live_idx == _NO_INDEX, float("-inf"), live_score)
    masked_score = tl.where(masked_idx == _NO_INDEX, float("-inf"), masked_score)
    masked_wins = (masked_score > live_score) | ((masked_score == live_score) & (masked_idx < live_idx))
    return tl.where(masked_wins, masked_idx, live_idx), tl.where(masked_wins, masked_score, live_score)


@triton.jit
def _token_fold(c, u, offset, kappa_h, kappa, c_at, u_at, c_max, c_sum, u_max, u_sum, h_max, h_sum,
                m_sum, live_best, live_at, masked_best, masked_at, worst, MODE: tl.constexpr,
                BLOCK: tl.constexpr, GROUP: tl.constexpr):
    cs = _columns(c, BLOCK, GROUP)
    us = _columns(u, BLOCK, GROUP)
    for e in tl.static_range(GROUP):
        c_max, c_sum, u_max, u_sum, h_max, h_sum, m_sum = _fold_entry(
            cs[e], us[e], kappa_h, c_at, u_at, c_max, c_sum, u_max, u_sum, h_max, h_sum, m_sum, MODE)
        live_key, masked_key = _group_keys(cs[e], us[e], kappa)
        live_best, live_at = _lanes_best(live_key, offset + e, live_best, live_at)
        masked_best, masked_at = _lanes_best(masked_key, offset + e, masked_best, masked_at)
        if MODE == _RAW:  # other modes' sums turn NaN on NaN or +inf input
            worst = _lanes_poison(worst, cs[e], us[e])
    return (c_max, c_sum, u_max, u_sum, h_max, h_sum, m_sum, live_best, live_at, masked_best,
            masked_at, worst)


@triton.jit
def _token_stats_kernel(
    c_ptr, u_ptr, stats_ptr, gamma, gamma_ptr, mix, mix_ptr, V, stride_c, stride_u, split_len,
    MODE: tl.constexpr, GAMMA_PER_ROW: tl.constexpr, MIX_PER_ROW: tl.constexpr,
    BLOCK: tl.constexpr, GROUP: tl.constexpr,
):
    row, c_row, u_row, gamma = _row_start(c_ptr, u_ptr, stride_c, stride_u, gamma, gamma_ptr,
                                          GAMMA_PER_ROW)
    split = tl.program_id(1)
    if MODE == _INTERPOLATED and MIX_PER_ROW:
        mix = tl.load(mix_ptr + row)
    kappa = _kappa(gamma, mix, MODE)
    lanes = tl.arange(0, BLOCK)
    start = split * split_len
    end = tl.minimum(start + split_len, V)
    c_at, u_at = _references(c_row, u_row, start, end, BLOCK)
    c_max, c_sum, u_max, u_sum, h_max, h_sum, m_sum = _lanes_empty(BLOCK // GROUP)
    live_best = tl.full([BLOCK // GROUP], float("-inf"), tl.float32)
    masked_best = live_best
    live_at = tl.zeros([BLOCK // GROUP], dtype=tl.int32)
    masked_at = live_at
    worst = live_best
    whole = _whole_tiles_end(start, end, BLOCK)
    for offset in range(start, whole, BLOCK):
        c, u = _load_full(c_row, u_row, offset + lanes)
        (c_max, c_sum, u_max, u_sum, h_max, h_sum, m_sum, live_best, live_at, masked_best, masked_at,
         worst) = _token_fold(c, u, offset, 1.0 - gamma, kappa, c_at, u_at, c_max, c_sum, u_max, u_sum,
                              h_max, h_sum, m_sum, live_best, live_at, masked_best, masked_at, worst,
                              MODE, BLOCK, GROUP)
    if whole < end:
        c, u, _ = _load_tile(c_row, u_row, whole + lanes, end)
        (c_max, c_sum, u_max, u_sum, h_max, h_sum, m_sum, live_best, live_at, masked_best, masked_at,
         worst) = _token_fold(c, u, whole, 1.0 - gamma, kappa, c_at, u_at, c_max, c_sum, u_max, u_sum,
                              h_max, h_sum, m_sum, live_best, live_at, masked_best, masked_at, worst,
                              MODE, BLOCK, GROUP)
    out = stats_ptr + (row * tl.num_programs(1) + split) * _TOKEN_STATS
    bad = _store_lanes(out, c_row, u_row, start, end, 1.0 - gamma, c_at, u_at, c_max, c_sum, u_max,
                       u_sum, h_max, h_sum, m_sum, MODE, BLOCK, GROUP)
    if MODE == _RAW:
        bad = _is_poisoned(worst)
    tl.store(out + 7, bad.to(tl.float32))
    live_best, live_idx = _best_of_lanes(live_best, live_at, BLOCK // GROUP, GROUP)
    masked_best, masked_idx = _best_of_lanes(masked_best, masked_at, BLOCK // GROUP, GROUP)
    _store_best(out + 8, live_best, live_idx)
    _store_best(out + 10, masked_best, masked_idx)


@triton.jit
def _split_best(stats_row, key_slot: tl.constexpr, n_splits, STRIDE: tl.constexpr,
                MAX_SPLITS: tl.constexpr):
    """The index of the row's best key in one group, from its splits in order (ties: lowest
    index; none: _NO_INDEX); a split's key and index are at `key_slot` and `key_slot + 1`."""
    j = tl.arange(0, MAX_SPLITS)
    live = j < n_splits
    keys = tl.load(stats_row + j * STRIDE + key_slot, mask=live, other=float("-inf"))
    idx = tl.load(stats_row + j * STRIDE + key_slot + 1, mask=live, other=0.0)
    idx = tl.where(live, idx.to(tl.int32, bitcast=True), _NO_INDEX)
    top = tl.max(keys, axis=0)
    return tl.min(tl.where(keys == top, idx, _NO_INDEX), axis=0)


@triton.jit
def _score_at(c_row, u_row, i, gamma, mix, c_ref, u_ref, lse_c, live_const, masked_const,
              MODE: tl.constexpr):
    """The guided score of token `i` (a valid index)."""
    c = tl.load(c_row + i).to(tl.float32)
    u = tl.load(u_row + i).to(tl.float32)
    return _guided(c, u, gamma, mix, c_ref, u_ref, lse_c, live_const, masked_const, MODE)


@triton.jit
def _token_finish_kernel(
    c_ptr, u_ptr, targets_ptr, logprobs_ptr, greedy_ptr, stats_ptr, gamma, gamma_ptr, mix, mix_ptr,
    V, stride_c, stride_u, n_splits,
    MODE: tl.constexpr, GAMMA_PER_ROW: tl.constexpr, MIX_PER_ROW: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
):
    row, c_row, u_row, gamma = _row_start(c_ptr, u_ptr, stride_c, stride_u, gamma, gamma_ptr,
                                          GAMMA_PER_ROW)
    if MIX_PER_ROW:
        mix = tl.load(mix_ptr + row)
    stats_row = stats_ptr + row * n_splits * _TOKEN_STATS
    c_ref, u_ref, lse_c, live_const, masked_const = _row_constants(
        stats_row, n_splits, gamma, _TOKEN_STATS, MODE, MAX_SPLITS)
    target = tl.load(targets_ptr + row)
    valid = (target >= 0) & (target < V)
    target = tl.where(valid, target, 0)
    score = _score_at(c_row, u_row, target, gamma, mix, c_ref, u_ref, lse_c, live_const,
                      masked_const, MODE)
    tl.store(logprobs_ptr + row, tl.where(valid, score, float("nan")))
    # Argmax: each group's winner, scored as the guidance output would hold it.
    live_idx, _, live_score, masked_idx, _, masked_score = _group_winners(
        c_row, u_row, stats_row, 8, n_splits, _TOKEN_STATS, MAX_SPLITS, gamma, mix, c_ref, u_ref,
        lse_c, live_const, masked_const, MODE)
    best, _ = _pick(live_idx, live_score, masked_idx, masked_score)
    # A row with nothing finite has no argmax (`sample` draws -1 there): its target is not greedy.
    bad = _split_sum(stats_row, 7, n_splits, _TOKEN_STATS, MAX_SPLITS)
    greedy = valid & (bad == 0) & (best != _NO_INDEX) & (best == target)
    tl.store(greedy_ptr + row, greedy.to(tl.int8))


def launch(cond, uncond, targets, logprobs, greedy, stats, mode, gamma, gamma_rows, mix, mix_rows,
           n_splits, split_len, key=None):
    """Runs both passes on `[N, V]` row-strided `cond`/`uncond` and int64 `targets` `[N]`, writing
    fp32 `logprobs` `[N]` and int8 `greedy` `[N]`.

    `stats` is fp32 scratch of at least `N * n_splits * TOKEN_STATS` floats. `gamma`, `mix`,
    `gamma_rows`, `mix_rows` and `key` are as in `guidance.launch`; `mix` is ignored unless `mode` is
    interpolated.
    """
    batch, vocab = cond.shape
    gamma_per_row = gamma_rows is not None
    mix_per_row = mix_rows is not None and mode == INTERPOLATED
    mix_rows = mix_rows if mix_per_row else None
    _run(_token_stats_kernel, (batch, n_splits), key and ("token-stats",) + key,
         (cond, uncond, stats, gamma, gamma_rows, mix, mix_rows, vocab, cond.stride(0),
          uncond.stride(0), split_len),
         dict(MODE=mode, GAMMA_PER_ROW=gamma_per_row, MIX_PER_ROW=mix_per_row, BLOCK=BLOCK,
              GROUP=launch_group(cond)))
    _run(_token_finish_kernel, (batch,), key and ("token-finish",) + key,
         (cond, uncond, targets, logprobs, greedy, stats, gamma, gamma_rows, mix, mix_rows, vocab,
          cond.stride(0), uncond.stride(0), n_splits),
         dict(MODE=mode, GAMMA_PER_ROW=gamma_per_row, MIX_PER_ROW=mix_per_row,
              MAX_SPLITS=MAX_SPLITS))


def specializations():
    """Every (kernel, signature, constexprs, num_warps) that `launch` can produce, for AOT checks
    (see `guidance.specializations`)."""
    for in_t in ("*fp32", "*fp16", "*bf16"):
        for mode in (RAW, NORMALIZED, INTERPOLATED):
            for gamma_rows in (False, True):
                for mix_rows in ((False, True) if mode == INTERPOLATED else (False,)):
                    rows = {"gamma_ptr": "*fp32" if gamma_rows else "constexpr",
                            "mix": "fp32", "mix_ptr": "*fp32" if mix_rows else "constexpr"}
                    flags = {"MODE": mode, "GAMMA_PER_ROW": gamma_rows, "MIX_PER_ROW": mix_rows}
                    if not gamma_rows:
                        flags["gamma_ptr"] = None
                    if not mix_rows:
                        flags["mix_ptr"] = None
                    sig = {"c_ptr": in_t, "u_ptr": in_t, "stats_ptr": "*fp32", "gamma": "fp32",
                           **rows, "V": "i32", "stride_c": "i32", "stride_u": "i32",
                           "split_len": "i32", "MODE": "constexpr", "GAMMA_PER_ROW": "constexpr",
                           "MIX_PER_ROW": "constexpr", "BLOCK": "constexpr", "GROUP": "constexpr"}
                    yield (_token_stats_kernel, sig,
                           {**flags, "BLOCK": BLOCK, "GROUP": group(_BYTES[in_t])}, NUM_WARPS)
                    sig = {"c_ptr": in_t, "u_ptr": in_t, "targets_ptr": "*i64",
                           "logprobs_ptr": "*fp32", "greedy_ptr": "*i8", "stats_ptr": "*fp32",
                           "gamma": "fp32", **rows, "V": "i32", "stride_c": "i32",
                           "stride_u": "i32", "n_splits": "i32", "MODE": "constexpr",
                           "GAMMA_PER_ROW": "constexpr", "MIX_PER_ROW": "constexpr",
                           "MAX_SPLITS": "constexpr"}
                    yield _token_finish_kernel, sig, {**flags, "MAX_SPLITS": MAX_SPLITS}, NUM_WARPS
