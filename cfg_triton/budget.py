"""The streaming loops' issue budget, counted in the compiled SASS (no GPU needed).

    python -m cfg_triton.budget [--arch 80 90] [--dtype bf16 fp16 fp32] [--json]

For every kernel specialization with a streaming loop (a loop over vocabulary tiles, which loads
from global memory), the loop body of its `cuobjdump -sass` listing gives: warp-instructions per
vocabulary entry (body instructions × warps / entries per iteration), barriers and shuffles per
iteration, the widths of its global loads, MUFU operations per entry, and the ceiling they imply.

The model, a prediction and not a measurement: an SM issues at most 4 warp-instructions per clock,
of which a streaming loop sustains about 75% (3 per clock), and its MUFU units (exp2, log2) retire
16 lanes, half a warp-instruction, per clock. At the memory roofline each of the 132 SMs of an H100
SXM (3.35 TB/s) or an H200 (4.8 TB/s), at 1.98 GHz, receives 12.8 or 18.4 bytes per clock. An entry
of both branches is 2·s bytes (s = 2 for bf16), so the roofline needs 3.2 (H100) or 4.6 (H200) bf16
entries per clock per SM, and a loop issuing `n` warp-instructions per entry, `m` of them MUFU,
reaches at most min(1, 3 / (n × entries per clock), 0.5 / (m × entries per clock)) of it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ISSUE_PER_CLOCK = 4 * 0.75  # warp-instructions per clock per SM a streaming loop sustains
MUFU_PER_CLOCK = 0.5  # MUFU warp-instructions per clock per SM (16 lanes)
SMS, CLOCK_HZ = 132, 1.98e9
BANDWIDTH = {"H100 SXM": 3.35e12, "H200": 4.8e12}  # bytes per second

# Warp-instructions per entry each pass may issue with bf16 or fp16 inputs; fp32 inputs move twice
# the bytes, and get twice the budget.
_BUDGETS = {
    "_guidance_stats_kernel": 1.2,
    "_guidance_write_kernel": 0.6,
    "_token_stats_kernel": 1.5,
    "_sample_draw_kernel": 1.2,
    "_sample_search_kernel": 4.0,
}


# Constexprs that fix sizes or layouts, not what a loop computes.
_HIDDEN = ("BLOCK", "MAX_SPLITS", "STRIDE", "GROUP")

_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}


def entry_bytes(dtype: str, out: str | None) -> int:
    """Bytes a pass moves per vocabulary entry: both branches read, and the output if it writes one."""
    return 2 * _BYTES[dtype] + (_BYTES[out] if out else 0)


def budget(kernel: str, constexprs: dict, dtype: str, out: str | None = None) -> float | None:
    """The budget of a specialization (warp-instructions per entry), None for a kernel without one.

    The budgets are stated for bf16 inputs (and an fp32 output, for the write pass); a
    specialization that moves more bytes per entry gets a budget larger in proportion, since the
    memory takes that much longer over each entry (one that moves fewer keeps the stated one)."""
    if kernel in ("_sample_stats_kernel", "_sample_masked_kernel"):
        value = 1.5 if constexprs.get("PARTITION") else 1.2 if constexprs.get("NOISE") else 1.0
    else:
        value = _BUDGETS.get(kernel)
    if value is None:
        return None
    stated = entry_bytes("bf16", "fp32" if out else None)
    return value * max(1.0, entry_bytes(dtype, out) / stated)


def ceiling(per_entry: float, dtype: str, bandwidth: float, out: str | None = None,
            mufu_per_entry: float = 0.0, sms: int = SMS, clock_hz: float = CLOCK_HZ) -> float:
    """The fraction of the memory roofline (`bandwidth` bytes per second over `sms` SMs at
    `clock_hz`) a loop issuing `per_entry` warp-instructions, `mufu_per_entry` of them MUFU, can
    reach."""
    entries_per_clock = bandwidth / (sms * clock_hz) / entry_bytes(dtype, out)
    issue = ISSUE_PER_CLOCK / (per_entry * entries_per_clock)
    mufu = MUFU_PER_CLOCK / (mufu_per_entry * entries_per_clock) if mufu_per_entry else issue
    return min(1.0, issue, mufu)


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA(?:\.\w+)*\s+(?:\w+\s+)?0x([0-9a-f]+)")


def _instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, text) of each instruction, predicates dropped from the opcode."""
    out = []
    for address, text in _LINE.findall(sass):
        words = [w for w in text.split() if not w.startswith("@")]
        if words:
            out.append((int(address, 16), words[0], text))
    return out


