"""`cfg-triton eval`: lm-evaluation-harness runs of one model at several guidance scales, as a table."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

# What the results table shows per task; the JSON keeps every metric the harness reports.
_HEADLINE = {"lambada_local": "acc", "lambada_openai": "acc", "lambada_standard": "acc",
             "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "arc_easy": "acc_norm",
             "piqa": "acc_norm", "sciq": "acc_norm", "triviaqa": "exact_match"}


def _metrics(task_result: dict) -> dict:
    """The harness's `{"acc,none": 0.3, "acc_stderr,none": ...}` as `{"acc": 0.3}` (numbers only)."""
    out = {}
    for key, value in task_result.items():
        name, _, _ = key.partition(",")
        if "," in key and not name.endswith("_stderr") and isinstance(value, (int, float)):
            out[name] = value
    return out


class BadArgument(ValueError):
    """An argument of `run` that cannot work, found before any model work: `option` names it as the
    command line spells it."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option, self.message = option, message


def check_arguments(model, *, lambada_path=None, include_path=None, device=None, outputs=()):
    """Raises `BadArgument` for what would otherwise fail only after loading the model (or after
    the whole run): the model source, the LAMBADA file's lines, the task folder, the device and
    the folders that `outputs` (paths to write) go in."""
    import json

    import torch

    from .models import _resolve

    try:
        _resolve(model)
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise BadArgument("--model", str(e)) from None
    if lambada_path is not None:
        path = Path(lambada_path).expanduser()
        if not path.is_file():
            raise BadArgument("--lambada", f"no LAMBADA file at {path}")
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise BadArgument("--lambada", f"{path.name} line {number} is not a JSON object "
                                      "with a \"text\" string") from None
                if not isinstance(text, str) or " " not in text.strip():
                    raise BadArgument("--lambada", f"{path.name} line {number}: the text needs a context "
                                      "and a last word, separated by a space")
    if include_path is not None and not Path(include_path).expanduser().is_dir():
        raise BadArgument("--include-path", f"no folder at {include_path}")
    if device is not None:
        try:
            kind = torch.device(device).type
        except RuntimeError as e:
            raise BadArgument("--device", str(e).splitlines()[0]) from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise BadArgument("--device", f"{device} is not available: this torch build or machine "
                              "has no CUDA device")
    for option, target in outputs:
        if target is not None and not Path(target).expanduser().resolve().parent.is_dir():
            raise BadArgument(option, f"no folder to write {target} in")


def run(model: str, tasks: list[str], guidance_scales: list[float], *, mix=None, normalize=True,
        negative_prompt=None, limit=None, batch_size=16, lambada_path=None, include_path=None,
        device=None, log=print) -> dict:
    """Evaluates `model` on `tasks` once per guidance scale through the harness; returns a dict
    with the settings and `results`: one `{task, guidance_scale, metrics, samples, seconds}` each.

    Local tasks (`lambada_local` from `lambada_path`, `facts_mc`) are written to a temporary task
    folder; other names resolve through the harness's own task registry (and `include_path`).
    When every task is local, the Hugging Face hub and datasets libraries are put offline first.
    """
    from .harness import LOCAL_TASKS, sha256, write_local_tasks

    if "lambada_local" in tasks and lambada_path is None:
        raise BadArgument("--lambada", "task lambada_local needs the path of lambada_test.jsonl")
    check_arguments(model, lambada_path=lambada_path if "lambada_local" in tasks else None,
                    include_path=include_path, device=device)
    if all(t in LOCAL_TASKS for t in tasks):
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(var, "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .harness import CFGLM

    with tempfile.TemporaryDirectory(prefix="cfg-triton-tasks-") as folder:
        write_local_tasks(folder, lambada_path if "lambada_local" in tasks else None)
        paths = [folder] + ([str(include_path)] if include_path else [])
        manager = TaskManager(include_path=paths)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise BadArgument("--tasks", f"unknown task {', '.join(map(repr, unknown))} (the harness's "
                              "task names, the local ones, or those under --include-path)")
        lm = CFGLM(pretrained=model, guidance_scale=guidance_scales[0], mix=mix, normalize=normalize,
                   negative_prompt=negative_prompt, device=device, batch_size=batch_size)
        rows = []
        for gamma in guidance_scales:
            lm.guidance_scale = float(gamma)
            log(f"[guidance scale {gamma:g}]")
            started = time.perf_counter()
            out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager,
                                          limit=limit, bootstrap_iters=0, log_samples=False)
            seconds = time.perf_counter() - started
            for task in tasks:
                rows.append({"task": task, "guidance_scale": float(gamma),
                             "metrics": _metrics(out["results"][task]),
                             "samples": out.get("n-samples", {}).get(task, {}).get("effective"),
                             "seconds": round(seconds, 1)})
    data = {}
    if "lambada_local" in tasks:
        # The file's name and checksum identify the data; its folder is this machine's business.
        data["lambada_local"] = {"file": Path(lambada_path).name, "sha256": sha256(lambada_path)}
    from .machine import describe

    return {"model": model, "tasks": list(tasks), "guidance_scales": [float(g) for g in guidance_scales],
            "mix": mix, "normalize": normalize, "negative_prompt": negative_prompt, "limit": limit,
            "data": data, "results": rows, "machine": describe()}


def markdown(report: dict) -> str:
    """Accuracy (the task's headline metric, in %) per task and guidance scale."""
    scales = report["guidance_scales"]
    mix = f", mix {report['mix']:g}" if report["mix"] is not None else ""
    lines = [f"Model: {report['model']}" + mix
             + (f", first {report['limit']} examples per task" if report["limit"] else ""), ""]
    for task, source in report["data"].items():
        lines[0] += f"; {task} from {source['file']} (sha256 {source['sha256'][:12]}…)"
    lines += ["| task | metric | " + " | ".join(f"γ = {g:g}" for g in scales) + " |",
              "|---|---|" + "---:|" * len(scales)]
    for task in report["tasks"]:
        by_scale = {r["guidance_scale"]: r for r in report["results"] if r["task"] == task}
        metrics = next(iter(by_scale.values()))["metrics"]
        metric = _HEADLINE.get(task, "acc" if "acc" in metrics else next(iter(metrics), "?"))
        cells = []
        for g in scales:
            value = by_scale.get(float(g), {}).get("metrics", {}).get(metric)
            cells.append("—" if value is None else f"{100 * value:.1f}")
        samples = next(iter(by_scale.values()))["samples"]
        label = task + (f" ({samples})" if samples else "")
        lines.append(f"| {label} | {metric} (%) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
