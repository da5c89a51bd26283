"""The benchmark harness, checked without a GPU: result format, plotting, README tables, gpu.sh."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import report  # noqa: E402
import run  # noqa: E402

GPU = {"device": "cuda", "name": "NVIDIA H100 80GB HBM3", "sms": 132, "torch": "2.13.0",
       "triton": "3.9.0", "driver": "570.1", "python": "3.11.7", "memory_gib": 79.1}


def _bench(impl, median, calls=1, **info):
    base = dict(impl=impl, semantics="normalized", dtype="bfloat16", batch=1, vocab=262_144,
                min_bytes=3 * 262_144 * 4, calls_per_round=calls)
    return {"name": impl, "stats": {"median": median, "iqr": median / 10, "rounds": 20},
            "extra_info": {**base, **info}}


@pytest.fixture
def raw_gpu(tmp_path):
    raw = {"machine_info": {"cfg_triton": GPU}, "benchmarks": [
        _bench("fused", 1e-3, calls=100),  # 10 µs per call
        _bench("eager", 8e-5), _bench("compiled", 3e-5, compile_s=12.5), _bench("transformers", 5e-5),
        {"name": "gen", "stats": {"median": 0.96, "iqr": 0.048, "rounds": 7},
         "extra_info": {"impl": "plain", "batch": 1, "new_tokens": 48}},
    ]}
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(raw))
    return path


def test_summary_divides_by_calls_and_computes_ratios(raw_gpu):
    results = report.summarize(json.loads(raw_gpu.read_text()), copy_gbps=3000.0)
    (point,) = results["guidance"]
    assert point["fused_us"] == pytest.approx(10.0)
    assert point["speedup_vs_eager"] == pytest.approx(8.0)
    assert point["speedup_vs_compiled"] == pytest.approx(3.0)
    assert point["speedup_vs_transformers"] == pytest.approx(5.0)
    assert point["gbps"] == pytest.approx(3 * 262_144 * 4 / 1e-5 / 1e9)
    assert point["bandwidth_fraction"] == pytest.approx(point["gbps"] / 3000.0)
    assert point["compile_s"] == 12.5
    assert point["fused_iqr_us"] == pytest.approx(1.0) and point["fused_rounds"] == 20
    assert results["generation"] == [{"batch": 1, "impl": "plain", "ms_per_token": pytest.approx(20.0),
                                      "iqr_ms_per_token": pytest.approx(1.0), "rounds": 7}]
    assert report.machine_tag(results["machine"]) == "cuda-nvidia-h100-80gb-hbm3"


def test_run_publishes_file_plot_and_readme_table(raw_gpu, tmp_path):
    readme, tables = tmp_path / "README.md", tmp_path / "docs" / "benchmarks.md"
    readme.write_text("intro\n<!-- bench:cuda:headline:start -->\nold\n<!-- bench:cuda:headline:end -->\nrest\n")
    tables.parent.mkdir()
    tables.write_text("intro\n<!-- bench:cuda:start -->\nold\n<!-- bench:cuda:end -->\nrest\n")
    assert run.main(["--raw", str(raw_gpu), "--out", str(tmp_path / "results"), "--readme", str(readme),
                     "--tables", str(tables)]) == 0
    saved = json.loads((tmp_path / "results" / "cuda-nvidia-h100-80gb-hbm3.json").read_text())
    assert saved["machine"]["name"] == GPU["name"] and saved["copy_gbps"] > 0
    png = tmp_path / "results" / "cuda-nvidia-h100-80gb-hbm3.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = tables.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "NVIDIA H100 80GB HBM3" in text and "| normalized | bfloat16 | 1 | 262,144 | 10 ± 1 |" in text
    assert "../results/cuda-nvidia-h100-80gb-hbm3.png" in text
    headline = readme.read_text()
    assert "old" not in headline and report.generation_table(saved) in headline
    assert "| normalized |" not in headline


def test_plot_of_the_committed_cpu_results(tmp_path):
    (results_file,) = (ROOT / "bench" / "results").glob("cpu-*.json")
    results = json.loads(results_file.read_text())
    assert {"machine", "copy_gbps", "guidance", "generation"} <= set(results)
    report.plot(results, tmp_path / "cpu.png")
    assert (tmp_path / "cpu.png").stat().st_size > 10_000


def test_readme_tables_are_the_generated_ones():
    (results_file,) = (ROOT / "bench" / "results").glob("cpu-*.json")
    results = json.loads(results_file.read_text())
    tables = (ROOT / "docs" / "benchmarks.md").read_text()
    assert report.guidance_table(results) in tables
    assert report.generation_table(results) in tables
    assert report.scoring_table(results) in tables and report.sampling_table(results) in tables
    assert report.generation_table(results) in (ROOT / "README.md").read_text()


def test_gpu_script_parses_and_helps():
    script = ROOT / "bench" / "gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    help_text = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert "offline" in help_text and "--smoke" in help_text


def test_run_rejects_unknown_section():
    with pytest.raises(SystemExit):
        run.main(["--only", "nonsense"])


SOCKET_BLOCKER = '''
import socket

def _refuse(*args, **kwargs):
    raise OSError("network access attempted during the offline GPU-command smoke test")

socket.socket.connect = socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
'''


@pytest.mark.slow
def test_gpu_command_runs_offline_in_smoke_mode(tmp_path):
    """bench/gpu.sh end to end on the CPU at tiny sizes: no package index, no hub, every socket
    connection refused; the summary comes last and the files are what a GPU run returns."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(SOCKET_BLOCKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_", "PIP_", "HF_"))}
    env.update(PYTHON=sys.executable, PIP_NO_INDEX="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(blocker))
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(out), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir())
    (results_file,) = [f for f in files if f.endswith(".json")]
    assert {"log.txt", "summary.txt", "tests.xml", "tests.log"} <= set(files)
    summary = (out / "summary.txt").read_text().strip()
    assert proc.stdout.rstrip().endswith(summary)
    results = json.loads((out / results_file).read_text())
    assert results["plan"] == "smoke" and results["machine"]["device"] == "cpu"
    assert all(v.startswith("ok") for v in results["sections"].values()), results["sections"]
    tests = results["tests"]
    assert tests["tests"] > 50 and tests["failures"] == 0 and tests["errors"] == 0
    assert results["parity"] == {"model": "tiny", "tokens": 4, "batched": True, "sequential": True,
                                 "compiled": True}
    semantics = {p["semantics"] for p in results["guidance"]}
    assert semantics == {"raw", "normalized", "interpolated"}
    assert {g["impl"] for g in results["generation"]} >= {"plain", "transformers_cfg",
                                                          "cfg_triton_batched", "cfg_triton_compiled"}
    assert {p["filter"] for p in results["sampling"]} == {"greedy", "none", "top_k", "top_p", "min_p"}
    assert all(p["sample_us"] > 0 and p["multinomial_us"] > 0 for p in results["sampling"])
    assert "| greedy | float32 | 2 | 1,000 |" in report.sampling_table(results)
    assert ("x floor" in report.sampling_table(results)) == all("x_floor" in p for p in results["sampling"])
    assert [p["shape"] for p in results["scoring"]] == [[2, 16, 1_000]]
    assert "network" not in proc.stdout + proc.stderr
    assert "greedy parity with transformers CFG: batched OK" in summary
    # the README tables come from the same file
    assert "| normalized | float32 | 2 | 1,000 |" in report.guidance_table(results)
    assert "cfg_triton compiled" in report.generation_table(results)


