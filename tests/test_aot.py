"""Every kernel specialization compiles for sm_80 and sm_90 (no GPU needed) without spilling.

The full grid (over a thousand compiles, minutes) is `slow`; the default run compiles one
specialization of each kernel for sm_90."""
import json
import os
import subprocess
import sys

import pytest
from conftest import AOT, start_aot

import cfg_triton
from cfg_triton.kernels import guidance as kernels
from cfg_triton.kernels import sampling, token_logprobs


@pytest.fixture(scope="module")
def compiled(request):
    if not cfg_triton.triton_available():
        pytest.skip("triton is not installed")
    # The test session interprets kernels; compiling needs a process that does not. conftest.py
    # started it after collection, unless these are the only tests run.
    process, out, err = request.config.stash.get(AOT, None) or start_aot()
    returncode = process.wait(timeout=1800)
    out.seek(0)
    err.seek(0)
    stdout = out.read()
    assert stdout, err.read()
    return json.loads(stdout), returncode


@pytest.mark.slow
def test_every_specialization_compiles_for_sm80_and_sm90(compiled):
    rows, _ = compiled
    n = len(list(kernels.specializations()))
    assert n == 3 * (2 * 2 + 4 * (2 + 2 + 4))  # in dtypes x (stats + out dtypes x write variants)
    # token_logprobs: in dtypes x (raw, normalized: per-row γ or not; interpolated: x per-row α)
    # x (stats, finish)
    n_tokens = len(list(token_logprobs.specializations()))
    assert n_tokens == 3 * (2 + 2 + 4) * 2
    n += n_tokens
    # sample: in dtypes x (modes x (stats: noise x log-probs; finish: x min-p, x top-k/top-p with
    # noise; search; draw; draw finish: x log-probs), the guidance statistics of rows with tokens
    # masked in uncond alone (normalized, interpolated), that group's pass (noise and/or log-probs)),
    # and the step kernel x log-probs; γ, α and T are always per row
    n_sample = len(list(sampling.specializations()))
    assert n_sample == 3 * (3 * (2 * 2 + (2 * 2 + 2 * 2 * 2) + 1 + 1 + 2) + 2 + 3) + 2
    n += n_sample
    for arch in ("sm_80", "sm_90"):
        assert sum(r["arch"] == arch for r in rows) == 2 * n  # aligned and unaligned


@pytest.mark.slow
def test_no_specialization_spills(compiled):
    rows, returncode = compiled
    spilling = [r for r in rows if r["local"] or r["stack"]]
    assert not spilling, spilling
    assert returncode == 0
    assert max(r["registers"] for r in rows) <= 128  # leaves room for two blocks of 256 threads per SM


def test_every_kernel_family_compiles_for_sm90():
    if not cfg_triton.triton_available():
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "cfg_triton.aot", "--json", "--arch", "90",
                           "--one-per-kernel"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    names = {spec[0].__name__ for module in (kernels, token_logprobs, sampling)
             for spec in module.specializations()}
    assert {r["kernel"] for r in rows} == names and len(rows) == len(names)
    assert not [r for r in rows if r["local"] or r["stack"]]
