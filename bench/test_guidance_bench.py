"""Microbenchmarks of `cfg_triton.guidance` against what users run today.

Peers per point: the literal reference in eager mode, `torch.compile` of it (dynamic shapes, so it
compiles once per semantics and dtype; that first call is recorded separately as compile time), and
the arithmetic of transformers' two CFG processors. Each benchmark records the minimum bytes moved
(GUIDANCE.md §4) so the report can turn medians into effective bandwidth.

On a CPU the grid is trimmed (see GRID): the eager reference at B = 256, V = 262,144 takes seconds
per call and bf16 math on CPU is emulated, so bf16 runs at B <= 8 only.
"""
import time

import pytest
import torch

import cfg_triton
import peers

ON_GPU = torch.cuda.is_available()
SEMANTICS = ["raw", "normalized", "interpolated"]
VOCABS = [32_000, 49_152, 128_256, 151_936, 262_144]
BATCHES = [1, 8, 64, 256] if ON_GPU else [1, 8, 32, 64]
IMPLS = ["fused", "eager", "compiled", "transformers"]


def _grid():
    for dtype in (torch.float32, torch.bfloat16):
        for batch in BATCHES:
            if not ON_GPU and dtype == torch.bfloat16 and batch > 8:
                continue
            for vocab in VOCABS:
                yield dtype, batch, vocab


GRID = list(_grid())
_compiled = {}


def _op(impl, semantics):
    if impl == "fused":
        kw = {"raw": dict(normalize=False), "normalized": {}, "interpolated": dict(mix=0.7)}[semantics]
        return lambda c, u, g: cfg_triton.guidance(c, u, g, **kw)
    if impl == "eager":  # in fp32, as the fused op computes
        return peers.eager_reference(semantics, fp32=True)
    if impl == "transformers":
        return peers.transformers_math(semantics)
    return torch.compile(peers.eager_reference(semantics, fp32=True), dynamic=True)


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("dtype, batch, vocab", GRID,
                         ids=[f"{str(d)[6:]}-B{b}-V{v}" for d, b, v in GRID])
def test_guidance(benchmark, device, impl, semantics, dtype, batch, vocab):
    fn = _op(impl, semantics)
    if fn is None:
        pytest.skip("transformers has no processor for this semantics")
    gen = torch.Generator(device=device).manual_seed(0)
    cond = (torch.randn(batch, vocab, device=device, generator=gen) * 4).to(dtype)
    uncond = (torch.randn(batch, vocab, device=device, generator=gen) * 4).to(dtype)
    if impl == "compiled":  # compile once per semantics and dtype; that first call is the compile time
        key = (semantics, dtype)
        if not _compiled:  # inductor's one-time start-up must not land on the first compile timed
            torch.compile(lambda x: x * 2)(torch.ones(8, device=device))
        if key not in _compiled:
            start = time.perf_counter()
            fn(cond, uncond, 1.5)
            _sync()
            _compiled[key] = (fn, time.perf_counter() - start)
        fn, benchmark.extra_info["compile_s"] = _compiled[key]

    # On a GPU one round queues many calls and syncs once, so launch latency is measured and the
    # host's timer and sync overhead are not; the report divides by calls_per_round.
    calls = max(1, min(200, 200_000_000 // (batch * vocab))) if ON_GPU else 1

    def run():
        for _ in range(calls):
            fn(cond, uncond, 1.5)
        _sync()

    benchmark.extra_info.update(impl=impl, semantics=semantics, dtype=str(dtype)[6:], batch=batch,
                                vocab=vocab, min_bytes=peers.min_bytes(batch, vocab, dtype),
                                calls_per_round=calls)
    benchmark.pedantic(run, warmup_rounds=2, rounds=_rounds(run), iterations=1)


def _rounds(run, seconds=1.5):
    """Enough rounds for a small spread, within about `seconds` per point: 7 to 60."""
    start = time.perf_counter()
    run()
    return max(7, min(60, int(seconds / max(time.perf_counter() - start, 1e-6))))
