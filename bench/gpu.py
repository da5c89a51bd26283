"""The GPU measurements of bench/gpu.sh: host cost, the op grid, guided sampling and scoring,
end-to-end generation, greedy parity.

    python bench/gpu.py --out OUT [--quick | --smoke] [--budget SECONDS] [--tests OUT/tests.xml]

Needs nothing but torch, triton and transformers: every model is built from a config with random
weights (speed does not depend on the values), nothing is downloaded. Writes the results file
(`OUT/<machine>.json`, the schema `report.py` reads), its plot and `OUT/summary.txt`, and prints
that summary as the last lines of output. Each section is timed against `--budget`; a section that
would start past it is recorded as skipped, and a section that fails is recorded with its error, so
one problem never costs the rest of a run.

`--smoke` runs the same code on the CPU at tiny sizes (the kernels in Triton's interpreter), so
that CI proves the command offline; its timings mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import cfg_triton  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
import run as bench_run  # noqa: E402

SEMANTICS = {"raw": dict(normalize=False), "normalized": {}, "interpolated": dict(mix=0.7)}

# SmolLM2-135M and a Llama-3.2-1B-like model, as configs (no weights are fetched).
MODELS = {
    "smollm2-135m": dict(vocab_size=49_152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True),
    "llama-1b": dict(vocab_size=128_256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     tie_word_embeddings=True),
    # SmolLM2-135M's shapes at 4 layers: the greedy-parity model, which also compiles in seconds.
    "smollm2-4-layers": dict(vocab_size=49_152, hidden_size=576, intermediate_size=1536,
                             num_hidden_layers=4, num_attention_heads=9, num_key_value_heads=3,
                             tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}

PLANS = {
    "full": dict(batches=[1, 8, 64, 256], vocabs=[32_000, 128_256, 262_144],
                 dtypes=[torch.bfloat16, torch.float32], calls=30, replays=10, per_graph=10,
                 models=["smollm2-135m", "llama-1b"], gen_batches=[1, 8, 32], new_tokens=32,
                 compiled_batches=[1], parity_model="smollm2-4-layers", parity_tokens=16,
                 budget=300),
    "quick": dict(batches=[1, 64], vocabs=[32_000, 262_144], dtypes=[torch.bfloat16, torch.float32],
                  calls=20, replays=5, per_graph=10, models=["smollm2-135m"], gen_batches=[1, 8],
                  new_tokens=24, compiled_batches=[1], parity_model="smollm2-4-layers",
                  parity_tokens=16, budget=120),
    "smoke": dict(batches=[1, 2], vocabs=[1_000], dtypes=[torch.float32], calls=2, replays=1,
                  per_graph=1, models=["tiny"], gen_batches=[1, 2], new_tokens=3,
                  compiled_batches=[1], parity_model="tiny", parity_tokens=4, budget=600),
}


class Clock:
    """Wall time of a callable: CUDA events around it on a GPU (the device idle before it starts, so
    the host's launch cost counts), `perf_counter` on a CPU."""

    def __init__(self, device):
        self.cuda = device == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn) -> float:
        """Seconds for one call of `fn`."""
        self.sync()
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def median(self, fn, calls: int) -> float:
        fn()  # warm up: compile, allocate
        return statistics.median(self.time(fn) for _ in range(calls))

    def graph(self, fn, per_graph: int, replays: int) -> float | None:
        """Seconds per call of `fn` replayed from a captured CUDA graph: the kernels alone."""
        if not self.cuda:
            return None
        fn()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(per_graph):
                fn()
        graph.replay()
        seconds = statistics.median(self.time(graph.replay) for _ in range(replays)) / per_graph
        del graph
        return seconds


