"""`cfg_triton.generate` on the bundled SmolLM2 against transformers and literal loops."""
import pytest
import torch

import cfg_triton
from cfg_triton import reference

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


def _left_padded(tok, texts):
    rows = [_ids(tok, t)[0] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id or 0)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("mode", ["batched", "sequential"])
@pytest.mark.parametrize("negative", [False, True], ids=["last-token", "negative-prompt"])
def test_greedy_matches_transformers(smollm2, mode, negative):
    model, tok = smollm2
    for i, prompt in enumerate(PROMPTS):
        ids = _ids(tok, prompt)
        neg = _ids(tok, NEGATIVES[i]) if negative else None
        theirs = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                guidance_scale=1.5, negative_prompt_ids=neg)
        ours = cfg_triton.generate(model, ids, negative_input_ids=neg, guidance_scale=1.5, mode=mode,
                                   max_new_tokens=NEW, min_new_tokens=NEW)
        assert ours.tolist() == theirs.tolist(), prompt


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


def test_sampling_is_reproducible_and_top_k_one_is_greedy(smollm2):
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


def test_linear_layers_are_restored(smollm2):
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
