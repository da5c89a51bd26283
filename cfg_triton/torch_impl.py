"""Guidance on the torch path (CPU, or float64 anywhere): the one-pass identities, written in torch.

For finite inputs every semantics is an affine combination of the two logits plus a row constant
(GUIDANCE.md §2), so the output is one `lerp` (two for the interpolated variant), a subtraction of
row constants, and one or two row log-sum-exps computed through a small reused scratch buffer.
Rows holding `-inf`, NaN or `+inf` take a slower path that applies the masking policy token by token.
"""
from __future__ import annotations

import torch

from .modes import INTERPOLATED, NORMALIZED, RAW

NEG_INF = float("-inf")
# Row block for the log-sum-exp scratch: small enough to stay in cache, large enough to amortize
# per-op overhead.
_SCRATCH_ELEMENTS = 1 << 20


def _row_max_logsum(x: torch.Tensor):
    """`[B, V]` finite -> (`[B, 1]` row max, `[B, 1]` log Σ exp(x - max)); their sum is the row's
    log-sum-exp. Large inputs go through a reused scratch block instead of a `[B, V]` temporary."""
    top = x.amax(dim=-1, keepdim=True)
    if x.numel() <= _SCRATCH_ELEMENTS:  # small: the temporary is cheap, the loop's overhead is not
        return top, torch.sub(x, top).exp_().sum(dim=-1, keepdim=True).log_()
    rows = max(1, _SCRATCH_ELEMENTS // max(x.shape[-1], 1))
    scratch = torch.empty((min(rows, x.shape[0]), x.shape[-1]), dtype=x.dtype, device=x.device)
    sums = torch.empty_like(top)
    for i in range(0, x.shape[0], rows):
        part = scratch[: min(rows, x.shape[0] - i)]
        torch.sub(x[i : i + rows], top[i : i + rows], out=part).exp_()
        torch.sum(part, dim=-1, keepdim=True, out=sums[i : i + rows])
    return top, sums.log_()


def _shift(x: torch.Tensor) -> torch.Tensor:
    """`x` minus its row maximum, where that maximum is finite (else `x` as is)."""
    top = x.amax(dim=-1, keepdim=True)
    return x - torch.where(torch.isfinite(top), top, torch.zeros_like(top))


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    top = torch.maximum(a, b)
    ref = torch.where(top == NEG_INF, torch.zeros_like(top), top)
    return ref + torch.log(torch.exp(a - ref) + torch.exp(b - ref))


def _masked(c, u, gamma, mix, mode):
    """The masking policy, token by token (see `cfg_triton.guidance`)."""
    if mode != RAW:  # shift-invariant: work relative to each branch's maximum (see `guidance`)
        c, u = _shift(c), _shift(u)
    nan = torch.tensor(float("nan"), dtype=c.dtype, device=c.device)
    c = torch.where(c == float("inf"), nan, c)  # +inf has no distribution: treat it as NaN
    u = torch.where(u == float("inf"), nan, u)
    c_live, u_live = c != NEG_INF, u != NEG_INF
    h = torch.lerp(u, c, gamma)
    if mode == RAW:
        val = torch.where(u_live, h, c)
    else:
        lse_c = torch.logsumexp(c, dim=-1, keepdim=True)
        lse_u = torch.logsumexp(u, dim=-1, keepdim=True)
        z = lse_c + (1 - gamma) * (lse_u - lse_c)
        if mode == NORMALIZED:
            val = torch.where(u_live, h - z, c - lse_c)
        else:
            lse_h = torch.logsumexp(torch.where(u_live & c_live, h, NEG_INF), dim=-1, keepdim=True)
            lse_m = torch.logsumexp(torch.where(u_live, NEG_INF, c), dim=-1, keepdim=True)
            live_mass = torch.where(lse_h == NEG_INF, lse_h, lse_h - z)
            masked_mass = torch.where(lse_m == NEG_INF, lse_m, lse_m - lse_c)
            lse_g = _logaddexp(live_mass, masked_mass)
            live_const = torch.where(masked_mass == NEG_INF, lse_h, z + lse_g)
            cl = c - lse_c
            gl = torch.where(u_live, h - live_const, cl - lse_g)
            val = cl + mix * (gl - cl)
    return torch.where(c_live, val, NEG_INF)


def _masked_in_cond_only(c: torch.Tensor, u: torch.Tensor) -> bool:
    """Whether the only non-finite values are `-inf` in `c` (masked tokens, e.g. a banned EOS),
    with `u` finite and a live token in every row: then the fast formulas hold for the live tokens
    and the masked ones are simply `-inf`. (amax and amin propagate NaN: three row reductions find
    NaN, +inf, dead rows and masks in `u`.)"""
    return bool(torch.isfinite(c.amax(dim=-1)).all() & torch.isfinite(u.amax(dim=-1)).all()
                & torch.isfinite(u.amin(dim=-1)).all())


def guidance(cond, uncond, gamma, mix, mode, out_dtype):
    """`cond`, `uncond`: `[B, V]` float; `gamma`, `mix`: floats or `[B, 1]` tensors. See the op."""
    compute = torch.float64 if cond.dtype == torch.float64 else torch.float32
    c, u = cond.to(compute), uncond.to(compute)
    if isinstance(gamma, torch.Tensor):
        gamma = gamma.to(compute)
    if isinstance(mix, torch.Tensor):
        mix = mix.to(compute)
    if mode == RAW:
        out = torch.lerp(u, c, gamma)  # u + γ (c - u); exactly c at γ = 1
        if not bool(torch.isfinite(out.sum())):
            if not _masked_in_cond_only(c, u):
                return _masked(c, u, gamma, mix, mode).to(out_dtype)
            out.masked_fill_(torch.isneginf(c), NEG_INF)
        return out.to(out_dtype)
    # Normalized and interpolated CFG depend on each branch only up to a per-row constant, so both
    # are taken relative to their row maxima first: with a large constant added to a row's logits,
    # the combination would otherwise cancel digits (an error of one ulp of the constant).
    top_c, logsum_c = _row_max_logsum(c)
    if mode == NORMALIZED:
        top_u, logsum_u = _row_max_logsum(u)
    else:  # LSE(u) cancels in the interpolated variant; only the shift is needed
        top_u = u.amax(dim=-1, keepdim=True)
    out, scratch = torch.sub(c, top_c), torch.sub(u, top_u)
    torch.lerp(scratch, out, gamma, out=out)  # h = u' + γ (c' - u'); exactly c' at γ = 1
    # h is finite exactly where both logits are: -inf, +inf or NaN in either branch turns into
    # ±inf or NaN in h (0 · inf is NaN), so one reduction over h detects masks and bad input alike.
    # A sum overflowing on huge finite logits is told apart below: finite inputs keep the fast path.
    banned = None
    if not bool(torch.isfinite(out.sum())):
        # Tokens masked in cond alone (a common case: banned tokens) keep the fast path: their
        # exponentials are 0 in LSE(c), and their outputs are -inf.
        if not _masked_in_cond_only(c, u):
            return _masked(c, u, gamma, mix, mode).to(out_dtype)
        banned = torch.isneginf(c)
        out.masked_fill_(banned, NEG_INF)
    if mode == NORMALIZED:
        out.sub_(logsum_c + (1 - gamma) * (logsum_u - logsum_c))
    else:
        top_h, logsum_h = _row_max_logsum(out)
        lse_h = top_h + logsum_h  # relative to the shifted branches; top_h is 0 when h == c'
        torch.lerp(torch.sub(c, top_c, out=scratch), out, mix, out=out)
        out.sub_(logsum_c + mix * (lse_h - logsum_c))  # exactly logsum_c when h == c'
    if banned is not None:
        out.masked_fill_(banned, NEG_INF)
    return out.to(out_dtype)


def guided_keys(cond, uncond, gamma, mix, mode, compute):
    """The guided scores of `guidance` up to a per-row constant, which is all that argmax, sampling
    and its filters see (GUIDANCE.md §2): `[B, V]` in `compute`, `-inf` where `cond` is.

    Where `uncond` is finite and `cond` holds no NaN or `+inf` and a live token in every row (the
    common case, banned tokens included), every semantics is `u + γ'·(c − u)` on the live tokens,
    with γ' = γ, or 1 − α + αγ when interpolated: one `lerp` and no log-sum-exp. (Unlike the
    log-probabilities of `guidance`, these scores need no shift to the row maxima: their rounding
    is that of the logits themselves. One `[B, V]` temporary: on the CPU a second one of this size
    costs more in fresh pages than the arithmetic.) Other rows (tokens masked in `uncond` alone,
    NaN, `+inf`, dead rows) take `guidance` itself.
    """
    c, u = cond.to(compute), uncond.to(compute)
    if isinstance(gamma, torch.Tensor):
        gamma = gamma.to(compute)
    if isinstance(mix, torch.Tensor):
        mix = mix.to(compute)
    if not _masked_in_cond_only(c, u):
        return guidance(cond, uncond, gamma, mix, mode, compute)
    weight = gamma if mode != INTERPOLATED else 1 - mix + mix * gamma
    out = torch.lerp(u, c, weight)  # exactly c at γ' = 1
    if bool((c.amin(dim=-1) == NEG_INF).any()):  # banned tokens: lerp made them NaN or ±inf
        out.masked_fill_(torch.isneginf(c), NEG_INF)
    return out