def streaming_loop(sass: str) -> list[tuple[int, str, str]] | None:
    """The instructions of the costliest innermost loop that loads from global memory, or None (a
    kernel may hold a second loop for a rare case: it is held to the same budget)."""
    code = _instructions(sass)
    loops = []
    for address, opcode, text in code:
        found = _BRANCH.search(text) if opcode.startswith("BRA") else None
        if found and int(found.group(1), 16) <= address:
            body = [i for i in code if int(found.group(1), 16) <= i[0] <= address]
            if any(op.startswith("LDG") for _, op, _ in body):
                loops.append(body)
    innermost = [body for body in loops
                 if not any(other is not body and body[0][0] <= other[0][0] and other[-1][0] <= body[-1][0]
                            for other in loops)]
    return max(innermost, key=len) if innermost else None


def analyse(sass: str, num_warps: int, entries_per_iteration: int) -> dict | None:
    body = streaming_loop(sass)
    if body is None:
        return None
    ops = [op for _, op, _ in body]
    widths = sorted({int(m.group(1)) if m else 32 for op in ops if op.startswith("LDG")
                     for m in [re.search(r"\.(64|128)\b", op)]})
    per_entry = len(body) * num_warps / entries_per_iteration
    return {
        "per_entry": round(per_entry, 3),
        "body": len(body),
        "barriers": sum(op.startswith("BAR") for op in ops),
        "shuffles": sum(op.startswith("SHFL") for op in ops),
        "mufu_per_entry": round(sum(op.startswith("MUFU") for op in ops) * num_warps
                                / entries_per_iteration, 3),
        "load_bits": widths,
    }


def _triton_version() -> str:
    import triton

    return triton.__version__


def _sass(cubin: bytes) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


def report(archs=(90,), dtypes=("bf16",), select=None) -> list[dict]:
    """One row per streaming specialization (aligned pointers), arch and input dtype; `select`
    (kernel name, constexprs, output dtype or None) -> bool keeps some only."""
    from .aot import compile_kernel, specializations

    rows = []
    for kernel, signature, constexprs, num_warps in specializations():
        dtype = signature.get("c_ptr", "").lstrip("*")
        out = signature.get("out_ptr", "").lstrip("*") or None
        if dtype not in dtypes or "BLOCK" not in constexprs:
            continue
        if select is not None and not select(kernel.__name__, constexprs, out):
            continue
        for arch in archs:
            compiled = compile_kernel(kernel, signature, constexprs, num_warps, arch, aligned=True)
            found = analyse(_sass(compiled.asm["cubin"]), num_warps, constexprs["BLOCK"])
            if found is None:
                continue
            limit = budget(kernel.__name__, constexprs, dtype, out)
            rows.append({"kernel": kernel.__name__, "arch": f"sm_{arch}", "dtype": dtype, "out": out,
                         "constexprs": {k: v for k, v in constexprs.items()
                                        if v is not None and k not in _HIDDEN
                                        and not (k == "WHEN_FINITE" and v < 0)},
                         **found, "budget": limit,
                         **{f"ceiling_{name}": round(ceiling(found["per_entry"], dtype, bw, out,
                                                             found["mufu_per_entry"]), 3)
                            for name, bw in BANDWIDTH.items()}})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| kernel | arch | dtype | specialization | warp-instr / entry | budget | barriers + "
             "shuffles / iteration | MUFU / entry | loads (bits) | H100 ceiling | H200 ceiling |",
             "|---|---|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        spec = " ".join([f"{k}={v}" for k, v in r["constexprs"].items()]
                        + ([f"out={r['out']}"] if r["out"] else []))
        lines.append(f"| `{r['kernel']}` | {r['arch']} | {r['dtype']} | {spec} | {r['per_entry']:.2f} | "
                     f"{r['budget']:.1f} | {r['barriers'] + r['shuffles']} | {r['mufu_per_entry']:.2f} | "
                     f"{'/'.join(map(str, r['load_bits']))} | {r['ceiling_H100 SXM']:.0%} | "
                     f"{r['ceiling_H200']:.0%} |")
    return "\n".join(lines) + "\n"