class Run:
    """The results being gathered, with the time budget and per-section error capture."""

    def __init__(self, plan, device, budget):
        self.plan, self.device, self.clock = plan, device, Clock(device)
        self.deadline = time.perf_counter() + budget
        self.started = time.perf_counter()
        self.results = {"machine": report.machine(), "plan": plan_name(plan), "copy_gbps": None,
                        "guidance": [], "generation": [], "host": [], "parity": None,
                        "sampling": [], "scoring": [], "sections": {}}

    def section(self, name, fn):
        if time.perf_counter() > self.deadline:
            self.results["sections"][name] = "skipped: time budget spent"
            print(f"[{name}] skipped: time budget spent", flush=True)
            return
        start = time.perf_counter()
        try:
            fn()
            status = "ok"
        except Exception as e:  # noqa: BLE001 - a GPU run must report what it could
            traceback.print_exc()
            status = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        seconds = time.perf_counter() - start
        self.results["sections"][name] = f"{status} ({seconds:.0f} s)"
        print(f"[{name}] {status} in {seconds:.1f} s", flush=True)

    def over_budget(self) -> bool:
        return time.perf_counter() > self.deadline


def plan_name(plan):
    return next(name for name, p in PLANS.items() if p is plan)


def _logits(batch, vocab, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(batch, vocab, device=device, generator=gen) * 4).to(dtype)


def measure_host(r: Run):
    """Host µs per `guidance` call at B = 1: queued without syncing (the host's own cost, as long as
    the device keeps up) and as single calls end to end."""
    vocab = 262_144 if r.device == "cuda" else r.plan["vocabs"][0]
    for dtype in r.plan["dtypes"]:
        cond, uncond = _logits(1, vocab, dtype, r.device), _logits(1, vocab, dtype, r.device, 1)
        for semantics, kw in SEMANTICS.items():
            call = lambda: cfg_triton.guidance(cond, uncond, 1.5, **kw)  # noqa: E731
            call()
            r.clock.sync()
            n = 200 if r.device == "cuda" else 5
            start = time.perf_counter()
            for _ in range(n):
                call()
            host = (time.perf_counter() - start) / n
            r.clock.sync()
            single = r.clock.median(call, r.plan["calls"])
            graph = r.clock.graph(call, r.plan["per_graph"], r.plan["replays"])
            r.results["host"].append({"semantics": semantics, "dtype": str(dtype)[6:], "batch": 1,
                                      "vocab": vocab, "host_us": 1e6 * host,
                                      "single_call_us": 1e6 * single,
                                      "graph_us": None if graph is None else 1e6 * graph})


def measure_op(r: Run):
    """The op grid against its peers; each point timed as single calls and as graph replays."""
    compiled = {}
    for semantics in SEMANTICS:
        for dtype in r.plan["dtypes"]:
            for batch in r.plan["batches"]:
                for vocab in r.plan["vocabs"]:
                    if r.over_budget():
                        r.results["sections"]["op grid truncated"] = f"at {semantics}/{dtype}/{batch}/{vocab}"
                        return
                    r.results["guidance"].append(_op_point(r, semantics, dtype, batch, vocab, compiled))


