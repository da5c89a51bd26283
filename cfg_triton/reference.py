"""Literal pure-torch guidance: the oracle every test and benchmark compares against.

Written for clarity, not speed: each formula of the semantics is one line, evaluated in the dtype of
the inputs (pass float64 tensors for an oracle). The masking policy of `cfg_triton.guidance` is
applied with explicit `torch.where` so that the oracle states it as plainly as the formulas:

* a token that is `-inf` in `cond` is `-inf` in the output, whatever `guidance_scale` and `mix`;
* a token that is `-inf` only in `uncond` gets no guidance: its unconditional log-probability is
  replaced by its conditional one (`ul_i := cl_i`; in raw mode, `u_i := c_i`), so its guided score
  is its conditional score;
* a row with every token `-inf` in `cond` comes out all `-inf`;
* NaN or `+inf` anywhere in a row makes that row's output NaN (raw mode: that element).
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


def _per_row(value, like: torch.Tensor) -> torch.Tensor | float:
    """A float stays a float; a `[B]` tensor becomes a `[B, 1]` column in `like`'s dtype."""
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype).reshape(-1, 1)
    return float(value)


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    # An all -inf row has no distribution; keep it all -inf rather than NaN.
    out = torch.log_softmax(x, dim=-1)
    dead = torch.isneginf(x).all(dim=-1, keepdim=True)
    return torch.where(dead, torch.full_like(out, NEG_INF), out)


def raw_cfg(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale) -> torch.Tensor:
    """`u + γ (c − u)` on raw logits. `cond`, `uncond`: `[B, V]` float; returns `[B, V]`."""
    gamma = _per_row(guidance_scale, cond)
    u = torch.where(torch.isneginf(uncond), cond, uncond)
    out = u + gamma * (cond - u)
    out = torch.where(torch.isposinf(cond) | torch.isposinf(u), torch.full_like(out, float("nan")), out)
    return torch.where(torch.isneginf(cond), torch.full_like(out, NEG_INF), out)


def normalized_cfg(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale) -> torch.Tensor:
    """`ul + γ (cl − ul)` with `cl`, `ul` the log-softmax of each branch. `[B, V]` in and out."""
    gamma = _per_row(guidance_scale, cond)
    cl = _log_softmax(cond)
    ul = torch.where(torch.isneginf(uncond), cl, _log_softmax(uncond))
    g = ul + gamma * (cl - ul)
    return torch.where(torch.isneginf(cond), torch.full_like(g, NEG_INF), g)


def interpolated_cfg(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale, mix) -> torch.Tensor:
    """`α · log_softmax(g) + (1 − α) · cl`, `g` the normalized CFG scores. `[B, V]` in and out."""
    alpha = _per_row(mix, cond)
    cl = _log_softmax(cond)
    g = normalized_cfg(cond, uncond, guidance_scale)
    out = alpha * _log_softmax(g) + (1 - alpha) * cl
    return torch.where(torch.isneginf(cond), torch.full_like(out, NEG_INF), out)


def guidance(cond, uncond, guidance_scale, *, mix=None, normalize=True) -> torch.Tensor:
    """The reference with the public op's argument conventions."""
    if mix is not None:
        return interpolated_cfg(cond, uncond, guidance_scale, mix)
    if normalize:
        return normalized_cfg(cond, uncond, guidance_scale)
    return raw_cfg(cond, uncond, guidance_scale)
