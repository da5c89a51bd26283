"""`cfg_triton.generate` on the bundled SmolLM2 against transformers and literal loops."""
import pytest
import torch

import cfg_triton
from cfg_triton import reference, rng

pytestmark = pytest.mark.model

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the moon.",
    "def fibonacci(n):",
]
NEGATIVES = ["Answer in French.", "Something sad happened today,", "# a comment"]
NEW = 12


def _ids(tok, text):
    return tok(text, return_tensors="pt").input_ids


def _padded(tok, texts, side="left"):
    rows = [_ids(tok, t)[0] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id or 0)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols] = r
        mask[i, cols] = 1
    return ids, mask


def _left_padded(tok, texts):
    return _padded(tok, texts, "left")


@pytest.mark.parametrize("mode, negative, path", [
    # The default run: the torch path (what a CPU runs) on one prompt.
    ("batched", True, "torch"),
    # Every combination through the interpreted kernels on every prompt.
    *[pytest.param(mode, negative, "interpreter", marks=pytest.mark.slow)
      for mode in ("batched", "sequential") for negative in (False, True)],
], ids=lambda v: {True: "negative-prompt", False: "last-token"}.get(v, v) if isinstance(v, bool) else v)
def test_greedy_matches_transformers(smollm2, mode, negative, path, monkeypatch):
    model, tok = smollm2
    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "interpreter" else "0")
    for i, prompt in enumerate(PROMPTS if path == "interpreter" else PROMPTS[:1]):
        ids = _ids(tok, prompt)
        neg = _ids(tok, NEGATIVES[i]) if negative else None
        theirs = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                guidance_scale=1.5, negative_prompt_ids=neg)
        ours = cfg_triton.generate(model, ids, negative_input_ids=neg, guidance_scale=1.5, mode=mode,
                                   max_new_tokens=NEW, min_new_tokens=NEW)
        assert ours.tolist() == theirs.tolist(), prompt


@pytest.mark.slow
def test_greedy_matches_transformers_on_gemma3(gemma3):
    """A second architecture and the largest vocabulary (262,144), with a negative prompt."""
    model, tok = gemma3
    ids, neg = _ids(tok, "The ocean is"), _ids(tok, "The desert is")
    theirs = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, guidance_scale=2.0,
                            negative_prompt_ids=neg)
    for mode in ("batched", "sequential"):
        ours = cfg_triton.generate(model, ids, negative_input_ids=neg, guidance_scale=2.0, mode=mode,
                                   max_new_tokens=6, min_new_tokens=6)
        assert ours.tolist() == theirs.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_padded_batch_gives_each_rows_solo_output(smollm2, mode):
    model, tok = smollm2
    ids, mask = _left_padded(tok, PROMPTS)
    neg, neg_mask = _left_padded(tok, NEGATIVES)
    batch = cfg_triton.generate(model, ids, mask, negative_input_ids=neg, negative_attention_mask=neg_mask,
                                guidance_scale=2.0, mode=mode, max_new_tokens=NEW, min_new_tokens=NEW)
    for i, prompt in enumerate(PROMPTS):
        solo = cfg_triton.generate(model, _ids(tok, prompt), negative_input_ids=_ids(tok, NEGATIVES[i]),
                                   guidance_scale=2.0, max_new_tokens=NEW, min_new_tokens=NEW)
        assert batch[i, -NEW:].tolist() == solo[0, -NEW:].tolist(), prompt
        assert batch[i, : ids.shape[1]].tolist() == ids[i].tolist()


@pytest.mark.slow
def test_interpolated_matches_full_recompute_loop(smollm2):
    """The original proposal, literally: recompute both branches from scratch every step, combine in
    float64 with the reference, take the argmax."""
    model, tok = smollm2
    ids, neg = _ids(tok, PROMPTS[1]), _ids(tok, NEGATIVES[1])
    cond_seq, uncond_seq = ids, neg
    with torch.no_grad():
        for _ in range(NEW):
            c = model(cond_seq).logits[:, -1].double()
            u = model(uncond_seq).logits[:, -1].double()
            guided = reference.interpolated_cfg(c, u, 3.0, 0.7)
            guided[:, model.generation_config.eos_token_id] = float("-inf")  # min_new_tokens below
            token = guided.argmax(-1, keepdim=True)
            cond_seq, uncond_seq = torch.cat([cond_seq, token], 1), torch.cat([uncond_seq, token], 1)
    for mode in ("batched", "sequential"):
        ours = cfg_triton.generate(model, ids, negative_input_ids=neg, guidance_scale=3.0, mix=0.7,
                                   mode=mode, max_new_tokens=NEW, min_new_tokens=NEW)
        assert ours.tolist() == cond_seq.tolist()


