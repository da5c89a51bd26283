"""Runs the benchmarks on this machine and publishes the results (file, plot, the tables of
docs/benchmarks.md and the README's headline).

    python bench/run.py                       # guidance grid + generation, results in bench/results/
    python bench/run.py --only guidance       # just the op grid
    python bench/run.py --only scoring --merge  # LAMBADA scoring and its memory; keep the rest
    python bench/run.py --merge               # keep this machine's earlier sections not rerun

The op grid runs on the GPU when torch sees one, else on the CPU (trimmed; see
test_guidance_bench.py). The device's copy bandwidth is measured once for the roofline.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402

FILES = {"guidance": "test_guidance_bench.py", "generation": "test_generation_bench.py",
         "host": "test_host_bench.py", "scoring": "test_scoring_bench.py",
         "sampling": "test_sampling_bench.py"}


def copy_bandwidth(device: str, small: bool = False) -> float:
    """GB/s of `dst.copy_(src)` (bytes read plus bytes written) on a buffer far larger than caches
    (`small`: a 4 MiB buffer, for smoke runs whose figures mean nothing)."""
    import torch

    n = 1 << 20 if small else (1 << 29 if device == "cuda" else 1 << 26)  # 2 GiB / 256 MiB of fp32
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * n * 4 / sorted(times)[len(times) // 2] / 1e9


def run_pytest_benchmark(files, extra) -> dict:
    """The pytest-benchmark JSON of benchmark files (names under bench/, or keys of FILES), run
    compiled (TRITON_INTERPRET unset)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "raw.json"
        cmd = [sys.executable, "-m", "pytest", *[str(HERE / FILES.get(f, f)) for f in files], "-q",
               "-p", "no:cacheprovider", "--benchmark-enable", f"--benchmark-json={out}", *extra]
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        subprocess.run(cmd, check=True, cwd=HERE.parent, env=env)
        return json.loads(out.read_text())


def append_summary(argv, description, bench_file, summary, name) -> int:
    """The command of a single-file benchmark (`bench/dropin.py`, `bench/serve.py`): runs
    `bench_file`, appends `summary(raw, LABEL)` to `--out` (default `results/<name with the
    machine>`) and prints it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("label")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    raw = run_pytest_benchmark([bench_file], [])
    text = summary(raw, args.label)
    out = args.out or HERE / "results" / name.format(machine=report.machine_tag(raw["machine_info"]["cfg_triton"]))
    with open(out, "a", encoding="utf-8") as f:
        f.write(("\n" if out.exists() and out.stat().st_size else "") + text)
    print(text, end="")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(FILES), action="append",
                        help="run only these benchmark files (repeatable)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--readme", type=Path, default=HERE.parent / "README.md",
                        help="the page holding the headline table")
    parser.add_argument("--tables", type=Path, default=HERE.parent / "docs" / "benchmarks.md",
                        help="the page holding every table")
    parser.add_argument("--raw", type=Path, help="summarize an existing pytest-benchmark JSON instead")
    parser.add_argument("--merge", action="store_true",
                        help="keep sections of this machine's previous results that were not rerun")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    raw = json.loads(args.raw.read_text()) if args.raw else \
        run_pytest_benchmark(args.only or sorted(FILES), args.pytest_args)
    results = report.summarize(raw, copy_bandwidth(device))
    previous = args.out / f"{report.machine_tag(results['machine'])}.json"
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        for section in ("guidance", "generation", "host", "load", "scoring", "memory", "sampling_cpu"):
            if not results[section]:
                results[section] = old.get(section, [])
    path = report.publish(results, args.out, args.readme, args.tables)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
