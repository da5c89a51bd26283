"""`cfg_triton.score`: batched, bounded guided scoring against one unpadded float64 pass per example."""
import pytest
import torch

from cfg_triton import reference
from cfg_triton.scoring import encode_pair, score, score_tokens


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch):
    # Whole-model scoring runs the CPU torch path; the interpreted kernels are test_logprobs.py's.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _examples(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    contexts = [torch.randint(1, 512, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen).tolist()
                for _ in range(n)]
    conts = [torch.randint(1, 512, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()
             for _ in range(n)]
    return contexts, conts


def _one_by_one(model, contexts, conts, negatives=None, gamma=1.5, **kw):
    """Each example alone, unpadded, combined in float64 by the reference."""
    sums, greedy = [], []
    for i, (ctx, cont) in enumerate(zip(contexts, conts)):
        neg = [ctx[-1]] if negatives is None else negatives[i]
        with torch.no_grad():
            c = model(torch.tensor([ctx + cont[:-1]])).logits[0, -len(cont):].double()
            u = model(torch.tensor([neg + cont[:-1]])).logits[0, -len(cont):].double()
        guided = reference.guidance(c, u, gamma, **kw)
        t = torch.tensor(cont)
        sums.append(guided.gather(1, t[:, None]).sum().item())
        greedy.append(bool((guided.argmax(-1) == t).all()))
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(greedy)


@pytest.mark.parametrize("kw", [{}, dict(mix=0.7), dict(normalize=False)], ids=["normalized", "mix", "raw"])
def test_matches_one_pass_per_example(tiny_llama, kw):
    contexts, conts = _examples(12)
    got = score_tokens(tiny_llama, contexts, conts, guidance_scale=1.5, batch_size=5, **kw)
    want_lp, want_greedy = _one_by_one(tiny_llama, contexts, conts, **kw)
    # The model runs in float32 on padded batches: its logits move by float32 rounding.
    torch.testing.assert_close(got.logprobs, want_lp, rtol=1e-4, atol=1e-3)
    assert torch.equal(got.greedy, want_greedy)


def test_batching_does_not_change_results(tiny_llama):
    contexts, conts = _examples(9, seed=1)
    one = score_tokens(tiny_llama, contexts, conts, batch_size=1)
    tight = score_tokens(tiny_llama, contexts, conts, batch_size=16, max_batch_tokens=50)
    loose = score_tokens(tiny_llama, contexts, conts, batch_size=16)
    for other in (tight, loose):
        torch.testing.assert_close(other.logprobs, one.logprobs, rtol=1e-4, atol=1e-3)
        assert torch.equal(other.greedy, one.greedy)


def test_negative_contexts_and_bos(tiny_llama, monkeypatch):
    contexts, conts = _examples(4, seed=2)
    negatives = [[5, 6, 7], [8], [], [9, 10]]
    monkeypatch.setattr(tiny_llama.config, "bos_token_id", 1)
    got = score_tokens(tiny_llama, contexts, conts, negatives=negatives, guidance_scale=2.0)
    want_lp, want_greedy = _one_by_one(tiny_llama, contexts, conts,
                                       negatives=[n or [1] for n in negatives], gamma=2.0)
    torch.testing.assert_close(got.logprobs, want_lp, rtol=1e-4, atol=1e-3)
    assert torch.equal(got.greedy, want_greedy)


def test_unguided_is_the_conditional_log_likelihood(tiny_llama):
    contexts, conts = _examples(5, seed=3)
    got = score_tokens(tiny_llama, contexts, conts, guidance_scale=1.0)
    for i, (ctx, cont) in enumerate(zip(contexts, conts)):
        with torch.no_grad():
            lp = tiny_llama(torch.tensor([ctx + cont[:-1]])).logits[0, -len(cont):].double().log_softmax(-1)
        t = torch.tensor(cont)
        assert got.logprobs[i].item() == pytest.approx(lp.gather(1, t[:, None]).sum().item(), abs=1e-3)
        assert bool(got.greedy[i]) == bool((lp.argmax(-1) == t).all())


def test_truncation_against_an_independent_reference(tiny_llama):
    """Inputs longer than max_length keep their last max_length tokens in both branches: compared
    with each example cut by hand and scored unpadded in float64."""
    length = 64
    contexts = [list(range(1, 300)), list(range(40, 90)), [5, 6, 7]]
    conts = [[7, 8, 9], [11, 12], list(range(100, 150))]
    negatives = [list(range(200, 400)), [3], list(range(300, 380))]
    got = score_tokens(tiny_llama, contexts, conts, negatives=negatives, guidance_scale=2.0,
                       max_length=length)
    # What the model may see: the last `length` tokens of the input that predicts the continuation.
    cut = [(ctx + cont)[-(length + 1):-len(cont)] for ctx, cont in zip(contexts, conts)]
    cut_neg = [(neg + cont)[-(length + 1):-len(cont)] for neg, cont in zip(negatives, conts)]
    assert all(len(c) + len(t) - 1 <= length for c, t in zip(cut, conts))
    want_lp, want_greedy = _one_by_one(tiny_llama, cut, conts, negatives=cut_neg, gamma=2.0)
    torch.testing.assert_close(got.logprobs, want_lp, rtol=1e-4, atol=1e-3)
    assert torch.equal(got.greedy, want_greedy)


def test_long_inputs_keep_their_last_tokens(tiny_llama):
    ctx, cont = list(range(1, 300)), [7, 8, 9]
    got = score_tokens(tiny_llama, [ctx], [cont], max_length=64)
    trimmed = score_tokens(tiny_llama, [(ctx + cont)[-65:-len(cont)]], [cont], max_length=64)
    torch.testing.assert_close(got.logprobs, trimmed.logprobs, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="longer than max_length"):
        score_tokens(tiny_llama, [ctx], [list(range(1, 70))], max_length=64)


def test_batches_respect_the_token_budget(tiny_llama, monkeypatch):
    import cfg_triton.scoring as scoring

    seen = []
    real = scoring._last_logits

    def spy(model, rows, keep, device):
        seen.append(len(rows) * max(len(r) for r in rows))
        return real(model, rows, keep, device)

    monkeypatch.setattr(scoring, "_last_logits", spy)
    contexts, conts = _examples(20, seed=4)
    progress = []
    score_tokens(tiny_llama, contexts, conts, batch_size=8, max_batch_tokens=100, progress=progress.append)
    assert sum(progress) == 20
    assert max(seen) <= 100  # every input here is shorter than the budget, so no batch exceeds it
    assert len(seen) > 2 * 3  # and it cut batches below the 3 + 3 calls of batch_size 8 alone


@pytest.mark.parametrize("contexts, conts, match", [
    ([[1, 2]], [[]], "empty continuation"),
    ([[]], [[3]], "empty context"),
    ([[1]], [[2], [3]], "1 contexts but 2 continuations"),
])
def test_bad_examples_are_refused(tiny_llama, contexts, conts, match):
    with pytest.raises(ValueError, match=match):
        score_tokens(tiny_llama, contexts, conts)


def test_encode_pair_moves_trailing_space(smollm2):
    _, tok = smollm2
    head, tail = encode_pair(tok, "The cat sat on the ", "mat")
    assert head == tok.encode("The cat sat on the", add_special_tokens=False)
    assert head + tail == tok.encode("The cat sat on the mat", add_special_tokens=False)
    assert tok.decode(tail) == " mat"


def test_score_strings(smollm2):
    model, tok = smollm2
    contexts = ["The capital of France is", "One, two, three, four,"]
    conts = [" Paris", " five"]
    got = score(model, tok, contexts, conts, guidance_scale=1.5)
    pairs = [encode_pair(tok, c, x) for c, x in zip(contexts, conts)]
    direct = score_tokens(model, [p[0] for p in pairs], [p[1] for p in pairs], guidance_scale=1.5)
    assert torch.equal(got.logprobs, direct.logprobs) and got.greedy.all()
    with pytest.raises(TypeError, match="sequences of strings"):
        score(model, tok, "one string", " x")


def test_score_tokens_is_exported():
    import cfg_triton

    assert cfg_triton.score_tokens is score_tokens and "score_tokens" in cfg_triton.__all__
