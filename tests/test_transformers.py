"""`patch_transformers`: unchanged `model.generate(guidance_scale=…)` calls, paired into one forward."""
import threading
import warnings

import pytest
import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

import cfg_triton

NEW = 10


def _batch(tok, texts):
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


class _CountRows:
    """Records how many rows go through the model's token embedding in each forward (a hook on the
    embedding, removed afterwards)."""

    def __init__(self, model):
        self.rows = []
        self.handle = model.get_input_embeddings().register_forward_pre_hook(
            lambda module, args: self.rows.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _both(model, *args, **kwargs):
    """(unpatched output, patched output, batch sizes of the patched call's forwards)."""
    theirs = model.generate(*args, **kwargs)
    with cfg_triton.patch_transformers(), _CountRows(model) as count:
        ours = model.generate(*args, **kwargs)
    return theirs, ours, count.rows


@pytest.mark.model
@pytest.mark.parametrize("negative", [False, True], ids=["last-token", "negative-prompt"])
def test_greedy_equals_transformers_in_one_paired_forward_per_step(smollm2, negative):
    model, tok = smollm2
    ids = tok("Write one sentence about the sea.", return_tensors="pt").input_ids
    neg = tok("Write about the desert instead, at length.", return_tensors="pt").input_ids if negative else None
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, guidance_scale=1.5,
              negative_prompt_ids=neg)
    theirs, ours, rows = _both(model, ids, **kw)
    assert ours.tolist() == theirs.tolist()
    assert rows == [2] * NEW  # both branches in every forward, never a second pass


@pytest.mark.model
def test_padded_batch_with_penalty_stop_string_and_scores(smollm2):
    model, tok = smollm2
    ids, mask = _batch(tok, ["The capital of France is", "Write a haiku about rain.", "def add(a, b):"])
    neg, neg_mask = _batch(tok, ["Answer in French.", "Be sad.", "# comment"])
    kw = dict(attention_mask=mask, negative_prompt_ids=neg, negative_prompt_attention_mask=neg_mask,
              max_new_tokens=NEW, do_sample=False, guidance_scale=2.0, repetition_penalty=1.3,
              stop_strings=["\n\n"], tokenizer=tok, return_dict_in_generate=True, output_scores=True,
              output_logits=True)
    theirs, ours, rows = _both(model, ids, **kw)
    assert ours.sequences.tolist() == theirs.sequences.tolist()
    assert set(rows) == {6}
    for a, b in zip(ours.scores, theirs.scores):
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a))
        torch.testing.assert_close(a[finite], b[finite], rtol=1e-4, atol=1e-4)
    for a, b in zip(ours.logits, theirs.logits):  # raw conditional logits, before any processor
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.model
def test_num_return_sequences_with_a_negative_prompt(smollm2):
    """transformers fails here (its negative prompt is not expanded); under the patch each returned
    sequence is the prompt's own guided greedy run."""
    model, tok = smollm2
    ids = tok("Name a fruit:", return_tensors="pt").input_ids
    neg = tok("Name a vegetable:", return_tensors="pt").input_ids
    # top-k 1 sampling: deterministic, and allowed with several return sequences (greedy is not)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=True, top_k=1, guidance_scale=2.0,
              negative_prompt_ids=neg)
    with cfg_triton.patch_transformers():
        out = model.generate(ids, num_return_sequences=2, **kw)
        solo = model.generate(ids, **kw)
    assert out.tolist() == solo.tolist() * 2


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        initializer_range=0.3, eos_token_id=None, pad_token_id=0, bos_token_id=1)
    return GPT2LMHeadModel(config).eval()


def test_absolute_positions_with_left_padded_negative_prompts():
    """GPT-2 takes absolute positions: transformers' unconditional pass shifts a left-padded
    negative prompt; under the patch each row equals its own solo run."""
    model = _tiny_gpt2()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    neg = torch.tensor([[0, 0, 0, 20], [21, 22, 23, 24]])
    neg_mask = torch.tensor([[0, 0, 0, 1], [1, 1, 1, 1]])
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, guidance_scale=3.0)
    with cfg_triton.patch_transformers():
        out = model.generate(ids, negative_prompt_ids=neg, negative_prompt_attention_mask=neg_mask, **kw)
        solo = model.generate(ids[:1], negative_prompt_ids=neg[:1, 3:], **kw)
        other = model.generate(ids[1:], negative_prompt_ids=neg[1:], **kw)
    assert out[0].tolist() == solo[0].tolist() and out[1].tolist() == other[0].tolist()


