"""`cfg_triton.token_logprobs`: the guided log-probability of given tokens, without a `[N, V]` output."""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from . import torch_impl
from .ops import _aligned, _num_sms, _stats_scratch, checked_inputs, uses_triton

try:
    from .kernels import guidance as _guidance_kernels
    from .kernels import token_logprobs as _kernels
except ImportError:  # pragma: no cover - exercised only where triton is absent
    _kernels = None

# Rows per step of the torch path: about 4 MiB of fp32 scores at a time, so that scoring a long
# `[B, T, V]` batch adds a few small buffers to memory, never a second logits tensor.
_TORCH_CHUNK_ELEMENTS = 1 << 20


class TokenLogprobs(NamedTuple):
    """`logprobs`: float32 (float64 for float64 logits), shaped like `targets`; `greedy`: bool, same
    shape, whether each target is the guided argmax."""

    logprobs: torch.Tensor
    greedy: torch.Tensor


def _flat(x: torch.Tensor) -> torch.Tensor:
    # [B, T, V] -> [B*T, V]: a view when the rows are evenly spaced (a contiguous tensor, such as a
    # model's `logits_to_keep` output), else a copy.
    return x.flatten(0, -2) if x.dim() == 3 else x


def _check_targets(targets, lead_shape, vocab: int, device) -> None:
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or \
            targets.dtype == torch.bool or targets.is_complex():
        raise TypeError("targets must be an integer tensor of token ids, got "
                        f"{getattr(targets, 'dtype', type(targets).__name__)}")
    if tuple(targets.shape) != tuple(lead_shape):
        raise ValueError(f"targets must have shape {tuple(lead_shape)} (the logits without their "
                         f"vocabulary dimension), got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"targets are on {targets.device} but the logits are on {device}")
    # Reading device values would sync an accelerator; there an out-of-range id gives NaN instead.
    if targets.device.type == "cpu" and targets.numel() and \
            not bool(((targets >= 0) & (targets < vocab)).all()):
        bad = targets[(targets < 0) | (targets >= vocab)][0].item()
        raise ValueError(f"target id {bad} is outside the vocabulary [0, {vocab})")


def token_logprobs(cond: torch.Tensor, uncond: torch.Tensor, targets: torch.Tensor, guidance_scale,
                   *, mix=None, normalize: bool = True) -> TokenLogprobs:
    """The guided log-probability of one target token per position, and whether it is the argmax.

    Args:
        cond, uncond: `[N, V]` or `[B, T, V]` logits of the two branches, as for `guidance` (fp16,
            bf16, fp32 or fp64, one device). `[B, T, V]` is flattened without a copy where its
            rows are evenly spaced (a contiguous tensor); other layouts are copied.
        targets: integer token ids shaped like the logits without `V` (`[N]` or `[B, T]`).
        guidance_scale, mix, normalize: as for `guidance`; `[B]`-tensor values are per row of the
            flattened `[N, V]` logits.

    Returns `TokenLogprobs(logprobs, greedy)`, both shaped like `targets`:
        * `logprobs[i]` is `guidance(cond, uncond, ...)[i, targets[i]]`, with the same masking and
          NaN policy (`normalize=False` gives the raw combination `u + γ (c − u)`);
        * `greedy[i]` is whether `targets[i]` is the row's guided argmax, ties going to the lowest
          index (as `torch.argmax`); it is False for a row holding NaN or `+inf` in either branch,
          and for a row with no finite guided score (all `-inf` in `cond`), where `sample` draws -1.
          The argmax ranks tokens by their exact guided scores computed from the logits, so it can
          differ from the argmax of a rounded `guidance` output only between tokens whose scores
          are within one rounding step.

    Both branches are read once; nothing of size `[N, V]` is written. CUDA tensors (fp16, bf16,
    fp32) run Triton kernels, everything else the torch path in row chunks. Target ids are checked
    on the CPU; on an accelerator an id outside `[0, V)` gives NaN and `greedy=False` rather than
    a device sync.
    """
    if isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor) and cond.dim() == 3:
        if uncond.shape != cond.shape:
            raise ValueError(f"cond and uncond must have one shape, got {tuple(cond.shape)} and "
                             f"{tuple(uncond.shape)}")
    lead = cond.shape[:-1] if isinstance(cond, torch.Tensor) else ()
    cond, uncond, mode, gamma, gamma_rows, mix_value, mix_rows = checked_inputs(
        _flat(cond), _flat(uncond), guidance_scale, mix, normalize)
    vocab = cond.shape[1]
    if vocab == 0:
        raise ValueError("cond and uncond have an empty vocabulary (V = 0)")
    _check_targets(targets, lead, vocab, cond.device)
    flat_targets = targets.reshape(-1).to(torch.int64)
    if cond.shape[0] == 0:
        dtype = torch.float64 if cond.dtype == torch.float64 else torch.float32
        return TokenLogprobs(torch.empty(lead, dtype=dtype, device=cond.device),
                             torch.empty(lead, dtype=torch.bool, device=cond.device))
    if uses_triton(cond):
        lp, greedy = _run_triton(cond, uncond, flat_targets.contiguous(), gamma_rows, gamma,
                                 mix_rows, mix_value, mode)
    else:
        g = gamma if gamma_rows is None else gamma_rows[:, None]
        a = mix_value if mix_rows is None else mix_rows[:, None]
        lp, greedy = _torch_path(cond, uncond, flat_targets, g, a, mode)
    return TokenLogprobs(lp.reshape(lead), greedy.reshape(lead))


