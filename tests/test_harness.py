"""The lm-evaluation-harness model `cfg`, its local tasks and `cfg-triton eval`, on the bundled
SmolLM2, checked against scoring each example directly."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from cfg_triton import cli, generate  # noqa: E402
from cfg_triton.scoring import score  # noqa: E402

LAMBADA = Path(os.environ.get("CFG_TRITON_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) \
    / "lambada_test.jsonl"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch):
    # Whole-model scoring runs the CPU torch path; the interpreted kernels are test_logprobs.py's.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def harness(smollm2, tmp_path_factory):
    """(the `cfg` model around the session's SmolLM2, a task manager holding the local tasks)."""
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    from lm_eval.tasks import TaskManager

    from cfg_triton.harness import CFGLM, write_local_tasks

    model, tok = smollm2
    folder = tmp_path_factory.mktemp("tasks")
    write_local_tasks(folder, LAMBADA if LAMBADA.exists() else None)
    lm = CFGLM(pretrained=model, tokenizer=tok, batch_size=16)
    return lm, TaskManager(include_path=str(folder), include_defaults=False)


def _evaluate(harness, task, gamma, limit, **kw):
    import lm_eval

    lm, manager = harness
    lm.guidance_scale = gamma
    for key, value in kw.items():
        setattr(lm, key, value)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit,
                                      bootstrap_iters=0, log_samples=False)
    finally:
        for key in kw:
            setattr(lm, key, None)
    return out["results"][task]


def _lambada_hits(model, tok, gamma, limit):
    """The issue's definition, one example at a time: context = text before its last space,
    target = space + last word, unconditional input = the context's last token; a hit when every
    target token is the argmax of the float64 guided scores."""
    hits = 0
    with LAMBADA.open() as f:
        texts = [json.loads(line)["text"] for line, _ in zip(f, range(limit))]
    for text in texts:
        context, word = text.rsplit(" ", 1)
        whole = tok.encode(context + " " + word, add_special_tokens=False)
        ctx = tok.encode(context, add_special_tokens=False)
        cont = whole[len(ctx):]
        with torch.no_grad():
            c = model(torch.tensor([ctx + cont[:-1]])).logits[0, -len(cont):].double().log_softmax(-1)
            u = model(torch.tensor([ctx[-1:] + cont[:-1]])).logits[0, -len(cont):].double().log_softmax(-1)
        hits += bool(((u + gamma * (c - u)).argmax(-1) == torch.tensor(cont)).all())
    return hits


@pytest.mark.slow
@pytest.mark.skipif(not LAMBADA.exists(), reason=f"no LAMBADA file at {LAMBADA}")
def test_lambada_through_the_harness_matches_direct_scoring(harness, smollm2):
    model, tok = smollm2
    limit = 40
    for gamma in (1.0, 1.5):
        result = _evaluate(harness, "lambada_local", gamma, limit)
        assert round(result["acc,none"] * limit) == _lambada_hits(model, tok, gamma, limit), gamma


@pytest.mark.slow
def test_multiple_choice_through_the_harness(harness, smollm2):
    model, tok = smollm2
    docs = [json.loads(line) for line in
            (Path(__file__).resolve().parents[1] / "cfg_triton" / "eval_tasks" / "facts_mc.jsonl").open()]
    for gamma in (1.0, 2.0):
        result = _evaluate(harness, "facts_mc", gamma, None)
        right = 0
        for doc in docs:
            context = f"Question: {doc['question']}\nAnswer:"
            scores = score(model, tok, [context] * len(doc["choices"]),
                           [" " + c for c in doc["choices"]], guidance_scale=gamma)
            right += int(scores.logprobs.argmax()) == doc["answer"]
        assert result["acc,none"] == pytest.approx(right / len(docs)), gamma


def test_negative_prompt_reaches_scoring(harness, smollm2):
    model, tok = smollm2
    result = _evaluate(harness, "facts_mc", 3.0, 6, negative_prompt="")
    docs = [json.loads(line) for line, _ in zip(
        (Path(__file__).resolve().parents[1] / "cfg_triton" / "eval_tasks" / "facts_mc.jsonl").open(), range(6))]
    right = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        scores = score(model, tok, [context] * 4, [" " + c for c in doc["choices"]], guidance_scale=3.0,
                       negative_contexts=[""] * 4)  # empty: the BOS token
        right += int(scores.logprobs.argmax()) == doc["answer"]
    assert result["acc,none"] == pytest.approx(right / 6)


def test_negative_prompt_reaches_each_request(harness, smollm2):
    """Each loglikelihood request is scored with the model's negative prompt as its unconditional
    context, not the default last token."""
    from cfg_triton.scoring import score_tokens

    lm, _ = harness
    model, tok = smollm2
    context = tok.encode("Question: What colour is the sky?\nAnswer:", add_special_tokens=False)
    options = [tok.encode(" Blue", add_special_tokens=False), tok.encode(" Green", add_special_tokens=False)]
    lm.guidance_scale, lm.negative_prompt = 2.0, "Answer wrongly."
    try:
        got = lm._loglikelihood_tokens([(None, context, o) for o in options], disable_tqdm=True)
    finally:
        lm.negative_prompt = None
    negative = tok.encode("Answer wrongly.", add_special_tokens=False)
    want = score_tokens(model, [context] * 2, options, negatives=[negative] * 2, guidance_scale=2.0)
    default = score_tokens(model, [context] * 2, options, guidance_scale=2.0)
    assert [lp for lp, _ in got] == pytest.approx(want.logprobs.tolist(), abs=1e-5)
    assert not torch.allclose(want.logprobs, default.logprobs, atol=1e-3)