def test_unsupported_calls_fall_back_with_one_warning():
    model = _tiny_gpt2()
    ids = torch.tensor([[5, 6, 7, 8]])
    kw = dict(max_new_tokens=4, do_sample=False, guidance_scale=2.0, num_beams=2)
    theirs = model.generate(ids, **kw)
    with cfg_triton.patch_transformers():
        with pytest.warns(UserWarning, match="beam search"):
            ours = model.generate(ids, **kw)
    assert ours.tolist() == theirs.tolist()


def test_sequential_mode_keeps_two_passes():
    model = _tiny_gpt2()
    ids = torch.tensor([[5, 6, 7, 8]])
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, guidance_scale=2.0)
    with cfg_triton.patch_transformers(sequential=True), _CountRows(model) as count:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model.generate(ids, **kw)
    assert count.rows.count(1) == 2 * 4 and out.tolist() == model.generate(ids, **kw).tolist()


def test_patches_nest_and_undo_in_any_order():
    from transformers.generation import logits_process, utils

    original = logits_process.UnbatchedClassifierFreeGuidanceLogitsProcessor
    first, second = cfg_triton.patch_transformers(), cfg_triton.patch_transformers()
    first.undo()
    assert utils.UnbatchedClassifierFreeGuidanceLogitsProcessor is cfg_triton.UnbatchedCFGLogitsProcessor
    second.undo()
    assert utils.UnbatchedClassifierFreeGuidanceLogitsProcessor is original
    assert logits_process.ClassifierFreeGuidanceLogitsProcessor.__module__.startswith("transformers")
    assert utils.GenerationMixin.generate.__module__.startswith("transformers")
    second.undo()  # undoing twice is harmless


def test_two_threads_generate_under_the_patch(monkeypatch):
    # The guidance on the torch path: Triton's interpreter (a debugging aid) is not thread-safe.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = _tiny_gpt2()
    prompts = [torch.tensor([[5, 6, 7, 8]]), torch.tensor([[30, 31, 32]])]
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, guidance_scale=2.0)
    expected = [model.generate(p, **kw).tolist() for p in prompts]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(5):
                with cfg_triton.patch_transformers():
                    results.setdefault(i, []).append(model.generate(prompts[i], **kw).tolist())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(r == expected[i] for i in range(2) for r in results[i])
    from transformers.generation import utils

    assert utils.UnbatchedClassifierFreeGuidanceLogitsProcessor.__module__.startswith("transformers")


def test_musicgen_uses_the_fused_batched_processor(monkeypatch):
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

    torch.manual_seed(0)
    config = MusicgenDecoderConfig(vocab_size=64, max_position_embeddings=64, num_hidden_layers=1,
                                   ffn_dim=32, num_attention_heads=2, hidden_size=16, num_codebooks=2,
                                   pad_token_id=64, bos_token_id=64)
    model = MusicgenForCausalLM(config).eval()
    generation = model.generation_config
    generation.pad_token_id = generation.bos_token_id = generation.decoder_start_token_id = 64
    ids = torch.full((2, 1), 64)
    kw = dict(max_new_tokens=5, do_sample=False, guidance_scale=3.0, num_return_sequences=1)
    theirs = model.generate(ids, **kw)
    calls = []
    original = cfg_triton.CFGLogitsProcessor.__call__
    monkeypatch.setattr(cfg_triton.CFGLogitsProcessor, "__call__",
                        lambda self, i, s: calls.append(s.shape) or original(self, i, s))
    with cfg_triton.patch_transformers():
        ours = model.generate(ids, **kw)
    assert calls and ours.tolist() == theirs.tolist()