@pytest.mark.slow
def test_eos_stops_rows_and_pads_them(smollm2):
    model, tok = smollm2
    ids, mask = _left_padded(tok, PROMPTS[:2])
    free = cfg_triton.generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=[])  # never stops
    new = free[:, ids.shape[1]:]
    # The first token row 0 says for the first time from step 2 on becomes the end of sequence.
    k = next(j for j in range(2, NEW - 1) if int(new[0, j]) not in new[0, :j].tolist())
    eos = int(new[0, k])
    out = cfg_triton.generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=-1)
    got = out[:, ids.shape[1]:]
    assert 0 < got.shape[1] < NEW  # every row stopped early, so generation did
    for row in range(2):
        hits = (new[row] == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else NEW
        assert got[row, :stop].tolist() == new[row, : min(stop, got.shape[1])].tolist()
        assert set(got[row, stop:].tolist()) <= {-1}
    # min_new_tokens holds EOS back
    held = cfg_triton.generate(model, ids[:1], mask[:1], max_new_tokens=k + 3, min_new_tokens=k + 3,
                               eos_token_id=eos)
    assert eos not in held[0, ids.shape[1]:].tolist() and held.shape[1] == ids.shape[1] + k + 3


def test_eos_and_pad_default_to_generation_config(smollm2):
    model, tok = smollm2
    ids = _ids(tok, "Say hi.")
    out = cfg_triton.generate(model, ids, max_new_tokens=200)
    assert out.shape[1] < ids.shape[1] + 200  # the instruct model ends its answer
    assert out[0, -1].item() == model.generation_config.eos_token_id


def test_sampling_is_reproducible_and_top_k_one_is_greedy(smollm2, monkeypatch):
    # Semantics of the loop, the same on either path: the torch path, as CPU users run it (the
    # interpreted kernels draw its tokens: test_sampling.py; the literal loop below runs them).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model, tok = smollm2
    ids = _ids(tok, PROMPTS[0])
    kw = dict(do_sample=True, temperature=0.8, top_p=0.9, max_new_tokens=8, min_new_tokens=8)
    a = cfg_triton.generate(model, ids, generator=torch.Generator().manual_seed(1), **kw)
    b = cfg_triton.generate(model, ids, generator=torch.Generator().manual_seed(1), **kw)
    assert a.tolist() == b.tolist()
    greedy = cfg_triton.generate(model, ids, max_new_tokens=8, min_new_tokens=8)
    top1 = cfg_triton.generate(model, ids, do_sample=True, top_k=1, max_new_tokens=8, min_new_tokens=8,
                               generator=torch.Generator().manual_seed(3))
    assert top1.tolist() == greedy.tolist()


def test_streamer_protocol(smollm2):
    model, tok = smollm2
    ids = _ids(tok, PROMPTS[0])

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    rec = Recorder()
    out = cfg_triton.generate(model, ids, max_new_tokens=5, min_new_tokens=5, streamer=rec)
    assert rec.ended and rec.puts[0] == ids.tolist()
    assert [p[0] for p in rec.puts[1:]] == out[0, ids.shape[1]:].tolist()


def test_the_model_is_never_patched(smollm2):
    model, tok = smollm2
    cfg_triton.generate(model, _ids(tok, "Hi"), max_new_tokens=2)
    assert not any("forward" in vars(m) for m in model.modules())


def test_bad_arguments(smollm2):
    model, tok = smollm2
    ids = _ids(tok, "Hi")
    with pytest.raises(ValueError, match="mode"):
        cfg_triton.generate(model, ids, mode="parallel")
    with pytest.raises(ValueError, match="one row per prompt"):
        cfg_triton.generate(model, ids, negative_input_ids=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        cfg_triton.generate(model, ids[0])


def _right_padded(tok, texts):
    return _padded(tok, texts, "right")


@pytest.mark.slow
def test_right_padded_batch_gives_each_rows_solo_output(smollm2):
    """The tokenizer's default (right) padding with its mask: each row still computes what it would
    alone, in both branches."""
    model, tok = smollm2
    texts = PROMPTS + ["Hi"]
    ids, mask = _right_padded(tok, texts)
    neg, neg_mask = _right_padded(tok, NEGATIVES + ["No"])
    out = cfg_triton.generate(model, ids, mask, negative_input_ids=neg, negative_attention_mask=neg_mask,
                              max_new_tokens=6, min_new_tokens=6)
    for i, text in enumerate(texts):
        solo = cfg_triton.generate(model, _ids(tok, text), negative_input_ids=_ids(tok, (NEGATIVES + ["No"])[i]),
                                   max_new_tokens=6, min_new_tokens=6)
        assert out[i, -6:].tolist() == solo[0, -6:].tolist(), text


def test_padding_without_a_mask_warns(tiny_llama):
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])  # pad id 0 at the end of row 1
    with pytest.warns(UserWarning, match="attention mask"):
        cfg_triton.generate(tiny_llama, ids, max_new_tokens=1)


