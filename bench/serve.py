"""Runs bench/test_serve_bench.py and appends its table, with the machine, to a results file.

    python bench/serve.py LABEL [--out bench/results/serve-<machine>.md]

Each run adds one block: served tokens per second and mean time to first token of the guided
engine, the same engine unguided, and per-request `model.generate` behind a lock, at 1, 4 and 16
concurrent streams, with the two ratios the server is held to at 16 streams.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402


def summary(raw: dict, label: str) -> str:
    machine = raw["machine_info"]["cfg_triton"]
    rows = {(b["extra_info"]["impl"], b["extra_info"]["streams"]): b["extra_info"] for b in raw["benchmarks"]}
    impls = ["guided", "unguided", "per-request"]
    streams = sorted({s for _, s in rows})
    lines = [f"## {label}: {machine['name']}, {machine['cores']} cores, torch {machine['torch']}, "
             f"{machine['threads']} threads",
             "",
             "SmolLM2-135M, greedy, 32 new tokens a stream, γ = 1.5 with a negative prompt (unguided: γ = 1); "
             "all streams submitted at once; tokens/s of all streams together, mean time to first token.",
             "",
             "| streams | " + " | ".join(f"{i} tok/s | {i} TTFT" for i in impls) + " |",
             "|---:|" + "---:|---:|" * len(impls)]
    for s in streams:
        cells = []
        for i in impls:
            r = rows[(i, s)]
            cells += [f"{r['tokens_per_s']:.0f}", f"{r['ttft_mean']:.2f} s"]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    top = streams[-1]
    guided = rows[("guided", top)]["tokens_per_s"]
    lines += ["", f"At {top} streams: guided / unguided {guided / rows[('unguided', top)]['tokens_per_s']:.2f}x "
              f"(target >= 0.45x), guided / per-request {guided / rows[('per-request', top)]['tokens_per_s']:.2f}x "
              f"(target >= 3x)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return run.append_summary(argv, __doc__.splitlines()[0], "test_serve_bench.py", summary, "serve-{machine}.md")


if __name__ == "__main__":
    sys.exit(main())