def test_unbatched_processor_takes_any_callable_and_3d_scores():
    model = _tiny_gpt2()
    ids = torch.tensor([[5, 6, 7, 8]])
    seen = []

    def callable_model(input_ids, attention_mask=None, use_cache=None, **kwargs):
        seen.append(sorted(kwargs))
        return model(input_ids, attention_mask=attention_mask, use_cache=use_cache, **kwargs)

    scores = model(ids).logits[:, -1:].detach()  # [B, 1, V]
    proc = cfg_triton.UnbatchedCFGLogitsProcessor(2.0, callable_model)
    out = proc(ids, scores)
    assert out.shape == scores.shape and seen
    from transformers.generation import logits_process as hf

    theirs = hf.UnbatchedClassifierFreeGuidanceLogitsProcessor(2.0, model)(ids, scores[:, 0])
    torch.testing.assert_close(out[:, 0], theirs, rtol=1e-5, atol=1e-4)


class _StopEverything(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return False


class _Stream(StoppingCriteria):
    def __init__(self, callback):
        self.callback = callback

    def __call__(self, input_ids, scores, **kwargs):
        self.callback(input_ids[0])
        return False


@pytest.mark.model
def test_text_generation_webui_call_shape(smollm2):
    """The call text-generation-webui's Transformers loader makes (inputs=, eos_token_id list,
    stopping criteria that stream through a callback, an explicit processor list, use_cache,
    repetition penalty, a negative prompt), under no_grad: the same tokens, paired forwards."""
    model, tok = smollm2
    ids = tok("Tell me about cats.", return_tensors="pt").input_ids
    streamed = []

    def params():
        return dict(inputs=ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                    temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.15, guidance_scale=1.5,
                    negative_prompt_ids=tok("Tell me about dogs.", return_tensors="pt").input_ids,
                    eos_token_id=[tok.eos_token_id], use_cache=True, logits_processor=LogitsProcessorList(),
                    stopping_criteria=StoppingCriteriaList([_StopEverything(),
                                                            _Stream(lambda out: streamed.append(len(out)))]))

    with torch.no_grad():
        theirs = model.generate(**params())
        streamed.clear()
        with cfg_triton.patch_transformers(), _CountRows(model) as count:
            ours = model.generate(**params())
    assert ours.tolist() == theirs.tolist()
    assert streamed == list(range(ids.shape[1] + 1, ids.shape[1] + NEW + 1))
    assert set(count.rows) == {2}


@pytest.mark.parametrize("negative", [False, True], ids=["last-token", "negative-prompt"])
def test_continuing_from_a_returned_cache_gives_transformers_continuation(negative):
    """The cache a paired call returns holds both branches, padded: a call continuing from it (or
    from any cache) re-reads its ids, and gives the tokens of transformers' own continuation."""
    model = _tiny_gpt2()
    ids = torch.tensor([[5, 6, 7, 8]])
    neg = torch.tensor([[20, 21, 22, 23, 24, 25]]) if negative else None
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, guidance_scale=2.0,
              negative_prompt_ids=neg)
    first = model.generate(ids, return_dict_in_generate=True, **kw)
    more = torch.cat([first.sequences, torch.tensor([[40]])], 1)
    theirs = model.generate(more, past_key_values=first.past_key_values, **kw)
    with cfg_triton.patch_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours_first = model.generate(ids, return_dict_in_generate=True, **kw)
        with _CountRows(model) as count:
            ours = model.generate(more, past_key_values=ours_first.past_key_values, **kw)
        # A fallback call (beam search) given the paired cache re-reads its ids too.
        beams = None if negative else model.generate(more, past_key_values=ours_first.past_key_values,
                                                     num_beams=2, **kw)
    assert ours_first.sequences.tolist() == first.sequences.tolist()
    assert ours.tolist() == theirs.tolist()
    assert count.rows[0] == 2  # paired, from the whole sequence
    # (transformers' own beam search does not expand a negative prompt: it fails there)
    assert negative or beams.tolist() == model.generate(more, num_beams=2, **kw).tolist()