def test_concurrent_generation_on_one_model(tiny_llama, monkeypatch):
    """Two threads generating on one model, with thread switches forced often: identical outputs,
    no error, the model untouched, and a third thread's forwards never routed through the CPU
    matmul path that `generate` enables for its own thread."""
    import sys
    import threading

    from cfg_triton import lm

    ids, neg = torch.randint(1, 512, (1, 6)), torch.randint(1, 512, (1, 3))
    kw = dict(negative_input_ids=neg, guidance_scale=2.0, max_new_tokens=8, min_new_tokens=8)
    monkeypatch.setenv("CFG_TRITON_NARROW_LINEAR", "1")  # route on any CPU, to test the routing
    # The guidance on the torch path: Triton's interpreter (a debugging aid) is not thread-safe.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    lm.narrow_product_is_faster.cache_clear()
    expected_out = cfg_triton.generate(tiny_llama, ids, **kw).tolist()
    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    routed, errors, outputs = set(), [], []
    original = lm._narrow_linear
    monkeypatch.setattr(lm, "_narrow_linear",
                        lambda *a: routed.add(threading.get_ident()) or original(*a))

    def generating():
        try:
            for _ in range(15):
                outputs.append(cfg_triton.generate(tiny_llama, ids, **kw).tolist())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def plain_forwards():
        with torch.no_grad():
            for _ in range(40):
                tiny_llama(ids)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        workers = [threading.Thread(target=generating) for _ in range(2)]
        bystander = threading.Thread(target=plain_forwards)
        for t in [*workers, bystander]:
            t.start()
        for t in [*workers, bystander]:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    assert len(outputs) == 30 and all(o == expected_out for o in outputs)
    assert routed and bystander.ident not in routed
    assert routed <= {w.ident for w in workers}
    assert not any("forward" in vars(m) for m in tiny_llama.modules())
    assert all(torch.equal(v, state[k]) for k, v in tiny_llama.state_dict().items())
    lm.narrow_product_is_faster.cache_clear()


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_empty_negative_prompt_conditions_on_bos(tiny_llama, mode):
    """An empty negative prompt is the paper's empty prompt: the BOS token alone, in both modes,
    also for single rows whose negative mask is all zero."""
    ids = torch.randint(2, 512, (2, 5))
    bos = tiny_llama.config.bos_token_id
    kw = dict(guidance_scale=2.0, max_new_tokens=5, min_new_tokens=5, mode=mode)
    as_bos = cfg_triton.generate(tiny_llama, ids, negative_input_ids=torch.full((2, 1), bos), **kw)
    empty = cfg_triton.generate(tiny_llama, ids, negative_input_ids=torch.empty(2, 0, dtype=torch.long),
                                **kw)
    assert empty.tolist() == as_bos.tolist()
    neg = torch.randint(2, 512, (2, 3))
    neg_mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    mixed = cfg_triton.generate(tiny_llama, ids, negative_input_ids=neg, negative_attention_mask=neg_mask,
                                **kw)
    row0 = cfg_triton.generate(tiny_llama, ids[:1], negative_input_ids=neg[:1], **kw)
    assert mixed[0].tolist() == row0[0].tolist() and mixed[1].tolist() == as_bos[1].tolist()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]])), ValueError, "row without tokens"),
    (dict(do_sample=True, temperature=1e-45), ValueError, "temperature"),
    (dict(do_sample=True, temperature=float("nan")), ValueError, "temperature"),
    (dict(do_sample=True, top_k=2.5), ValueError, "top_k"),
    (dict(do_sample=True, top_p=0.0), ValueError, "top_p"),
    (dict(do_sample=True, min_p=1.5), ValueError, "min_p"),
    (dict(max_new_tokens=None), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=4.0), ValueError, "max_new_tokens"),
    (dict(attention_mask=torch.ones(2, 4, dtype=torch.long)), ValueError, "shape"),
    (dict(negative_attention_mask=torch.ones(2, 3, dtype=torch.long)), ValueError,
     "without negative_input_ids"),
    (dict(input_ids=[[1, 2, 3], [4, 5, 6]]), TypeError, "torch.Tensor"),
    (dict(input_ids=torch.ones(2, 3)), TypeError, "integer"),
])
def test_bad_arguments_fail_before_any_model_work(tiny_llama, kwargs, error, match):
    calls = []
    hook = tiny_llama.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        kwargs = {"input_ids": torch.ones(2, 3, dtype=torch.long), **kwargs}
        with pytest.raises(error, match=match):
            cfg_triton.generate(tiny_llama, **kwargs)
    finally:
        hook.remove()
    assert not calls


