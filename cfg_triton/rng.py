"""Counter-based Gumbel noise keyed by (seed, row, step, token), identical in torch and in Triton.

Every random number is a pure function of its key, so a draw does not depend on how the vocabulary
is split across programs, on block sizes, or on any generator state: the same seed and step give
the same token on every path, and a decode step needs no host-side state (seed and step may live
on the device, inside a CUDA graph).

The hash is the 32-bit MurmurHash3 finalizer: chained, it makes a row key from (seed, row, step) (all
64 bits of an int64 seed and step); token j of a row with key k hashes `mix32(j * (k | 1) + mix32(k))`
(mod 2**32): one finalizer per token, and rows with distinct keys step through distinct odd
multiples, so no row's noise is another's shifted by some tokens. The noise is base-2 Gumbel,
`-log2(-log2(u))` (two hardware `log2` in a kernel), and a draw is `argmax(s + T·ln2·g)`: `ln2·g` is a
standard Gumbel shifted by the constant ln(ln 2), which no argmax sees. `kernels/sampling.py`
computes the same function in uint32 and float32 arithmetic.
"""
from __future__ import annotations

import functools
import math

import torch

_MASK = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
LN2 = math.log(2.0)  # the noise's scale: a draw is argmax(s + T·LN2·g)


def mix32(h):
    """The MurmurHash3 32-bit finalizer on uint32 values held in Python ints or int64 tensors.

    A product of two values below 2**32 overflows int64, but it wraps modulo 2**64, which keeps
    its low 32 bits exact: the mask after each product gives the same value as in Python ints.
    """
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK
    return h ^ (h >> 16)


def _row_key(seed, row, step):
    """The key of (seed, row, step) (int64 seeds and steps), as Python ints or as int64 tensors."""
    h = mix32((seed & _MASK) ^ GOLDEN)
    h = mix32(h ^ ((seed >> 32) & _MASK))
    h = mix32(h ^ row)
    h = mix32(h ^ (step & _MASK))
    # A step's high half is mixed in only where it is not 0: steps below 2**32 keep the keys they
    # have always had, and steps 2**32 apart no longer share one.
    high = (step >> 32) & _MASK
    if isinstance(h, torch.Tensor):
        return torch.where(high != 0, mix32(h ^ high), h)
    return mix32(h ^ high) if high else h


def row_keys(seed, step, batch: int = None, device=None, rows=None) -> torch.Tensor:
    """`[B]` uint32 row keys (as int64) from seeds and steps; row i mixes in i, or `rows[i]`.

    `seed` and `step` are int64 `[B]` tensors, or Python ints with `batch` and `device` given
    (then the keys are computed on the host: a decode step's few rows cost no tensor ops).
    `rows` (int64 `[B]`, optional) replaces each row's position as the row of its key: a server
    keys every request as row 0 so that its draws do not depend on where the batch put it.
    """
    if rows is None and isinstance(seed, int) and isinstance(step, int):
        keys = [_row_key(seed, row, step) for row in range(batch)]
        return torch.tensor(keys, dtype=torch.int64, device=device)
    if rows is None:
        rows = torch.arange(seed.shape[0], device=seed.device, dtype=torch.int64)
    return _row_key(seed, rows, step)


def token_hash_constants(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row key: (odd multiplier, offset) of its tokens' hashes, as int64 below 2**32."""
    return keys | 1, mix32(keys)


def _mix32_(h: torch.Tensor) -> torch.Tensor:
    """`mix32` in place: a `[B, V]` draw then needs one int64 temporary instead of a dozen."""
    h ^= h >> 16
    h.mul_(0x85EBCA6B).bitwise_and_(_MASK)
    h ^= h >> 13
    h.mul_(0xC2B2AE35).bitwise_and_(_MASK)
    h ^= h >> 16
    return h


def _token_hashes(keys: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Hashes of int64 token ids `tokens` (`[V]` or `[B, L]`) under row keys `[B]`: `[B, *]` int64."""
    multiplier, offset = token_hash_constants(keys)
    h = tokens * multiplier[:, None]  # below 2**49: no int64 overflow
    return _mix32_(h.add_(offset[:, None]).bitwise_and_(_MASK))


def _to_gumbel(h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Hashes -> noise into `out`: `-log2(-log2(u))`, with `u` the top 23 bits of each hash centred
    in its interval, `(k + 1/2) 2**-23`: exact in float32, never 0 or 1."""
    out.copy_(h >> 9)
    return out.add_(0.5).mul_(2.0 ** -23).log2_().neg_().log2_().neg_()


# Rows hashed at once: the int64 temporaries of a few rows stay in cache.
_ROWS_PER_CHUNK = 2


@functools.lru_cache(maxsize=16)
def _token_ids(vocab: int, device: torch.device) -> torch.Tensor:
    return torch.arange(vocab, device=device, dtype=torch.int64)


def gumbel(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """`[B, V]` float32 base-2 Gumbel noise for row keys `[B]` (see the module docstring)."""
    tokens = _token_ids(vocab, keys.device)
    out = torch.empty((keys.shape[0], vocab), dtype=torch.float32, device=keys.device)
    for i in range(0, keys.shape[0], _ROWS_PER_CHUNK):
        rows = slice(i, i + _ROWS_PER_CHUNK)
        _to_gumbel(_token_hashes(keys[rows], tokens), out[rows])
    return out


def gumbel_at(keys: torch.Tensor, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """The noise of `gumbel(keys, vocab)` at int64 token ids `tokens` `[B, L]` only: `[B, L]` fp32."""
    h = _token_hashes(keys, tokens)
    return _to_gumbel(h, torch.empty(tokens.shape, dtype=torch.float32, device=keys.device))
