"""Counter-based Gumbel noise keyed by (seed, row, step, token), identical in torch and in Triton.

Every random number is a pure function of its key, so a draw does not depend on how the vocabulary
is split across programs, on block sizes, or on any generator state: the same seed and step give
the same token on every path, and a decode step needs no host-side state (seed and step may live
on the device, inside a CUDA graph).

The hash is the 32-bit MurmurHash3 finalizer, chained: a row key from (seed, row, step), then one
value per token. `kernels/sampling.py` computes the same function in uint32 arithmetic.
"""
from __future__ import annotations

import torch

_MASK = 0xFFFFFFFF
GOLDEN = 0x9E3779B9


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    # (h * c) mod 2**32 for h < 2**32 held in int64, in two halves so no product overflows int64.
    return (h * (c & 0xFFFF) + ((h * (c >> 16)) & 0xFFFF) * 65536) & _MASK


def mix32(h: torch.Tensor) -> torch.Tensor:
    """The MurmurHash3 32-bit finalizer on int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def row_keys(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """`[B]` uint32 row keys (as int64) from `[B]` int64 seeds and steps; row i mixes in i."""
    rows = torch.arange(seed.shape[0], device=seed.device, dtype=torch.int64)
    h = mix32((seed & _MASK) ^ GOLDEN)
    h = mix32(h ^ ((seed >> 32) & _MASK))
    h = mix32(h ^ rows)
    return mix32(h ^ (step & _MASK))


def gumbel(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """`[B, V]` float32 standard Gumbel noise for row keys `[B]`: `-log(-log(u))`, with `u` the top
    24 bits of each hash, centred in its interval so that it is never 0 or 1."""
    tokens = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    h = mix32(keys[:, None] ^ mix32(tokens + GOLDEN)[None, :])
    u = ((h >> 8).to(torch.float32) + 0.5) * (2.0 ** -24)
    return -torch.log(-torch.log(u))
