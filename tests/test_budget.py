"""The streaming loops' issue budget, read from the sm_90 SASS of every bf16 specialization (no GPU
needed; `cfg_triton/budget.py` states the model). A static, deterministic property of the compiled
code: each pass is held to its budget, and the passes not yet rebuilt to meet it are listed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cfg_triton

# Passes whose loops still issue more than their budget (docs/kernels.md, "The issue budget"). A
# rebuilt loop that meets its budget must leave this list: the test fails until it does.
OVER_BUDGET = {
    "_guidance_stats_kernel",
    "_token_stats_kernel",
    "_sample_stats_kernel (greedy)",
    "_sample_stats_kernel (greedy, log-probabilities)",
    "_sample_stats_kernel (noise)",
    "_sample_stats_kernel (noise, log-probabilities)",
    "_sample_search_kernel",
    "_sample_draw_kernel",
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rows():
    if not cfg_triton.triton_available():
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "cfg_triton.budget", "--json"], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.stdout, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_pass_is_counted_and_the_table_is_current(rows):
    from cfg_triton import budget

    families = {budget._family(r) for r in rows}
    assert OVER_BUDGET <= families
    assert all(r["load_bits"] and r["per_entry"] > 0 for r in rows)
    doc = (Path(budget.DOC)).read_text()
    assert budget.summary(rows) in doc, "docs/kernels.md is stale: python -m cfg_triton.budget --write"


def test_each_pass_within_its_budget(rows):
    from cfg_triton import budget

    over = {}
    for r in rows:
        if r["per_entry"] > r["budget"]:
            over.setdefault(budget._family(r), []).append(r["per_entry"])
    unexpected = set(over) - OVER_BUDGET
    assert not unexpected, {k: over[k] for k in unexpected}
    now_within = OVER_BUDGET - set(over)
    assert not now_within, f"within budget now: remove {sorted(now_within)} from OVER_BUDGET"
