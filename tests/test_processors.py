"""Drop-in processors against transformers' own, the warpers, patch_transformers, the command."""
import pytest
import torch
from transformers.generation import logits_process as hf

import cfg_triton
from cfg_triton.processors import warp_scores

from helpers import logits

FP32 = dict(rtol=1e-5, atol=1e-4)  # same formula in another association order: fp32 rounding


@pytest.mark.parametrize("gamma", [1.5, 3.0])
def test_batched_processor_matches_transformers(backend, gamma):
    ids = torch.ones(3, 5, dtype=torch.long)
    scores = logits(6, 4000)
    theirs = hf.ClassifierFreeGuidanceLogitsProcessor(gamma)(ids, scores.clone())
    torch.testing.assert_close(cfg_triton.CFGLogitsProcessor(gamma)(ids, scores), theirs, **FP32)


@pytest.mark.parametrize("kw", [dict(normalize=True), dict(mix=0.7), dict(mix=torch.tensor([0.2, 0.9]))],
                         ids=["normalized", "mix", "mix-per-row"])
def test_batched_processor_normalized_and_interpolated(backend, kw):
    from helpers import expected

    ids = torch.ones(2, 5, dtype=torch.long)
    scores = logits(4, 3000)
    got = cfg_triton.CFGLogitsProcessor(2.5, **kw)(ids, scores)
    want = expected(scores[:2], scores[2:], 2.5, **({"mix": kw["mix"]} if "mix" in kw else {}))
    torch.testing.assert_close(got.double(), want, **FP32)


def test_batched_processor_rejects_unstacked_scores():
    with pytest.raises(ValueError, match="2B"):
        cfg_triton.CFGLogitsProcessor(1.5)(torch.ones(3, 5, dtype=torch.long), logits(3, 100))


@pytest.mark.model
@pytest.mark.parametrize("use_cache", [True, False])
def test_unbatched_processor_matches_transformers(smollm2, use_cache):
    model, tok = smollm2
    ids = tok("The weather today is", return_tensors="pt").input_ids
    neg = tok("Terrible news:", return_tensors="pt").input_ids
    theirs = hf.UnbatchedClassifierFreeGuidanceLogitsProcessor(2.0, model, neg, use_cache=use_cache)
    ours = cfg_triton.UnbatchedCFGLogitsProcessor(2.0, model, neg, use_cache=use_cache)
    with torch.no_grad():
        for _ in range(3):
            scores = model(ids).logits[:, -1].float()
            a, b = ours(ids, scores), theirs(ids, scores)
            torch.testing.assert_close(a, b, **FP32)
            ids = torch.cat([ids, a.argmax(-1, keepdim=True)], 1)


@pytest.mark.model
def test_unbatched_processor_defaults_and_mix(smollm2):
    """Without unconditional ids the branch is the prompt's last token (transformers' default);
    with `mix`, the interpolated semantics on the same two logit rows."""
    from helpers import expected

    model, tok = smollm2
    ids = tok("The weather today is", return_tensors="pt").input_ids
    with torch.no_grad():
        scores = model(ids).logits[:, -1].float()
        last = model(ids[:, -1:]).logits[:, -1].float()
    theirs = hf.UnbatchedClassifierFreeGuidanceLogitsProcessor(2.0, model)(ids, scores)
    torch.testing.assert_close(cfg_triton.UnbatchedCFGLogitsProcessor(2.0, model)(ids, scores), theirs,
                               **FP32)
    mixed = cfg_triton.UnbatchedCFGLogitsProcessor(2.0, model, mix=0.7)(ids, scores)
    torch.testing.assert_close(mixed.double(), expected(scores, last, 2.0, mix=0.7), **FP32)


@pytest.mark.model
def test_unbatched_processor_takes_a_guidance_scale_per_row(smollm2):
    model, tok = smollm2
    ids = torch.cat([tok("The weather today is", return_tensors="pt").input_ids] * 2)
    neg = torch.cat([tok("Terrible news:", return_tensors="pt").input_ids] * 2)
    with torch.no_grad():
        scores = model(ids).logits[:, -1].float()
    rows = cfg_triton.UnbatchedCFGLogitsProcessor(torch.tensor([1.0, 3.0]), model, neg)(ids, scores)
    for i, gamma in enumerate((1.0, 3.0)):
        theirs = hf.UnbatchedClassifierFreeGuidanceLogitsProcessor(gamma, model, neg[i : i + 1])
        torch.testing.assert_close(rows[i : i + 1], theirs(ids[i : i + 1], scores[i : i + 1]), **FP32)


