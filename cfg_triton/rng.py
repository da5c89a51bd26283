"""Counter-based Gumbel noise keyed by (seed, row, step, token), identical in torch and in Triton.

Every random number is a pure function of its key, so a draw does not depend on how the vocabulary
is split across programs, on block sizes, or on any generator state: the same seed and step give
the same token on every path, and a decode step needs no host-side state (seed and step may live
on the device, inside a CUDA graph).

The hash is the 32-bit MurmurHash3 finalizer, chained: a row key from (seed, row, step) (all 64 bits
of an int64 seed and step), then one value per token. `kernels/sampling.py` computes the same
function in uint32 arithmetic.
"""
from __future__ import annotations

import functools

import torch

_MASK = 0xFFFFFFFF
GOLDEN = 0x9E3779B9


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


def row_keys(seed, step, batch: int = None, device=None) -> torch.Tensor:
    """`[B]` uint32 row keys (as int64) from seeds and steps; row i mixes in i.

    `seed` and `step` are int64 `[B]` tensors, or Python ints with `batch` and `device` given
    (then the keys are computed on the host: a decode step's few rows cost no tensor ops).
    """
    if isinstance(seed, int) and isinstance(step, int):
        keys = [_row_key(seed, row, step) for row in range(batch)]
        return torch.tensor(keys, dtype=torch.int64, device=device)
    return _row_key(seed, torch.arange(seed.shape[0], device=seed.device, dtype=torch.int64), step)


@functools.lru_cache(maxsize=16)
def _token_hashes(vocab: int, device: torch.device) -> torch.Tensor:
    # The per-token half of the hash depends on the vocabulary only: computed once per size.
    return mix32(torch.arange(vocab, device=device, dtype=torch.int64) + GOLDEN)


def _mix32_(h: torch.Tensor) -> torch.Tensor:
    """`mix32` in place: a `[B, V]` draw then needs one int64 temporary instead of a dozen."""
    h ^= h >> 16
    h.mul_(0x85EBCA6B).bitwise_and_(_MASK)
    h ^= h >> 13
    h.mul_(0xC2B2AE35).bitwise_and_(_MASK)
    h ^= h >> 16
    return h


def _to_gumbel(h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Hashes -> noise into `out`: `-log(-log(u))`, with `u` the top 24 bits of each hash, centred in
    its interval so that it is never 0 or 1."""
    out.copy_(h >> 8)
    return out.add_(0.5).mul_(2.0 ** -24).log_().neg_().log_().neg_()


# Rows hashed at once: the int64 temporaries of a few rows stay in cache.
_ROWS_PER_CHUNK = 2


def gumbel(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """`[B, V]` float32 standard Gumbel noise for row keys `[B]` (token j of row r keyed by
    `mix32(keys[r] ^ mix32(j + GOLDEN))`)."""
    hashes = _token_hashes(vocab, keys.device)
    out = torch.empty((keys.shape[0], vocab), dtype=torch.float32, device=keys.device)
    for i in range(0, keys.shape[0], _ROWS_PER_CHUNK):
        rows = slice(i, i + _ROWS_PER_CHUNK)
        _to_gumbel(_mix32_(keys[rows, None] ^ hashes), out[rows])
    return out


def gumbel_at(keys: torch.Tensor, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """The noise of `gumbel(keys, vocab)` at int64 token ids `tokens` `[B, L]` only: `[B, L]` fp32."""
    h = _mix32_(keys[:, None] ^ _token_hashes(vocab, keys.device)[tokens])
    return _to_gumbel(h, torch.empty(tokens.shape, dtype=torch.float32, device=keys.device))