def test_hidden_states_have_transformers_shapes_with_a_longer_negative_prompt():
    model = _tiny_gpt2()
    ids, neg = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[20, 21, 22, 23, 24, 25]])
    kw = dict(max_new_tokens=3, do_sample=False, guidance_scale=2.0, return_dict_in_generate=True,
              output_hidden_states=True)
    for negative in (neg, neg[:, :2]):  # longer: falls back with the warning; shorter: paired
        theirs = model.generate(ids, negative_prompt_ids=negative, **kw)
        with cfg_triton.patch_transformers(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = model.generate(ids, negative_prompt_ids=negative, **kw)
        assert ours.sequences.tolist() == theirs.sequences.tolist()
        for a, b in zip(ours.hidden_states, theirs.hidden_states):
            assert [t.shape for t in a] == [t.shape for t in b]
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_a_positional_generation_config_is_paired():
    from transformers import GenerationConfig

    model = _tiny_gpt2()
    ids = torch.tensor([[5, 6, 7, 8]])
    config = GenerationConfig(max_new_tokens=4, min_new_tokens=4, do_sample=False, guidance_scale=2.0)
    theirs = model.generate(ids, config)
    with cfg_triton.patch_transformers(), _CountRows(model) as count:
        ours = model.generate(ids, config)
    assert ours.tolist() == theirs.tolist()
    assert count.rows == [2] * 4


def test_fallback_prints_no_deprecation_warning(capfd, caplog):
    from transformers.utils import logging

    model = _tiny_gpt2()
    logging.warning_once.cache_clear()  # a once-only warning that an earlier test may have had
    with cfg_triton.patch_transformers(sequential=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, do_sample=False,
                       guidance_scale=2.0)
    assert "deprecated" not in capfd.readouterr().err + caplog.text


def test_paired_forwards_take_generates_matmul_route(monkeypatch):
    """Where few-row `F.linear` is slow (forced here on any CPU), the paired forwards run through the
    same narrow-product route as `cfg_triton.generate`: same tokens, every linear layer routed."""
    from cfg_triton import lm

    model = _tiny_gpt2()
    ids = torch.tensor([[5, 6, 7, 8]])
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, guidance_scale=2.0)
    theirs = model.generate(ids, **kw)
    monkeypatch.setenv("CFG_TRITON_NARROW_LINEAR", "1")
    lm.narrow_product_is_faster.cache_clear()
    routed = []
    original = lm._narrow_linear
    monkeypatch.setattr(lm, "_narrow_linear", lambda x, *a: routed.append(x.shape[0]) or original(x, *a))
    try:
        with cfg_triton.patch_transformers(), _CountRows(model) as count:
            ours = model.generate(ids, **kw)
    finally:
        lm.narrow_product_is_faster.cache_clear()
    assert ours.tolist() == theirs.tolist() and count.rows == [2] * 4
    assert routed and set(routed) == {2}


def test_several_prompts_with_their_own_negatives_and_return_sequences():
    """Each prompt's returned sequences are its own guided run with its own negative prompt."""
    model = _tiny_gpt2()
    ids, mask = torch.tensor([[0, 5, 6, 7], [9, 10, 11, 12]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    neg, neg_mask = torch.tensor([[20, 21, 22], [0, 0, 23]]), torch.tensor([[1, 1, 1], [0, 0, 1]])
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=True, top_k=1, guidance_scale=2.0)
    with cfg_triton.patch_transformers():
        out = model.generate(ids, attention_mask=mask, negative_prompt_ids=neg,
                             negative_prompt_attention_mask=neg_mask, num_return_sequences=2, **kw)
        solo = [model.generate(ids[i:i + 1, mask[i].argmax():],
                               negative_prompt_ids=neg[i:i + 1, neg_mask[i].argmax():], **kw)
                for i in range(2)]
    for i in range(2):
        for copy in range(2):
            assert out[2 * i + copy, -5:].tolist() == solo[i][0, -5:].tolist()


def test_top_k_sampling_stays_paired():
    model = _tiny_gpt2()
    ids = torch.tensor([[5, 6, 7, 8]])
    with cfg_triton.patch_transformers(), _CountRows(model) as count, warnings.catch_warnings():
        warnings.filterwarnings("error", message="cfg_triton")  # no fallback warning
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=True, top_k=5,
                       guidance_scale=2.0)
    assert count.rows == [2] * 4