def _family(row) -> str:
    """The pass a row belongs to, as budgets are stated."""
    name, flags = row["kernel"], row["constexprs"]
    if row["out"]:
        return f"{name} ({row['out']} out)"
    if name in ("_sample_stats_kernel", "_sample_masked_kernel"):
        return f"{name} ({'noise' if flags.get('NOISE') else 'greedy'}" \
               f"{', log-probabilities' if flags.get('PARTITION') else ''})"
    return name


def _worst(rows: list[dict], name) -> dict:
    """The costliest row per (name(row), arch, dtype)."""
    worst = {}
    for r in rows:
        key = (name(r), r["arch"], r["dtype"])
        if key not in worst or r["per_entry"] > worst[key]["per_entry"]:
            worst[key] = r
    return worst


def summary(rows: list[dict]) -> str:
    """The worst specialization of each pass: the table of docs/kernels.md."""
    worst = _worst(rows, _family)
    lines = ["| pass (worst specialization) | arch | dtype | warp-instr / entry | budget | barriers + "
             "shuffles / iteration | loads (bits) | predicted H100 ceiling | predicted H200 ceiling |",
             "|---|---|---|---:|---:|---:|---|---:|---:|"]
    for (family, arch, dtype), r in worst.items():
        lines.append(f"| `{family}` | {arch} | {dtype} | {r['per_entry']:.2f} | {r['budget']:.1f} | "
                     f"{r['barriers'] + r['shuffles']} | {'/'.join(map(str, r['load_bits']))} | "
                     f"{r['ceiling_H100 SXM']:.0%} | {r['ceiling_H200']:.0%} |")
    return "\n".join(lines) + "\n"


def brief(rows: list[dict]) -> str:
    """The README's table: the costliest specialization of each kernel."""
    lines = ["| kernel | warp-instr / entry (budget) | predicted H100 SXM ceiling | predicted H200 ceiling |",
             "|---|---:|---:|---:|"]
    for (kernel, _, _), r in _worst(rows, lambda r: r["kernel"]).items():
        lines.append(f"| `{kernel}` | {r['per_entry']:.2f} ({r['budget']:.1f}) | "
                     f"{r['ceiling_H100 SXM']:.0%} | {r['ceiling_H200']:.0%} |")
    return "\n".join(lines) + "\n"


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(_ROOT, "docs", "kernels.md")
README = os.path.join(_ROOT, "README.md")
MARKERS = ("<!-- budget:start -->", "<!-- budget:end -->")
README_MARKERS = ("<!-- budget:readme:start -->", "<!-- budget:readme:end -->")


def _replace_between(path: str, markers: tuple[str, str], text: str) -> None:
    with open(path, encoding="utf-8") as f:
        head, rest = f.read().split(markers[0], 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + markers[0] + "\n" + text + markers[1] + rest.split(markers[1], 1)[1])


def main(argv=None) -> int:
    from .aot import parse_for_compiling

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90])
    parser.add_argument("--dtype", nargs="+", default=["bf16"], choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write", action="store_true",
                        help="also write the full table to bench/results/, the summary to "
                             "docs/kernels.md and the brief to README.md")
    args = parse_for_compiling(parser, argv)
    rows = report(args.arch, args.dtype)
    print(json.dumps(rows) if args.json else table(rows), end="" if args.json else "")
    if args.write:
        tag = "-".join([*(f"sm{a}" for a in args.arch), *args.dtype])
        results = os.path.join(os.path.dirname(DOC), "..", "bench", "results", f"budget-{tag}.md")
        with open(results, "w", encoding="utf-8") as f:
            f.write(f"Streaming-loop issue budget (`python -m cfg_triton.budget --write`), "
                    f"Triton {_triton_version()}; a static prediction, not a measurement.\n\n"
                    + table(rows))
        # The pages state the bf16 budgets; the other dtypes are in the full table.
        stated = [r for r in rows if r["dtype"] == "bf16" and r["arch"] == "sm_90"] or rows
        _replace_between(DOC, MARKERS, summary(stated))
        _replace_between(README, README_MARKERS, brief(stated))
    return 1 if any(r["budget"] is not None and r["per_entry"] > r["budget"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