@pytest.mark.slow
def test_scale_one_is_plain_decoding_with_one_branch(smollm2):
    model, tok = smollm2
    ids, mask = _left_padded(tok, PROMPTS)
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                            do_sample=False)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        ours = cfg_triton.generate(model, ids, mask, guidance_scale=1.0, max_new_tokens=NEW,
                                   min_new_tokens=NEW)
    finally:
        hook.remove()
    assert ours.tolist() == theirs.tolist()
    assert set(calls) == {len(PROMPTS)}  # never a [2B] batch
    with pytest.warns(UserWarning, match="not used"):
        cfg_triton.generate(model, ids[:1], guidance_scale=1, negative_input_ids=ids[:1], max_new_tokens=1)


@pytest.mark.slow
def test_sampling_equals_a_literal_loop_at_the_same_seed(smollm2):
    """do_sample with temperature, top-k, top-p and min-p: the same draws as a literal loop that
    applies transformers' warpers to the float64 reference and takes the Gumbel-max with the noise
    of `cfg_triton.rng` keyed by (seed, row, step)."""
    from transformers.generation import logits_process as hf

    model, tok = smollm2
    ids, neg = _ids(tok, PROMPTS[0]), _ids(tok, NEGATIVES[0])
    warpers = [hf.TemperatureLogitsWarper(0.7), hf.TopKLogitsWarper(40), hf.TopPLogitsWarper(0.8),
               hf.MinPLogitsWarper(0.05)]
    cond_seq, uncond_seq = ids, neg
    with torch.no_grad():
        for step in range(NEW):
            c = model(cond_seq).logits[:, -1].double()
            u = model(uncond_seq).logits[:, -1].double()
            scores = reference.normalized_cfg(c, u, 1.5)
            scores[:, model.generation_config.eos_token_id] = float("-inf")
            for warp in warpers:
                scores = warp(cond_seq, scores)
            noise = rng.gumbel(rng.row_keys(torch.tensor([5]), torch.tensor([step])), scores.shape[1]) * rng.LN2
            token = (scores + noise.double()).argmax(-1, keepdim=True)
            cond_seq, uncond_seq = torch.cat([cond_seq, token], 1), torch.cat([uncond_seq, token], 1)
    ours = cfg_triton.generate(model, ids, negative_input_ids=neg, guidance_scale=1.5, do_sample=True,
                               temperature=0.7, top_k=40, top_p=0.8, min_p=0.05, max_new_tokens=NEW,
                               min_new_tokens=NEW, seed=5)
    assert ours.tolist() == cond_seq.tolist()


def test_seed_reproduces_sampling_and_generator_still_works(tiny_llama):
    ids = torch.randint(2, 512, (2, 5))
    kw = dict(do_sample=True, temperature=3.0, max_new_tokens=6, min_new_tokens=6)
    a = cfg_triton.generate(tiny_llama, ids, seed=11, **kw)
    assert a.tolist() == cfg_triton.generate(tiny_llama, ids, seed=11, **kw).tolist()
    assert a.tolist() != cfg_triton.generate(tiny_llama, ids, seed=12, **kw).tolist()
    g1 = cfg_triton.generate(tiny_llama, ids, generator=torch.Generator().manual_seed(4), **kw)
    g2 = cfg_triton.generate(tiny_llama, ids, generator=torch.Generator().manual_seed(4), **kw)
    assert g1.tolist() == g2.tolist()
    with pytest.raises(TypeError, match="seed"):
        cfg_triton.generate(tiny_llama, ids, seed=1.5, **kw)


def test_temperature_reaches_the_draw(tiny_llama):
    ids = torch.randint(2, 512, (2, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(do_sample=True, max_new_tokens=8, min_new_tokens=8, seed=3)
    cold = cfg_triton.generate(tiny_llama, ids, temperature=1e-4, **kw)
    assert cold.tolist() == cfg_triton.generate(tiny_llama, ids, max_new_tokens=8, min_new_tokens=8).tolist()
    assert cfg_triton.generate(tiny_llama, ids, temperature=50.0, **kw).tolist() != cold.tolist()


def test_eos_is_allowed_exactly_at_step_min_new_tokens(tiny_llama):
    """Pick as EOS the token the model emits at step k: with min_new_tokens = k it must still end
    there, with min_new_tokens = k + 1 it must not."""
    ids = torch.randint(2, 512, (1, 6))
    free = cfg_triton.generate(tiny_llama, ids, max_new_tokens=8, eos_token_id=[])[0, 6:].tolist()
    k = next(j for j in range(1, 8) if free[j] not in free[:j])
    ended = cfg_triton.generate(tiny_llama, ids, max_new_tokens=8, min_new_tokens=k, eos_token_id=free[k])
    assert ended[0, 6:].tolist() == free[: k + 1]
    held = cfg_triton.generate(tiny_llama, ids, max_new_tokens=8, min_new_tokens=k + 1,
                               eos_token_id=free[k])
    assert free[k] not in held[0, 6 : 6 + k + 1].tolist()