def _op_point(r, semantics, dtype, batch, vocab, compiled):
    cond, uncond = _logits(batch, vocab, dtype, r.device), _logits(batch, vocab, dtype, r.device, 1)
    kw = SEMANTICS[semantics]
    impls = {"fused": lambda c, u, g: cfg_triton.guidance(c, u, g, **kw),
             "eager": peers.eager_reference(semantics, fp32=True),
             "transformers": peers.transformers_math(semantics)}
    key = (semantics, dtype)
    if key not in compiled:  # compiled once per semantics and dtype; its first call is the compile
        fn = torch.compile(peers.eager_reference(semantics, fp32=True), dynamic=True)
        compile_s = r.clock.time(lambda: fn(cond, uncond, 1.5))
        compiled[key] = (fn, compile_s)
    impls["compiled"], compile_s = compiled[key]
    point = {"semantics": semantics, "dtype": str(dtype)[6:], "batch": batch, "vocab": vocab,
             "compile_s": compile_s}
    for name, fn in impls.items():
        if fn is None:
            continue
        call = lambda: fn(cond, uncond, 1.5)  # noqa: E731,B023
        point[f"{name}_us"] = 1e6 * r.clock.median(call, r.plan["calls"])
        try:
            graph = r.clock.graph(call, r.plan["per_graph"], r.plan["replays"])
        except Exception as e:  # noqa: BLE001 - a peer that cannot be captured keeps its eager time
            graph = None
            point[f"{name}_graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if graph is not None:
            point[f"{name}_graph_us"] = 1e6 * graph
    min_bytes = peers.min_bytes(batch, vocab, dtype)
    for suffix in ("", "_graph"):
        fused = point.get(f"fused{suffix}_us")
        if not fused:
            continue
        point[f"gbps{suffix}"] = min_bytes / fused / 1e3
        if r.results["copy_gbps"]:
            point[f"bandwidth_fraction{suffix}"] = point[f"gbps{suffix}"] / r.results["copy_gbps"]
        for peer in report.PEERS:
            if point.get(f"{peer}{suffix}_us"):
                point[f"speedup_vs_{peer}{suffix}"] = point[f"{peer}{suffix}_us"] / fused
    point["gbps"] = point.get("gbps", 0.0)
    print(f"  op {semantics:12} {point['dtype']:8} B={batch:<4} V={vocab:<7} fused "
          f"{point['fused_us']:9.1f} µs (graph {point.get('fused_graph_us', float('nan')):8.1f})",
          flush=True)
    return point


SAMPLING_FILTERS = {"greedy": dict(temperature=0.0), "none": {}, "top_k": dict(top_k=50),
                    "top_p": dict(top_p=0.9), "min_p": dict(min_p=0.05)}


def _warped_probs(cond, uncond, filters):
    from cfg_triton.processors import warp_scores

    scores = cfg_triton.guidance(cond, uncond, 1.5)
    if "min_p" in filters:  # transformers' MinPLogitsWarper, written out
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < filters["min_p"] * probs.amax(-1, keepdim=True), float("-inf"))
    return warp_scores(scores, 0.8, filters.get("top_k"), filters.get("top_p")).softmax(-1)


# The passes a measured point runs, for the static prediction: the op's statistics (not in raw mode)
# and write into fp32 at scalar γ; `sample`'s one read, greedy or with noise, normalized.
_MODES = {"raw": 0, "normalized": 1, "interpolated": 2}


def _predicted_pass(name, flags, out):
    if name == "_guidance_stats_kernel":
        return not flags["GAMMA_PER_ROW"] and flags["WHEN_FINITE"] < 0
    if name == "_guidance_write_kernel":
        return out == "fp32" and not flags["GAMMA_PER_ROW"] and not flags["MIX_PER_ROW"]
    return name == "_sample_stats_kernel" and flags["MODE"] == 1 and not flags["PARTITION"]


def predict(r: Run):
    """The issue budget (`cfg_triton.budget`) for this machine: the ceiling each measured pass's
    compiled loop allows at the measured copy bandwidth, so that the summary can set the static
    prediction beside each measurement."""
    from cfg_triton import budget

    if os.environ.get("TRITON_INTERPRET") == "1":  # a CPU smoke run: no compiled code to count
        print("  static prediction: none, the kernels run in Triton's interpreter", flush=True)
        return
    cuda = r.device == "cuda"
    # Compiled without a GPU (a CPU run that compiles): sm_90 code and an H100's constants.
    props = torch.cuda.get_device_properties(0) if cuda else None
    arch = props.major * 10 + props.minor if cuda else 90
    sms = props.multi_processor_count if cuda else budget.SMS
    bandwidth = (r.results["copy_gbps"] or 0) * 1e9 if cuda else budget.BANDWIDTH["H100 SXM"]
    dtypes = [str(d)[6:].replace("bfloat", "bf").replace("float", "fp") for d in r.plan["dtypes"]]
    rows = budget.report((arch,), dtypes, select=_predicted_pass)
    for row in rows:
        row["ceiling"] = budget.ceiling(row["per_entry"], row["dtype"], bandwidth, row["out"],
                                        row["mufu_per_entry"], sms=sms) if bandwidth else None
    r.results["prediction"] = {"arch": f"sm_{arch}", "sms": sms, "clock_hz": budget.CLOCK_HZ,
                               "bandwidth": bandwidth, "passes": rows}