def test_gpu_summary_sets_the_static_prediction_beside_each_point():
    """The GPU command's summary prints each point's predicted ceiling from the issue budget: the
    op's passes combined by the bytes each moves, `sample`'s one read as a multiple of its floor."""
    import gpu

    passes = [dict(kernel="_guidance_stats_kernel", dtype="bf16", constexprs=dict(MODE=1), ceiling=0.5),
              dict(kernel="_guidance_write_kernel", dtype="bf16", constexprs=dict(MODE=1), ceiling=1.0),
              dict(kernel="_sample_stats_kernel", dtype="bf16", constexprs=dict(NOISE=True), ceiling=0.8)]
    results = {"prediction": {"passes": passes}}
    # stats reads 4 bytes an entry at half speed, the write moves 8 at full: 8 / (4 / 0.5 + 8 / 1)
    assert gpu.predicted_op_fraction(results, "normalized", "bfloat16") == pytest.approx(0.5)
    assert gpu.predicted_op_fraction(results, "interpolated", "bfloat16") is None
    assert gpu.predicted_x_floor(results, "none", "bfloat16") == pytest.approx(1.25)
    assert gpu.predicted_x_floor(results, "top_p", "bfloat16") is None
    assert gpu.predicted_op_fraction({}, "normalized", "bfloat16") is None


def test_serve_summary_tabulates_and_holds_the_targets():
    import serve

    def point(impl, streams, tokens_per_s, ttft):
        return {"extra_info": {"impl": impl, "streams": streams, "tokens_per_s": tokens_per_s,
                               "ttft_mean": ttft}}

    raw = {"machine_info": {"cfg_triton": {"name": "cpu", "cores": 2, "torch": "x", "threads": 2}},
           "benchmarks": [point(i, s, rate * s, 0.1 * s) for s in (1, 16)
                          for i, rate in (("guided", 6.0), ("unguided", 10.0), ("per-request", 1.0))]}
    text = serve.summary(raw, "label")
    assert "| 16 | 96 | 1.60 s | 160 | 1.60 s | 16 | 1.60 s |" in text
    assert "guided / unguided 0.60x (target >= 0.45x), guided / per-request 6.00x (target >= 3x)" in text


def test_single_file_benchmarks_append_their_summary(tmp_path, monkeypatch):
    machine = {"name": "Some CPU", "device": "cpu"}
    monkeypatch.setattr(run, "run_pytest_benchmark", lambda files, extra: {
        "machine_info": {"cfg_triton": machine}, "files": files})
    monkeypatch.setattr(run, "HERE", tmp_path)
    (tmp_path / "results").mkdir()
    summary = lambda raw, label: f"{label}: {raw['files']}\n"  # noqa: E731
    for label in ("one", "two"):
        assert run.append_summary([label], "d", "test_x_bench.py", summary, "x-{machine}.md") == 0
    assert (tmp_path / "results" / "x-cpu-some-cpu.md").read_text() == \
        "one: ['test_x_bench.py']\n\ntwo: ['test_x_bench.py']\n"
    out = tmp_path / "elsewhere.md"
    run.append_summary(["three", "--out", str(out)], "d", "test_x_bench.py", summary, "x-{machine}.md")
    assert out.read_text() == "three: ['test_x_bench.py']\n"