@pytest.mark.slow
@pytest.mark.model
def test_patch_transformers_uses_fused_processor_and_undoes(smollm2, monkeypatch):
    model, tok = smollm2
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    neg = tok("The end.", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, guidance_scale=1.5,
              negative_prompt_ids=neg)
    plain = model.generate(ids, **kw)
    calls = []
    original = cfg_triton.UnbatchedCFGLogitsProcessor.__call__
    monkeypatch.setattr(cfg_triton.UnbatchedCFGLogitsProcessor, "__call__",
                        lambda self, i, s: calls.append(1) or original(self, i, s))
    with cfg_triton.patch_transformers():
        patched = model.generate(ids, **kw)
    assert len(calls) == 10 and patched.tolist() == plain.tolist()
    model.generate(ids, **kw)
    assert len(calls) == 10  # undone on exit
    handle = cfg_triton.patch_transformers()
    model.generate(ids, **kw)
    handle.undo()
    assert len(calls) == 20


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, None, None), (1.0, 50, None),
                                                       (1.0, None, 0.9), (1.3, 20, 0.5)])
def test_warpers_match_transformers(temperature, top_k, top_p):
    scores = logits(4, 3000)
    expected = scores.clone()
    if temperature != 1.0:
        expected = hf.TemperatureLogitsWarper(temperature)(None, expected)
    if top_k:
        expected = hf.TopKLogitsWarper(top_k)(None, expected)
    if top_p:
        expected = hf.TopPLogitsWarper(top_p)(None, expected)
    got = warp_scores(scores, temperature, top_k, top_p)
    assert torch.equal(torch.isneginf(got), torch.isneginf(expected))
    torch.testing.assert_close(got[~torch.isneginf(got)], expected[~torch.isneginf(expected)])


@pytest.mark.parametrize("kw, match", [(dict(temperature=0.0), "temperature"), (dict(top_k=0), "top_k"),
                                       (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_warper_arguments_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        warp_scores(logits(2, 100), **kw)


@pytest.mark.slow
@pytest.mark.model
def test_command_generates_and_compares(smollm2, capsys):
    from cfg_triton import cli

    assert cli.main(["generate", "--prompt", "Name a color.", "--system", "Answer in one word.",
                     "--max-new-tokens", "6", "--compare"]) == 0
    out, err = capsys.readouterr()
    assert "--- guided (scale 1.5, batched) ---" in out and "--- unguided ---" in out
    assert err.count("tokens/s") == 2
    # The streamed texts are what generate gives for the same chats.
    model, tok = smollm2
    chat = [{"role": "user", "content": "Name a color."}]
    system = [{"role": "system", "content": "Answer in one word."}]
    encode = lambda m: tok.apply_chat_template(m, add_generation_prompt=True,  # noqa: E731
                                               return_tensors="pt", return_dict=True)["input_ids"]
    ids, neg = encode(system + chat), encode(chat)
    for scale, negative in ((1.5, neg), (1.0, None)):
        new = cfg_triton.generate(model, ids, negative_input_ids=negative, guidance_scale=scale,
                                  max_new_tokens=6)[0, ids.shape[1]:]
        assert tok.decode(new, skip_special_tokens=True).strip() in out


@pytest.mark.parametrize("argv, argument", [
    (["--mix", "2"], "--mix"),
    (["--guidance-scale", "nan"], "--guidance-scale"),
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--max-new-tokens", "2.5"], "--max-new-tokens"),
    (["--sample", "--top-p", "0"], "--top-p"),
    (["--sample", "--temperature", "0"], "--temperature"),
    (["--model", "/no/such/model"], "--model"),
    (["--model", "EMPTY_FOLDER"], "--model"),
    (["--prompt", "  "], "--prompt"),
])
def test_command_rejects_bad_values_in_one_line(argv, argument, capsys, tmp_path):
    from cfg_triton import cli

    argv = [str(tmp_path) if a == "EMPTY_FOLDER" else a for a in argv]
    full = ["generate"] + (["--prompt", "x"] if "--prompt" not in argv else []) + argv
    with pytest.raises(SystemExit) as exit_info:
        cli.main(full)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"argument {argument}" in err and "Traceback" not in err


@pytest.mark.model
def test_command_warns_about_ignored_and_oversized_input(smollm2, capsys):
    from cfg_triton import cli

    assert cli.main(["generate", "--prompt", "Hi", "--top-p", "0.5", "--max-new-tokens", "1"]) == 0
    assert "--top-p only apply with --sample" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--prompt", "word " * 9000, "--no-chat"])
    assert exit_info.value.code == 2 and "context" in capsys.readouterr().err
    # The instruct model answers "Hi" and stops long before the context ends.
    assert cli.main(["generate", "--prompt", "Hi", "--max-new-tokens", "8200"]) == 0
    assert "exceeds the model's context" in capsys.readouterr().err