def _ceiling(results, kernel, dtype, **flags):
    """The worst predicted ceiling among the passes that match, or None."""
    rows = (results.get("prediction") or {}).get("passes", [])
    found = [row["ceiling"] for row in rows if row["kernel"] == kernel and row["dtype"] == dtype
             and row["ceiling"] and all(row["constexprs"].get(k) == v for k, v in flags.items())]
    return min(found) if found else None


def predicted_op_fraction(results, semantics, dtype) -> float | None:
    """The fraction of copy bandwidth the op's passes allow: its minimum bytes (one read of both
    branches, one fp32 write) over the time each pass needs at its ceiling."""
    dtype = dtype.replace("bfloat", "bf").replace("float", "fp")
    size = 2 if dtype in ("bf16", "fp16") else 4
    mode = _MODES[semantics]
    write = _ceiling(results, "_guidance_write_kernel", dtype, MODE=mode)
    stats = _ceiling(results, "_guidance_stats_kernel", dtype, MODE=mode) if mode else None
    if write is None or (mode and stats is None):
        return None
    time = (2 * size + 4) / write + (2 * size / stats if mode else 0.0)
    return (2 * size + 4) / time


def predicted_x_floor(results, name, dtype) -> float | None:
    """The least multiple of the one-read floor `sample` can take, greedy or unfiltered."""
    if name not in ("greedy", "none"):
        return None  # filters add passes whose count depends on the data
    dtype = dtype.replace("bfloat", "bf").replace("float", "fp")
    found = _ceiling(results, "_sample_stats_kernel", dtype, NOISE=name == "none")
    return 1 / found if found else None


def measure_sampling(r: Run):
    """`sample` against guidance + warpers + multinomial (greedy: guidance + argmax), and against
    the `probs / Exponential(1)` argmax trick, with the one-read floor 2·B·V·s of both branches."""
    impls = {
        "sample": lambda c, u, f: cfg_triton.sample(c, u, 1.5, seed=0, step=0, **{"temperature": 0.8, **f}),
        "multinomial": lambda c, u, f: (cfg_triton.guidance(c, u, 1.5).argmax(-1) if "temperature" in f
                                        else torch.multinomial(_warped_probs(c, u, f), 1)),
        "exponential": lambda c, u, f: (_warped_probs(c, u, f) / torch.empty_like(
            c, dtype=torch.float32).exponential_()).argmax(-1),
    }
    for dtype in r.plan["dtypes"]:
        for batch in r.plan["batches"]:
            for vocab in r.plan["vocabs"]:
                cond, uncond = _logits(batch, vocab, dtype, r.device), _logits(batch, vocab, dtype, r.device, 1)
                for name, filters in SAMPLING_FILTERS.items():
                    if r.over_budget():
                        r.results["sections"]["sampling truncated"] = f"at {dtype} B={batch} V={vocab}"
                        return
                    point = {"dtype": str(dtype)[6:], "batch": batch, "vocab": vocab, "filter": name,
                             "floor_bytes": 2 * batch * vocab * cond.element_size()}
                    with torch.inference_mode():
                        for impl, fn in impls.items():
                            if impl == "exponential" and name == "greedy":
                                continue  # no draw to race
                            point[f"{impl}_us"] = 1e6 * r.clock.median(
                                lambda: fn(cond, uncond, filters), r.plan["calls"])  # noqa: B023
                    if r.results["copy_gbps"]:
                        floor_us = 1e6 * point["floor_bytes"] / (r.results["copy_gbps"] * 1e9 / 2)
                        point["x_floor"] = point["sample_us"] / floor_us
                    point["speedup_vs_multinomial"] = point["multinomial_us"] / point["sample_us"]
                    r.results["sampling"].append(point)
                    print(f"  sample {name:6} {point['dtype']:8} B={batch:<4} V={vocab:<7} "
                          f"{point['sample_us']:9.1f} µs, {point['speedup_vs_multinomial']:.1f}x "
                          f"multinomial", flush=True)
                del cond, uncond


