"""Host-side cost of one `cfg_triton.guidance` call: what a decode step pays before any kernel runs.

Two paths, side by side in one run:
- `torch`: the whole CPU call (validation, dispatch and the torch path's math) at a decode-sized
  problem, B = 1;
- `launch`: the Triton path measured up to the launch. The CPU tensors are routed to the Triton path
  (as the interpreter does) and the kernel launcher is replaced by a no-op, so the figure is
  validation, planning, scratch and output allocation and argument preparation: everything the op
  adds on the host before Triton takes over. What Triton itself spends launching a compiled kernel
  can only be measured on a GPU (bench/gpu.py reports it there).
"""
import pytest
import torch

import cfg_triton
from cfg_triton import ops

CASES = {"raw": dict(normalize=False), "normalized": {}, "interpolated": dict(mix=0.7)}


@pytest.mark.parametrize("semantics", CASES)
@pytest.mark.parametrize("path", ["launch", "torch"])
def test_host_cost(benchmark, monkeypatch, path, semantics):
    vocab = 262_144 if path == "launch" else 32_000
    cond = torch.randn(1, vocab).to(torch.bfloat16 if path == "launch" else torch.float32)
    uncond = torch.randn(1, vocab).to(cond.dtype)
    if path == "launch":
        if not ops.triton_available():
            pytest.skip("triton is not installed")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(ops._kernels, "launch", lambda *args, **kwargs: None)
        assert ops.uses_triton(cond)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    kw = CASES[semantics]
    calls = 1000 if path == "launch" else 50

    def run():
        for _ in range(calls):
            cfg_triton.guidance(cond, uncond, 1.5, **kw)

    benchmark.extra_info.update(host=path, semantics=semantics, batch=1, vocab=vocab,
                                dtype=str(cond.dtype)[6:], calls_per_round=calls)
    with torch.inference_mode():
        benchmark.pedantic(run, warmup_rounds=3, rounds=30, iterations=1)
