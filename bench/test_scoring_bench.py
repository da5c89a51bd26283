"""Guided scoring: what CFG adds to LAMBADA scoring, and what `token_logprobs` adds to memory.

- `lambada`: `cfg_triton.score` on the bundled SmolLM2 over the first 64 LAMBADA examples, unguided
  (γ = 1: the conditional branch only) and guided (γ = 1.5: plus the short unconditional branch),
  side by side in one run; docs/benchmarks.md reports ms per example and their ratio.
- `memory`: the peak memory that reducing `[8, 512, 49,152]` fp32 logits of both branches to
  per-token guided log-probabilities adds on top of the logits themselves, measured in a fresh
  process (peak resident set on CPU, `max_memory_allocated` on CUDA): `token_logprobs` against
  `guidance` followed by a gather, which materializes the guided `[B·T, V]` tensor.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cfg_triton

LAMBADA = Path(os.environ.get("CFG_TRITON_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) \
    / "lambada_test.jsonl"
EXAMPLES = 64
SHAPE = (8, 512, 49_152)

_PEAK_SCRIPT = r"""
import json, resource, sys, torch
import cfg_triton
impl, device = sys.argv[1], sys.argv[2]
b, t, v = map(int, sys.argv[3:6])
gen = torch.Generator(device=device).manual_seed(0)
cond = torch.randn(b, t, v, generator=gen, device=device)
uncond = torch.randn(b, t, v, generator=gen, device=device)
targets = torch.randint(0, v, (b, t), generator=gen, device=device)

def run(cond, uncond, targets):
    if impl == "token_logprobs":
        return cfg_triton.token_logprobs(cond, uncond, targets, 1.5).logprobs
    full = cfg_triton.guidance(cond.flatten(0, 1), uncond.flatten(0, 1), 1.5)
    return full.gather(1, targets.reshape(-1, 1))

with torch.inference_mode():
    # Warm on a slice: libraries, thread pools and kernels load here, not in the measured call.
    # The peak resident set only grows, so the measured call must be the first large one.
    run(cond[:1, :4], uncond[:1, :4], targets[:1, :4])
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run(cond, uncond, targets)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        run(cond, uncond, targets)
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(json.dumps({"peak_extra_bytes": max(extra, 0), "logits_bytes": cond.numel() * cond.element_size()}))
"""


@pytest.fixture(scope="module")
def smollm2():
    from cfg_triton import models

    try:
        return models.load("smollm2")
    except ModuleNotFoundError as e:
        pytest.skip(str(e))


@pytest.mark.skipif(not LAMBADA.exists(), reason=f"no LAMBADA file at {LAMBADA}")
@pytest.mark.parametrize("impl", ["unguided", "guided"])
def test_lambada_scoring(benchmark, smollm2, impl):
    model, tok = smollm2
    with LAMBADA.open() as f:
        texts = [json.loads(line)["text"] for line, _ in zip(f, range(EXAMPLES))]
    contexts = [t.rsplit(" ", 1)[0] for t in texts]
    continuations = [" " + t.rsplit(" ", 1)[1] for t in texts]
    gamma = 1.0 if impl == "unguided" else 1.5
    benchmark.extra_info.update(scoring=impl, examples=EXAMPLES, guidance_scale=gamma)
    benchmark.pedantic(lambda: cfg_triton.score(model, tok, contexts, continuations, guidance_scale=gamma),
                       warmup_rounds=1, rounds=5, iterations=1)


@pytest.mark.parametrize("impl", ["token_logprobs", "guidance_gather"])
def test_scoring_peak_memory(benchmark, device, impl):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, impl, device, *map(str, SHAPE)],
                          capture_output=True, text=True, env=env, timeout=600, check=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    benchmark.extra_info.update(memory=impl, shape=list(SHAPE), device=device, **measured)
    gen = torch.Generator(device=device).manual_seed(0)
    cond = torch.randn(*SHAPE, generator=gen, device=device)
    uncond = torch.randn(*SHAPE, generator=gen, device=device)
    targets = torch.randint(0, SHAPE[2], SHAPE[:2], generator=gen, device=device)

    def run():
        if impl == "token_logprobs":
            out = cfg_triton.token_logprobs(cond, uncond, targets, 1.5).logprobs
        else:
            out = cfg_triton.guidance(cond.flatten(0, 1), uncond.flatten(0, 1), 1.5).gather(
                1, targets.reshape(-1, 1))
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    with torch.inference_mode():
        benchmark.pedantic(run, warmup_rounds=1, rounds=5, iterations=1)
