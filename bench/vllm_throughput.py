"""Runs bench/test_vllm_bench.py (in vLLM's environment) and appends its table, with the machine,
to a results file.

    .venv-vllm/bin/python bench/vllm_throughput.py LABEL [--out bench/results/vllm-<machine>.md]

Each run adds one block: generated tokens per second of guided and unguided requests on the same
vLLM engine at 1, 4 and 16 concurrent requests, and their ratio.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402


def summary(raw: dict, label: str) -> str:
    import vllm

    machine = raw["machine_info"]["cfg_triton"]
    rows = {(b["extra_info"]["impl"], b["extra_info"]["streams"]): b["extra_info"] for b in raw["benchmarks"]}
    lines = [f"## {label}: {machine['name']}, {machine['cores']} cores, torch {machine['torch']}, "
             f"vLLM {vllm.__version__}, {machine['threads']} threads",
             "",
             "SmolLM2-135M (float32), greedy, 32 new tokens a request, all requests submitted at once; "
             "guided: γ = 1.5 with a negative prompt (two engine requests each); tokens/s of all "
             "requests together (median of 3 runs).",
             "",
             "| requests | guided tok/s | unguided tok/s | guided / unguided |",
             "|---:|---:|---:|---:|"]
    for s in sorted({s for _, s in rows}):
        g, u = rows[("guided", s)]["tokens_per_s"], rows[("unguided", s)]["tokens_per_s"]
        lines.append(f"| {s} | {g:.0f} | {u:.0f} | {g / u:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return run.append_summary(argv, __doc__.splitlines()[0], "test_vllm_bench.py", summary, "vllm-{machine}.md")


if __name__ == "__main__":
    sys.exit(main())