def measure_scoring(r: Run):
    """`token_logprobs` on `[8, 512, V]` logits against guidance + gather: time and peak memory."""
    for dtype in r.plan["dtypes"]:
        for vocab in r.plan["vocabs"]:
            shape = (8, 512, vocab) if r.device == "cuda" else (2, 16, vocab)
            cond = _logits(shape[0] * shape[1], vocab, dtype, r.device).reshape(shape)
            uncond = _logits(shape[0] * shape[1], vocab, dtype, r.device, 1).reshape(shape)
            targets = torch.randint(0, vocab, shape[:2], device=r.device)
            point = {"dtype": str(dtype)[6:], "shape": list(shape),
                     "logits_bytes": cond.numel() * cond.element_size()}
            impls = {"token_logprobs": lambda: cfg_triton.token_logprobs(cond, uncond, targets, 1.5),
                     "guidance_gather": lambda: cfg_triton.guidance(
                         cond.flatten(0, 1), uncond.flatten(0, 1), 1.5).gather(1, targets.reshape(-1, 1))}
            with torch.inference_mode():
                for impl, fn in impls.items():
                    point[f"{impl}_us"] = 1e6 * r.clock.median(fn, r.plan["calls"])
                    if r.device == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        before = torch.cuda.memory_allocated()
                        fn()
                        torch.cuda.synchronize()
                        point[f"{impl}_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - before
            r.results["scoring"].append(point)
            print(f"  scoring {point['dtype']:8} V={vocab:<7} token_logprobs "
                  f"{point['token_logprobs_us']:9.1f} µs, guidance+gather {point['guidance_gather_us']:9.1f} µs",
                  flush=True)
            del cond, uncond


def build_model(name, dtype, device, peaked=False):
    """A causal LM from one of MODELS' configs with random weights, in eval mode on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODELS[name], max_position_embeddings=2048, eos_token_id=None,
                         pad_token_id=0, bos_token_id=1)
    if peaked:  # an untied head that can be scaled without touching the embeddings
        config.tie_word_embeddings = False
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    if peaked:
        with torch.no_grad():  # peaked distributions: random weights otherwise give near-ties
            model.lm_head.weight.mul_(20 if name == "tiny" else 8)
    model.generation_config.pad_token_id = 0
    return model


def _prompts(batch, vocab, device, length=32):
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(2, vocab, (batch, length), generator=gen).to(device)
    return ids, torch.ones_like(ids)


def _generate(impl, model, ids, mask, new_tokens):
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    if impl == "plain":
        return model.generate(ids, attention_mask=mask, do_sample=False, **kw)
    if impl == "transformers_cfg":
        return model.generate(ids, attention_mask=mask, do_sample=False, guidance_scale=1.5, **kw)
    compile_ = impl == "cfg_triton_compiled"
    mode = "sequential" if impl == "cfg_triton_sequential" else "batched"
    return cfg_triton.generate(model, ids, mask, guidance_scale=1.5, mode=mode, compile=compile_,
                               eos_token_id=[], **kw)


def measure_generation(r: Run):
    """ms per generated token, bf16 on a GPU (fp32 on a CPU), random weights."""
    dtype = torch.bfloat16 if r.device == "cuda" else torch.float32
    new_tokens = r.plan["new_tokens"]
    for name in r.plan["models"]:
        model = build_model(name, dtype, r.device)
        vocab = MODELS[name]["vocab_size"]
        for batch in r.plan["gen_batches"]:
            impls = ["plain", "transformers_cfg", "cfg_triton_batched", "cfg_triton_sequential"]
            if batch in r.plan["compiled_batches"]:
                impls.append("cfg_triton_compiled")
            ids, mask = _prompts(batch, vocab, r.device)
            for impl in impls:
                if r.over_budget():
                    r.results["sections"]["generation truncated"] = f"at {name}/B={batch}/{impl}"
                    return
                run = lambda: _generate(impl, model, ids, mask, new_tokens)  # noqa: E731,B023
                with torch.inference_mode():
                    first = r.clock.time(run)  # warm-up; for the compiled step, the compile
                    times = [r.clock.time(run) for _ in range(2)]
                entry = {"model": name, "batch": batch, "impl": impl, "new_tokens": new_tokens,
                         "ms_per_token": 1e3 * statistics.median(times) / new_tokens,
                         "rounds": len(times), "first_call_s": first}
                r.results["generation"].append(entry)
                print(f"  gen {name} B={batch:<3} {impl:22} {entry['ms_per_token']:8.2f} ms/token "
                      f"(first call {first:.1f} s)", flush=True)
        del model
        if r.device == "cuda":
            torch.cuda.empty_cache()


def check_parity(r: Run):
    """Greedy tokens of transformers' CFG and ours (both modes, and compiled), fp32 without TF32."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    name, new = r.plan["parity_model"], r.plan["parity_tokens"]
    model = build_model(name, torch.float32, r.device, peaked=True)
    ids, mask = _prompts(2, MODELS[name]["vocab_size"], r.device, length=12)
    neg, neg_mask = _prompts(2, MODELS[name]["vocab_size"], r.device, length=5)
    kw = dict(max_new_tokens=new, min_new_tokens=new)
    with torch.inference_mode():
        theirs = [model.generate(ids[i:i + 1], do_sample=False, guidance_scale=1.5,
                                 negative_prompt_ids=neg[i:i + 1], **kw) for i in range(2)]
        ours = {m: cfg_triton.generate(model, ids, mask, negative_input_ids=neg,
                                       negative_attention_mask=neg_mask, guidance_scale=1.5, mode=m,
                                       eos_token_id=[], **kw)
                for m in ("batched", "sequential")}
        ours["compiled"] = cfg_triton.generate(model, ids, mask, negative_input_ids=neg,
                                               negative_attention_mask=neg_mask, guidance_scale=1.5,
                                               compile=True, eos_token_id=[], **kw)
    expected = torch.cat(theirs).tolist()
    r.results["parity"] = {"model": name, "tokens": new,
                           **{m: out.tolist() == expected for m, out in ours.items()}}
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    del model


def read_tests(path: Path) -> dict | None:
    """Counts from pytest's JUnit XML: tests, failures, errors, skipped."""
    if not path or not path.exists():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def _percent(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def summary(results) -> str:
    """The short table printed last and saved as summary.txt."""
    m = results["machine"]
    lines = [f"cfg_triton GPU run ({results['plan']}) on {m['name']} | torch {m['torch']} | "
             f"triton {m['triton']} | copy {results['copy_gbps'] or 0:.0f} GB/s"]
    tests = results.get("tests")
    lines.append("tests: " + (f"{tests['tests']} run, {tests['failures']} failed, {tests['errors']} "
                              f"errors, {tests['skipped']} skipped" if tests else "not run"))
    parity = results.get("parity")
    lines.append("greedy parity with transformers CFG: " + (
        ", ".join(f"{k} {'OK' if v else 'DIFFERS'}" for k, v in parity.items()
                  if isinstance(v, bool)) if parity else "not run"))
    for h in results["host"]:
        if h["semantics"] == "normalized":
            lines.append(f"host B=1 V={h['vocab']:,} {h['dtype']}: {h['host_us']:.1f} µs/call queued, "
                         f"{h['single_call_us']:.1f} µs single call"
                         + (f", {h['graph_us']:.1f} µs in a graph" if h["graph_us"] else ""))
    grid = results["guidance"]
    if grid:
        lines.append("op (semantics dtype B V): fused µs | GB/s | % of copy (predicted at most) | x eager "
                     "| x compiled | x transformers")
        for p in grid:
            if p["batch"] in (1, max(q["batch"] for q in grid)) and p["vocab"] == max(q["vocab"] for q in grid):
                ratios = " | ".join(f"{p[f'speedup_vs_{peer}']:.2f}x" if f"speedup_vs_{peer}" in p
                                    else "-" for peer in report.PEERS)
                predicted = predicted_op_fraction(results, p["semantics"], p["dtype"])
                lines.append(f"  {p['semantics']:12} {p['dtype']:8} {p['batch']:>3} {p['vocab']:>7,}: "
                             f"{p['fused_us']:8.1f} | {p['gbps']:7.1f} | "
                             f"{_percent(p.get('bandwidth_fraction'))} ({_percent(predicted)}) | {ratios}")
    if results.get("sampling"):
        lines.append("sample (filter dtype B V): µs | x one-read floor (predicted at least) | x multinomial "
                     "| x exponential")
        for p in results["sampling"]:
            if p["vocab"] == max(q["vocab"] for q in results["sampling"]):
                predicted = predicted_x_floor(results, p["filter"], p["dtype"])
                lines.append(f"  {p['filter']:6} {p['dtype']:8} {p['batch']:>3} {p['vocab']:>7,}: "
                             f"{p['sample_us']:8.1f} | {p.get('x_floor', float('nan')):5.2f} "
                             f"({'-' if predicted is None else f'{predicted:.2f}'}) | "
                             f"{p['speedup_vs_multinomial']:5.1f}x | "
                             + (f"{p['exponential_us'] / p['sample_us']:5.1f}x" if "exponential_us" in p else "-"))
    for p in results.get("scoring") or []:
        lines.append(f"scoring {p['shape']} {p['dtype']}: token_logprobs {p['token_logprobs_us']:.0f} µs"
                     + (f", peak +{p['token_logprobs_peak_extra_bytes'] / 2**20:.1f} MiB "
                        f"({100 * p['token_logprobs_peak_extra_bytes'] / p['logits_bytes']:.1f}% of the "
                        f"logits); guidance+gather {p['guidance_gather_us']:.0f} µs, +"
                        f"{p['guidance_gather_peak_extra_bytes'] / 2**20:.0f} MiB"
                        if "token_logprobs_peak_extra_bytes" in p else ""))
    if results["generation"]:
        lines.append("generation ms/token (model B impl):")
        for g in results["generation"]:
            lines.append(f"  {g['model']:13} {g['batch']:>3} {g['impl']:22} {g['ms_per_token']:8.2f}")
    lines.append("sections: " + "; ".join(f"{k}: {v}" for k, v in results["sections"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="a trimmed run of about 3 minutes")
    group.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (CI)")
    parser.add_argument("--budget", type=float, help="seconds for the measurements (plan default)")
    parser.add_argument("--tests", type=Path, help="pytest JUnit XML to summarize")
    args = parser.parse_args(argv)
    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        parser.error("torch sees no CUDA GPU; use --smoke for a CPU check of this script")
    r = Run(plan, device, args.budget or plan["budget"])
    r.results["tests"] = read_tests(args.tests)
    r.section("copy bandwidth", lambda: r.results.update(copy_gbps=bench_run.copy_bandwidth(
        device, small=args.smoke)))
    r.section("static prediction", lambda: predict(r))
    r.section("greedy parity", lambda: check_parity(r))
    r.section("host cost", lambda: measure_host(r))
    r.section("op grid", lambda: measure_op(r))
    r.section("sampling", lambda: measure_sampling(r))
    r.section("scoring", lambda: measure_scoring(r))
    r.section("generation", lambda: measure_generation(r))
    r.results["seconds"] = time.perf_counter() - r.started
    args.out.mkdir(parents=True, exist_ok=True)
    tag = report.machine_tag(r.results["machine"])
    (args.out / f"{tag}.json").write_text(json.dumps(r.results, indent=1) + "\n")
    if r.results["guidance"]:
        try:
            report.plot(r.results, args.out / f"{tag}.png")
        except Exception:  # noqa: BLE001 - the plot is a convenience; the numbers are in the JSON
            traceback.print_exc()
    text = summary(r.results)
    (args.out / "summary.txt").write_text(text + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
