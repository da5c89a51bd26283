"""Turns pytest-benchmark output into a results file, a plot and the tables of docs/benchmarks.md
(the README's headline table among them).

    python bench/report.py bench/results/<machine>.json     # redraw plot and tables from a results file
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

from cfg_triton.machine import describe as machine  # noqa: F401 - the benchmarks' machine record

ROOT = Path(__file__).resolve().parent.parent
PEERS = ["eager", "compiled", "transformers"]


def machine_tag(machine: dict) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", machine["name"].lower()).strip("-")
    return f"{machine['device']}-{slug}"


def _spread(stats, per=1.0):
    """(median, interquartile range, rounds) of a pytest-benchmark entry, each divided by `per`."""
    return stats["median"] / per, stats["iqr"] / per, stats["rounds"]


def summarize(raw: dict, copy_gbps: float | None) -> dict:
    """pytest-benchmark JSON -> {machine, copy_gbps, guidance, generation, host, load, scoring,
    memory, sampling_cpu}.

    Every time keeps its interquartile range and round count beside its median.
    """
    machine = raw["machine_info"]["cfg_triton"]
    cells = defaultdict(dict)
    generation, host, load, scoring, memory, sampling = [], [], [], [], [], []
    for bench in raw["benchmarks"]:
        info, stats = bench["extra_info"], bench["stats"]
        if "new_tokens" in info:
            median, iqr, rounds = _spread(stats, info["new_tokens"] / 1e3)
            generation.append({"batch": info["batch"], "impl": info["impl"], "ms_per_token": median,
                               "iqr_ms_per_token": iqr, "rounds": rounds})
        elif "host" in info:
            median, iqr, rounds = _spread(stats, info["calls_per_round"] / 1e6)
            host.append({k: info[k] for k in ("host", "semantics", "dtype", "batch", "vocab")}
                        | {"us_per_call": median, "iqr_us": iqr, "rounds": rounds})
        elif "filter" in info:
            median, iqr, rounds = _spread(stats, 1e-6)
            sampling.append({k: info[k] for k in ("filter", "batch", "vocab", "dtype", "floor_bytes")}
                            | {"impl": info["sampling"], "us": median, "iqr_us": iqr, "rounds": rounds})
        elif "scoring" in info:
            median, iqr, rounds = _spread(stats, info["examples"] / 1e3)
            scoring.append({"impl": info["scoring"], "examples": info["examples"],
                            "guidance_scale": info["guidance_scale"], "ms_per_example": median,
                            "iqr_ms": iqr, "rounds": rounds})
        elif "memory" in info:
            median, iqr, rounds = _spread(stats, 1e-3)
            memory.append({"impl": info["memory"], "shape": info["shape"], "device": info["device"],
                           "peak_extra_bytes": info["peak_extra_bytes"],
                           "logits_bytes": info["logits_bytes"], "ms": median, "iqr_ms": iqr,
                           "rounds": rounds})
        elif "load" in info:
            median, iqr, rounds = _spread(stats)
            load.append({"model": info["load"], "seconds": median, "iqr_s": iqr, "rounds": rounds})
        else:
            key = (info["semantics"], info["dtype"], info["batch"], info["vocab"])
            cells[key][info["impl"]] = _spread(stats, info.get("calls_per_round", 1))
            cells[key]["min_bytes"] = info["min_bytes"]
            if "compile_s" in info:
                cells[key]["compile_s"] = info["compile_s"]
    guidance = []
    for (semantics, dtype, batch, vocab), c in sorted(cells.items()):
        if "fused" not in c:
            continue
        fused, fused_iqr, fused_rounds = c["fused"]
        point = {"semantics": semantics, "dtype": dtype, "batch": batch, "vocab": vocab,
                 "fused_us": 1e6 * fused, "fused_iqr_us": 1e6 * fused_iqr,
                 "fused_rounds": fused_rounds, "gbps": c["min_bytes"] / fused / 1e9}
        if copy_gbps:
            point["bandwidth_fraction"] = point["gbps"] / copy_gbps
        for peer in PEERS:
            if peer in c:
                median, iqr, rounds = c[peer]
                point.update({f"{peer}_us": 1e6 * median, f"{peer}_iqr_us": 1e6 * iqr,
                              f"{peer}_rounds": rounds, f"speedup_vs_{peer}": median / fused})
        if "compile_s" in c:
            point["compile_s"] = c["compile_s"]
        guidance.append(point)
    return {"machine": machine, "copy_gbps": copy_gbps, "guidance": guidance,
            "generation": generation, "host": host, "load": load, "scoring": scoring,
            "memory": memory, "sampling_cpu": sampling}


def _pm(value, spread, fmt="{:,.0f}"):
    """`value ± spread` (the interquartile range), or the value alone where none was recorded."""
    text = fmt.format(value)
    return text if spread is None else f"{text} ± {fmt.format(spread)}"


def _label(results):
    m = results["machine"]
    where = f"{m['name']}, {m.get('cores', m.get('sms'))} {'cores' if m['device'] == 'cpu' else 'SMs'}"
    return f"{where}; torch {m['torch']}, triton {m['triton']}"


def guidance_table(results) -> str:
    rows = [f"Guidance op on **{_label(results)}** "
            f"(copy bandwidth {results['copy_gbps']:.0f} GB/s). Times are medians per call ± their "
            "interquartile range; speed-ups are peer median / fused median, measured side by side.", "",
            "| semantics | dtype | B | V | fused µs ± IQR | GB/s | vs eager | vs compiled | vs transformers |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in results["guidance"]:
        ratios = " | ".join(f"{p[f'speedup_vs_{peer}']:.2f}x" if f"speedup_vs_{peer}" in p else "–"
                            for peer in PEERS)
        rows.append(f"| {p['semantics']} | {p['dtype']} | {p['batch']} | {p['vocab']:,} | "
                    f"{_pm(p['fused_us'], p.get('fused_iqr_us'))} | {p['gbps']:.1f} | {ratios} |")
    compile_times = sorted({(p["semantics"], p["dtype"], round(p["compile_s"], 1))
                            for p in results["guidance"] if "compile_s" in p})
    if compile_times:
        rows += ["", "torch.compile(reference) first-call compile time: " + ", ".join(
            f"{s}/{d} {t} s" for s, d, t in compile_times) + "."]
    return "\n".join(rows)


def generation_table(results) -> str:
    """One table per model: ms per token of each loop, and the ratios the targets are stated in."""
    gen = results["generation"]
    models = sorted({g.get("model") for g in gen}, key=str)
    return "\n\n".join(_generation_rows(results, [g for g in gen if g.get("model") == m], m)
                       for m in models)


GEN_IMPLS = {"plain": "plain", "transformers_cfg": "transformers CFG",
             "transformers_cfg_patched": "transformers CFG, patched",
             "cfg_triton_unguided": "cfg_triton unguided", "cfg_triton_batched": "cfg_triton batched",
             "cfg_triton_sequential": "cfg_triton sequential", "cfg_triton_compiled": "cfg_triton compiled",
             "cfg_triton_sampled": "cfg_triton batched, sampled"}
# (numerator, denominator, heading): guidance's cost in our own loop first, then the comparisons.
GEN_RATIOS = [("cfg_triton_batched", "cfg_triton_unguided", "guided / unguided (ours)"),
              ("cfg_triton_batched", "transformers_cfg", "batched / transformers CFG"),
              ("cfg_triton_batched", "plain", "batched / transformers plain"),
              ("cfg_triton_sampled", "cfg_triton_batched", "sampled / greedy (ours)"),
              ("plain", "cfg_triton_compiled", "transformers plain / compiled"),
              ("transformers_cfg_patched", "transformers_cfg", "patched / unpatched transformers CFG"),
              ("transformers_cfg_patched", "cfg_triton_batched", "patched / cfg_triton batched")]


def _generation_rows(results, gen, model) -> str:
    by = {(g["batch"], g["impl"]): g for g in gen}
    impls = [i for i in GEN_IMPLS if any(g["impl"] == i for g in gen)]
    ratios = [r for r in GEN_RATIOS if r[0] in impls and r[1] in impls]
    greedy = "greedy (sampled: temperature 0.8, top-p 0.9)" if "cfg_triton_sampled" in impls else "greedy"
    if model is None:
        what = f"SmolLM2-135M, {greedy}, 48 new tokens"
    else:
        what = (f"{model} config with random weights, {greedy}, {gen[0].get('new_tokens', '?')} new "
                "tokens")
    head = "| batch | " + " | ".join(GEN_IMPLS[i] for i in impls) + " | " + \
        " | ".join(r[2] for r in ratios) + " |"
    rows = [f"Generation on **{_label(results)}**: {what}, guidance scale 1.5; ms per generated "
            "token (per step for the whole batch), median ± interquartile range.", "", head,
            "|" + "---:|" * (len(impls) + len(ratios) + 1)]
    nan = {"ms_per_token": float("nan")}
    for batch in sorted({g["batch"] for g in gen}):
        cells = [_pm(by.get((batch, i), nan)["ms_per_token"], by.get((batch, i), {}).get("iqr_ms_per_token"),
                     "{:.1f}") for i in impls]
        cells += [f"{by.get((batch, a), nan)['ms_per_token'] / by.get((batch, b), nan)['ms_per_token']:.2f}x"
                  for a, b, _ in ratios]
        rows.append(f"| {batch} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def host_table(results) -> str:
    host = results.get("host") or []
    if not host:
        return ""
    rows = [f"Host cost of one `guidance` call on **{_label(results)}** (bench/test_host_bench.py): "
            "`launch` is the Triton path up to the kernel launch (the launcher stubbed), `torch` the "
            "whole CPU path; µs per call, median ± interquartile range.", "",
            "| path | semantics | dtype | B | V | µs per call |", "|---|---|---|---:|---:|---:|"]
    for h in sorted(host, key=lambda h: (h["host"], h["semantics"])):
        rows.append(f"| {h['host']} | {h['semantics']} | {h['dtype']} | {h['batch']} | {h['vocab']:,} | "
                    f"{_pm(h['us_per_call'], h['iqr_us'], '{:.1f}')} |")
    for entry in results.get("load") or []:
        rows += ["", f"Loading the bundled {entry['model']} from its cached checkpoint: "
                     f"{entry['seconds']:.2f} ± {entry['iqr_s']:.2f} s ({entry['rounds']} rounds)."]
    return "\n".join(rows)


def sampling_table(results) -> str:
    """CPU rows (`sampling_cpu`, one entry per impl) or GPU rows (`sampling`, one per point)."""
    points = {}
    for e in results.get("sampling_cpu") or []:
        key = (e["filter"], e["batch"], e["vocab"], e["dtype"])
        points.setdefault(key, {"filter": e["filter"], "batch": e["batch"], "vocab": e["vocab"],
                                "dtype": e["dtype"]})[f"{e['impl']}_us"] = e["us"]
    rows = list(points.values()) + list(results.get("sampling") or [])
    if not rows:
        return ""
    floor = any("x_floor" in p for p in rows)  # GPU runs: time over the one-read floor 2·B·V·s
    out = [f"Guided sampling on **{_label(results)}**: `sample` against guidance + warpers + "
           "`torch.multinomial` (greedy: guidance + argmax) and against the `probs / Exponential(1)` "
           "argmax trick; temperature 0.8, µs per call (medians)"
           + ("; x floor: `sample`'s time over that of reading both branches once at the measured "
              "copy bandwidth." if floor else "."), "",
           "| filter | dtype | B | V | sample | multinomial | exponential | x multinomial |"
           + (" x floor |" if floor else ""),
           "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if floor else "")]
    for p in sorted(rows, key=lambda p: (p["filter"], p["dtype"], p["batch"], p["vocab"])):
        out.append(f"| {p['filter']} | {p['dtype']} | {p['batch']} | {p['vocab']:,} | {p['sample_us']:,.0f} | "
                   f"{p['multinomial_us']:,.0f} | "
                   f"{format(p['exponential_us'], ',.0f') if 'exponential_us' in p else '–'} | "
                   f"{p['multinomial_us'] / p['sample_us']:.2f}x |"
                   + (f" {format(p['x_floor'], '.2f') + 'x' if 'x_floor' in p else '–'} |" if floor else ""))
    return "\n".join(out)


def scoring_table(results) -> str:
    scoring, memory = results.get("scoring") or [], results.get("memory") or []
    rows = []
    if scoring:
        by = {s["impl"]: s for s in scoring}
        rows += [f"Scoring the first {scoring[0]['examples']} LAMBADA examples with `cfg_triton.score` "
                 f"on the bundled SmolLM2 on **{_label(results)}** (bench/test_scoring_bench.py); "
                 "ms per example, median ± interquartile range.", "",
                 "| scoring | γ | ms per example |", "|---|---:|---:|"]
        for s in sorted(scoring, key=lambda s: s["guidance_scale"]):
            rows.append(f"| {s['impl']} | {s['guidance_scale']:g} | "
                        f"{_pm(s['ms_per_example'], s['iqr_ms'], '{:.1f}')} |")
        if {"guided", "unguided"} <= by.keys():
            rows += ["", f"CFG costs **{by['guided']['ms_per_example'] / by['unguided']['ms_per_example']:.2f}x** "
                         "unguided scoring per example (same run)."]
    if memory:
        m0 = memory[0]
        shape = " × ".join(f"{n:,}" for n in m0["shape"])
        rows += ["" if rows else None, f"Peak memory added by reducing `[{shape}]` fp32 logits of both "
                 f"branches ({m0['logits_bytes'] / 2**20:,.0f} MiB each) to per-token guided "
                 f"log-probabilities, on {m0['device']}:", "",
                 "| op | peak added (MiB) | of one logits tensor | ms per call |", "|---|---:|---:|---:|"]
        for m in memory:
            rows.append(f"| {m['impl']} | {m['peak_extra_bytes'] / 2**20:,.1f} | "
                        f"{100 * m['peak_extra_bytes'] / m['logits_bytes']:.1f}% | "
                        f"{_pm(m['ms'], m['iqr_ms'], '{:,.1f}')} |")
    return "\n".join(r for r in rows if r is not None)


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu = results["machine"]["device"] == "cuda"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for semantics in ("raw", "normalized", "interpolated"):
        for dtype, style in (("float32", "-o"), ("bfloat16", "--s")):
            pts = sorted((p["batch"] * p["vocab"], p) for p in results["guidance"]
                         if p["semantics"] == semantics and p["dtype"] == dtype)
            if not pts:
                continue
            x = [n for n, _ in pts]
            axes[0].plot(x, [p["speedup_vs_eager"] for _, p in pts], style, ms=3,
                         label=f"{semantics} {dtype}")
            y = [p.get("bandwidth_fraction", p["gbps"]) for _, p in pts]
            axes[1].plot(x, y, style, ms=3, label=f"{semantics} {dtype}")
    axes[0].set(xscale="log", yscale="log", xlabel="B·V", ylabel="speed-up over eager reference")
    axes[1].set(xscale="log", xlabel="B·V",
                ylabel="effective bandwidth / measured copy bandwidth" if results["copy_gbps"]
                else "effective GB/s")
    if not gpu:
        axes[1].set_title("CPU: above 1 where the inputs stay in cache", fontsize=8)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"cfg_triton.guidance — {_label(results)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _replace_between(page: Path, start: str, end: str, block: str) -> None:
    text = page.read_text()
    if start not in text:
        raise SystemExit(f"{page.name} has no {start} marker")
    head, rest = text.split(start, 1)
    page.write_text(head + start + "\n" + block + "\n" + end + rest.split(end, 1)[1])


def update_tables(results, png: Path, readme: Path, tables: Path) -> None:
    """Replaces the text between the bench markers with tables generated from `results`: every
    table in `tables` (docs/benchmarks.md), the headline (generation) table in `readme`."""
    device = results["machine"]["device"]
    picture = f"![{machine_tag(results['machine'])}]({os.path.relpath(png, tables.parent)})"
    block = "\n\n".join(x for x in (guidance_table(results), picture, generation_table(results),
                                     host_table(results), scoring_table(results),
                                     sampling_table(results)) if x)
    _replace_between(tables, f"<!-- bench:{device}:start -->", f"<!-- bench:{device}:end -->", block)
    headline = generation_table(results)
    if headline:
        _replace_between(readme, f"<!-- bench:{device}:headline:start -->",
                         f"<!-- bench:{device}:headline:end -->", headline)


def publish(results, out_dir: Path, readme: Path = ROOT / "README.md",
            tables: Path = ROOT / "docs" / "benchmarks.md") -> Path:
    """Writes `<machine>.json` and `<machine>.png` under out_dir and refreshes the tables of
    docs/benchmarks.md and the README's headline."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = machine_tag(results["machine"])
    path = out_dir / f"{tag}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    png = out_dir / f"{tag}.png"
    if results["guidance"]:
        plot(results, png)
    update_tables(results, png, readme, tables)
    return path


if __name__ == "__main__":
    source = Path(sys.argv[1]).resolve()
    publish(json.loads(source.read_text()), source.parent)