def _run_triton(cond, uncond, targets, gamma_rows, gamma, mix_rows, mix, mode):
    rows, vocab = cond.shape
    device = cond.device
    n_splits, split_len = _guidance_kernels.plan(rows, vocab, _num_sms(device))
    stats = _stats_scratch(device, rows * n_splits * _kernels.TOKEN_STATS)
    logprobs = torch.empty(rows, dtype=torch.float32, device=device)
    greedy = torch.empty(rows, dtype=torch.int8, device=device)
    key = None
    if cond.is_cuda:  # see ops._run_triton: everything Triton specializes on
        key = (device.index, mode, cond.dtype, rows, vocab, cond.stride(0), uncond.stride(0),
               n_splits, _aligned(cond) and _aligned(uncond) and _aligned(targets),
               gamma_rows is None, _aligned(gamma_rows), mix_rows is None, _aligned(mix_rows))
    with torch.cuda.device(device) if cond.is_cuda else contextlib.nullcontext():
        _kernels.launch(cond, uncond, targets, logprobs, greedy, stats, mode, gamma, gamma_rows, mix,
                        mix_rows, n_splits, split_len, key)
    return logprobs, greedy.view(torch.bool)


def _rows(x, rows: slice):
    return x[rows] if isinstance(x, torch.Tensor) else x


def _torch_path(cond, uncond, targets, gamma, mix, mode):
    """Row chunks of the torch guidance path, each reduced to its targets' scores and argmax."""
    rows, vocab = cond.shape
    out_dtype = torch.float64 if cond.dtype == torch.float64 else torch.float32
    logprobs = torch.empty(rows, dtype=out_dtype, device=cond.device)
    greedy = torch.empty(rows, dtype=torch.bool, device=cond.device)
    step = max(1, _TORCH_CHUNK_ELEMENTS // vocab)
    for start in range(0, rows, step):
        part = slice(start, start + step)
        c, u, t = cond[part], uncond[part], targets[part, None]
        scores = torch_impl.guidance(c, u, _rows(gamma, part), _rows(mix, part), mode, out_dtype)
        logprobs[part] = scores.gather(1, t)[:, 0]
        # A row sum (in float64: finite logits cannot overflow it) is +inf or NaN exactly when the
        # row holds +inf or NaN.
        poisoned = ~((c.sum(-1, dtype=torch.float64) < float("inf"))
                     & (u.sum(-1, dtype=torch.float64) < float("inf")))
        top, first = scores.max(-1)  # the first maximum, as argmax; none in a row of all -inf
        greedy[part] = (first == t[:, 0]) & (top > float("-inf")) & ~poisoned
    return logprobs, greedy
