"""The streaming loops' issue budget, read from the sm_90 SASS of every specialization and input
dtype (no GPU needed; `cfg_triton/budget.py` states the model). A static, deterministic property of
the compiled code: every pass is held to its budget."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cfg_triton

pytestmark = pytest.mark.slow

# Every pass whose loop streams the vocabulary: a rebuilt or renamed one shows up here.
PASSES = {
    "_guidance_stats_kernel",
    "_guidance_write_kernel (fp32 out)",
    "_guidance_write_kernel (fp16 out)",
    "_guidance_write_kernel (bf16 out)",
    "_guidance_write_kernel (fp64 out)",
    "_token_stats_kernel",
    "_sample_stats_kernel (greedy)",
    "_sample_stats_kernel (greedy, log-probabilities)",
    "_sample_stats_kernel (noise)",
    "_sample_stats_kernel (noise, log-probabilities)",
    "_sample_masked_kernel (greedy, log-probabilities)",
    "_sample_masked_kernel (noise)",
    "_sample_masked_kernel (noise, log-probabilities)",
    "_sample_search_kernel",
    "_sample_draw_kernel",
}
# Loops that keep a barrier per tile, and why (docs/kernels.md): the write pass re-tiles fp32 and
# fp64 output through shared memory for 128-bit stores.
BARRIERS = {"_guidance_write_kernel (fp32 out)", "_guidance_write_kernel (fp64 out)"}


@pytest.fixture(scope="module")
def rows():
    if not cfg_triton.triton_available():
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "cfg_triton.budget", "--json", "--dtype", "bf16",
                           "fp16", "fp32"], env=env, capture_output=True, text=True, timeout=1200)
    assert done.stdout, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_pass_is_counted_and_the_table_is_current(rows):
    from cfg_triton import budget

    assert {budget._family(r) for r in rows} == PASSES
    bf16 = [r for r in rows if r["dtype"] == "bf16"]
    stale = "stale: python -m cfg_triton.budget --write --dtype bf16 fp16 fp32"
    assert budget.summary(bf16) in Path(budget.DOC).read_text(), f"docs/kernels.md is {stale}"
    assert budget.brief(bf16) in Path(budget.README).read_text(), f"README.md is {stale}"


def test_each_pass_within_its_budget(rows):
    from cfg_triton import budget

    over = [(budget._family(r), r["dtype"], r["constexprs"], r["per_entry"], r["budget"])
            for r in rows if r["per_entry"] > r["budget"]]
    assert not over


def test_loops_load_128_bits_and_keep_no_needless_barrier(rows):
    from cfg_triton import budget

    for r in rows:
        assert r["load_bits"] == [128], (budget._family(r), r["dtype"], r["load_bits"])
        assert r["shuffles"] == 0, (budget._family(r), r["dtype"])
        if budget._family(r) not in BARRIERS:
            assert r["barriers"] == 0, (budget._family(r), r["dtype"])