def test_generate_until_uses_guided_generation(harness, smollm2):
    from lm_eval.api.instance import Instance

    lm, _ = harness
    model, tok = smollm2
    lm.guidance_scale = 2.0
    prompts = ["Question: What do bees make?\nAnswer:", "The three primary colors are"]
    requests = [Instance(request_type="generate_until", doc={}, idx=0,
                         arguments=(p, {"until": ["\n", "."], "max_gen_toks": 12})) for p in prompts]
    got = lm.generate_until(requests, disable_tqdm=True)
    for prompt, text in zip(prompts, got):
        ids = tok(prompt, return_tensors="pt").input_ids
        out = generate(model, ids, guidance_scale=2.0, max_new_tokens=12)
        want = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        for stop in ("\n", "."):
            want = want.split(stop)[0]
        assert text == want


def test_cfg_triton_eval_writes_the_table(tmp_path, capsys, monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    code = cli.main(["eval", "--tasks", "facts_mc", "--limit", "4", "--guidance-scale", "1", "2",
                     "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 0
    report = json.loads(out_json.read_text())
    assert [(r["task"], r["guidance_scale"], r["samples"]) for r in report["results"]] == \
        [("facts_mc", 1.0, 4), ("facts_mc", 2.0, 4)]
    assert all(0 <= r["metrics"]["acc"] <= 1 for r in report["results"])
    assert report["machine"]["name"] and report["machine"]["device"] in ("cpu", "cuda")  # timed rows
    table = out_md.read_text()
    assert "| facts_mc (4) | acc (%) |" in table and "γ = 2" in table
    assert table in capsys.readouterr().out


def test_cfg_triton_eval_needs_the_lambada_path(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "--tasks", "lambada_local"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lambada" in err


@pytest.mark.slow
def test_harness_command_line_knows_cfg(tmp_path):
    from cfg_triton.harness import write_local_tasks

    write_local_tasks(tmp_path)
    env = {**os.environ, **OFFLINE}
    done = subprocess.run([sys.executable, "-m", "cfg_triton.harness", "run", "--model", "cfg",
                           "--model_args", "pretrained=smollm2,guidance_scale=1.5,dtype=float32",
                           "--tasks", "facts_mc", "--include_path", str(tmp_path), "--limit", "3"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "facts_mc" in done.stdout and "acc" in done.stdout


def test_an_empty_continuation_scores_as_hflm_does(harness, smollm2):
    """An empty multiple-choice option: log-probability 0 and greedy, as `HFLM` scores it; the
    other requests of the batch keep their own scores."""
    from cfg_triton.scoring import score_tokens

    lm, _ = harness
    model, tok = smollm2
    lm.guidance_scale = 1.5
    context = tok.encode("The sky is", add_special_tokens=False)
    options = [tok.encode(" blue", add_special_tokens=False), []]
    got = lm._loglikelihood_tokens([(None, context, cont) for cont in options], disable_tqdm=True)
    alone = score_tokens(model, [context], [options[0]], guidance_scale=1.5)
    assert got[1] == (0.0, True)
    assert got[0] == (pytest.approx(float(alone.logprobs[0]), abs=1e-5), bool(alone.greedy[0]))
    assert lm._loglikelihood_tokens([(None, context, [])], disable_tqdm=True) == [(0.0, True)]


@pytest.mark.parametrize("args, option", [
    (["--tasks", "no_such_task"], "--tasks"),
    (["--model", "no-such-model"], "--model"),
    (["--tasks", "lambada_local", "--lambada", "{bad}"], "--lambada"),
    (["--tasks", "lambada_local", "--lambada", "{no_word}"], "--lambada"),
    (["--device", "cuda"], "--device"),
    (["--device", "warp-drive"], "--device"),
    (["--json", "{missing}/r.json"], "--json"),
    (["--markdown", "{missing}/r.md"], "--markdown"),
    (["--include-path", "{missing}"], "--include-path"),
])
def test_cfg_triton_eval_refuses_bad_arguments_before_model_work(args, option, tmp_path, capsys,
                                                                   monkeypatch):
    import cfg_triton.harness

    if option == "--device" and "cuda" in args and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(cfg_triton.harness.CFGLM, "__init__",
                        lambda *a, **k: pytest.fail("the model was loaded before the check"))
    (tmp_path / "bad.jsonl").write_text('{"text": "one two"}\nnot json\n')
    (tmp_path / "no_word.jsonl").write_text('{"text": "oneword"}\n')
    paths = {"bad": tmp_path / "bad.jsonl", "no_word": tmp_path / "no_word.jsonl",
             "missing": tmp_path / "missing"}
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "--tasks", "facts_mc", *[a.format(**paths) for a in args]])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {option}:" in err, err
