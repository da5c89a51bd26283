"""Runs bench/test_dropin_bench.py and appends its summary, with the machine, to a results file.

    python bench/dropin.py LABEL [--out bench/results/dropin-<machine>.txt]

LABEL says what was measured (a commit, "before", "after"). Each run adds one block: ms per token
of the three calls, median ± IQR, and the two ratios the drop-in is held to.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402


def summary(raw: dict, label: str) -> str:
    machine = raw["machine_info"]["cfg_triton"]
    rows = {}
    for bench in raw["benchmarks"]:
        info, stats = bench["extra_info"], bench["stats"]
        per = info["tokens"] / 1e3
        rows[info["dropin"]] = (stats["median"] / per, stats["iqr"] / per, stats["rounds"])
    lines = [f"## {label}: {machine['name']}, {machine['cores']} cores, torch {machine['torch']}, "
             f"{machine['threads']} threads",
             "SmolLM2, batch 1, greedy, 32 new tokens, γ = 1.5 with a negative prompt; "
             "ms per token, median ± IQR (rounds)"]
    for impl, (median, iqr, rounds) in rows.items():
        lines.append(f"{impl:11} {median:7.2f} ± {iqr:.2f} ({rounds})")
    patched = rows["patched"][0]
    lines.append(f"patched / cfg_triton {patched / rows['cfg_triton'][0]:.2f}x (target <= 1.1x), "
                 f"patched / unpatched {patched / rows['unpatched'][0]:.2f}x (target <= 0.6x)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return run.append_summary(argv, __doc__.splitlines()[0], "test_dropin_bench.py", summary, "dropin-{machine}.txt")


if __name__ == "__main__":
    sys.exit(main())
