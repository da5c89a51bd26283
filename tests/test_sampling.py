"""`cfg_triton.sample`: greedy against the float64 argmax, draws against exact float64 probabilities
(transformers' own warpers applied to the reference scores), and one token per seed on every path
and split count."""
import pytest
import torch
from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import cfg_triton
from cfg_triton import rng

from helpers import DTYPES, NEG_INF, expected, logits

SEMANTICS = {"raw": dict(normalize=False), "normalized": {}, "interpolated": dict(mix=0.7)}


@pytest.mark.parametrize("shape", [(1, 70_000), (3, 4_099), (64, 2_049), (5, 1)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("semantics", SEMANTICS)
def test_greedy_is_the_argmax(backend, semantics, dtype, shape):
    cond, uncond = logits(*shape, dtype), logits(*shape, dtype)
    cond[0, : shape[1] // 2] = NEG_INF
    uncond[-1, 1:7] = NEG_INF
    kw = SEMANTICS[semantics]
    tokens = cfg_triton.sample(cond, uncond, 1.5, temperature=0, **kw)
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, expected(cond, uncond, 1.5, **kw).argmax(-1))


def _paths(monkeypatch, *args, **kw):
    """The same call on the torch path and in the interpreter."""
    out = {}
    for path in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", path)
        out[path] = cfg_triton.sample(*args, return_logprobs=True, **kw)
    return out["0"], out["1"]


KERNEL_FILTERS = {"none": {}, "min_p": dict(min_p=0.05), "top_k": dict(top_k=20),
                  "top_p": dict(top_p=0.8),
                  "all": dict(top_k=torch.tensor([0, 3, 50, 1, 0, 200, 7, 40]), top_p=0.9, min_p=0.02)}


@pytest.mark.skipif(not cfg_triton.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("semantics, filters", [("normalized", f) for f in KERNEL_FILTERS]
                         + [("raw", "all"), ("interpolated", "all")])
def test_kernels_draw_the_torch_paths_tokens(monkeypatch, semantics, filters):
    cond, uncond = logits(8, 2_001), logits(8, 2_001)
    cond[0, :100] = NEG_INF
    uncond[1, 5:50] = NEG_INF  # masked only in uncond: drawn at their conditional score
    cond[1, 5:50] += 8
    kw = dict(SEMANTICS[semantics], **KERNEL_FILTERS[filters])
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3, 2.0, 0.3, 1.0, 1.0])
    for seed in (0, 7919):
        torch_path, kernels = _paths(monkeypatch, cond, uncond, torch.linspace(0, 3, 8),
                                     temperature=temperature, seed=torch.arange(8) + seed, step=11, **kw)
        assert torch.equal(kernels.tokens, torch_path.tokens)
        torch.testing.assert_close(kernels.logprobs, torch_path.logprobs.float(), rtol=1e-4, atol=1e-4)
        assert not cond[torch.arange(8), kernels.tokens].isneginf().any()


@pytest.mark.skipif(not cfg_triton.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("filters", ["none", "min_p", "all"])
def test_same_token_for_every_split_count(monkeypatch, filters):
    import cfg_triton.sampling as sampling

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    vocab = 8_192
    cond, uncond = logits(2, vocab), logits(2, vocab)
    uncond[0, ::97] = NEG_INF
    kw = {k: v[:2] if isinstance(v, torch.Tensor) else v for k, v in KERNEL_FILTERS[filters].items()}
    drawn = {}
    for splits in (1, 2, 7, 64):
        split_len = -(-vocab // splits)
        monkeypatch.setattr(sampling._guidance_kernels, "plan",
                            lambda b, v, sms, n=splits, length=split_len: (n, length))
        drawn[splits] = cfg_triton.sample(cond, uncond, 2.0, mix=0.5, temperature=1.0, seed=5,
                                          step=torch.tensor([3, 4]), return_logprobs=True, **kw)
    for d in drawn.values():
        assert torch.equal(d.tokens, drawn[1].tokens), drawn
        torch.testing.assert_close(d.logprobs, drawn[1].logprobs, rtol=1e-5, atol=1e-5)


def _exact_probs(cond, uncond, gamma, temperature, top_k, top_p, min_p, **kw):
    """float64 probabilities: the reference scores through transformers' warpers, in its order."""
    scores = expected(cond, uncond, gamma, **kw)
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p is not None:
        warpers.append(MinPLogitsWarper(min_p))
    for warp in warpers:
        scores = warp(None, scores)
    return scores.softmax(-1)


DRAWS = 1_000_000
FILTERS = {"none": {}, "top_k": dict(top_k=5), "top_p": dict(top_p=0.8), "min_p": dict(min_p=0.1),
           "all": dict(top_k=12, top_p=0.9, min_p=0.02)}


@pytest.mark.parametrize("mix", [None, 0.7], ids=["normalized", "interpolated"])
@pytest.mark.parametrize("name", FILTERS)
def test_draw_frequencies_match_exact_probabilities(monkeypatch, name, mix):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    vocab, rows = 40, 5_000
    cond, uncond = logits(1, vocab, scale=2.0), logits(1, vocab, scale=2.0)
    cond[0, 3] = NEG_INF
    kw = {} if mix is None else dict(mix=mix)
    probs = _exact_probs(cond, uncond, 1.5, 0.9, **{**dict(top_k=None, top_p=None, min_p=None),
                                                    **FILTERS[name]}, **kw)[0]
    counts = torch.zeros(vocab, dtype=torch.float64)
    c, u = cond.expand(rows, vocab), uncond.expand(rows, vocab)
    for step in range(DRAWS // rows):
        tokens = cfg_triton.sample(c, u, 1.5, temperature=0.9, seed=1234, step=step, **FILTERS[name], **kw)
        counts += torch.bincount(tokens, minlength=vocab)
    assert counts.sum() == DRAWS
    assert not counts[probs == 0].any(), "a token outside the filter's support was drawn"
    # Each count is binomial(n, p): six standard deviations (plus a count for rounding) bound all
    # 40 tokens of the 10 cases together with a false-alarm chance below 1e-6.
    sigma = (DRAWS * probs * (1 - probs)).sqrt()
    assert ((counts - DRAWS * probs).abs() <= 6 * sigma + 1).all(), (counts / DRAWS - probs).abs().max()


def test_per_row_parameters_draw_each_rows_distribution(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    vocab, reps = 30, 50_000
    base_c, base_u = logits(2, vocab, scale=2.0), logits(2, vocab, scale=2.0)
    params = dict(temperature=torch.tensor([0.7, 1.4]), top_k=torch.tensor([4, 0]),
                  top_p=torch.tensor([1.0, 0.85]), min_p=torch.tensor([0.0, 0.05]))
    gamma, mix = torch.tensor([1.5, 3.0]), torch.tensor([0.7, 0.3])
    c, u = base_c.repeat(reps, 1), base_u.repeat(reps, 1)
    counts = torch.zeros(2, vocab, dtype=torch.float64)
    for step in range(20):  # 1e6 draws per row
        tokens = cfg_triton.sample(c, u, gamma.repeat(reps), mix=mix.repeat(reps), seed=99, step=step,
                                   **{k: v.repeat(reps) for k, v in params.items()})
        for r in range(2):
            counts[r] += torch.bincount(tokens[r::2], minlength=vocab)
    for r, kw in enumerate([dict(top_k=4, top_p=None, min_p=None), dict(top_k=None, top_p=0.85, min_p=0.05)]):
        probs = _exact_probs(base_c[r:r + 1], base_u[r:r + 1], gamma[r].item(),
                             params["temperature"][r].item(), mix=mix[r].item(), **kw)[0]
        n = counts[r].sum()
        assert not counts[r][probs == 0].any()
        assert ((counts[r] - n * probs).abs() <= 6 * (n * probs * (1 - probs)).sqrt() + 1).all()


PREFIX_CASES = {
    # per-row temperature and top-p: kept sets from a few tokens to thousands
    "top_p": dict(temperature=torch.tensor([0.3, 0.8, 1.0, 2.5, 4.0, 0.0, 1.0, 6.0]),
                  top_p=torch.tensor([0.9, 0.5, 0.99, 0.9, 0.95, 0.9, 1.0, 0.999])),
    # k above the first ranking, k off in some rows (top-p over every live token there)
    "top_k": dict(temperature=1.5, top_k=torch.tensor([300, 0, 1, 5_000, 256, 256, 0, 1_000]),
                  top_p=torch.tensor([0.97, 0.97, 0.97, 0.97, 0.05, 0.97, 0.97, 0.97])),
    "min_p": dict(temperature=torch.tensor([0.5, 1.0, 3.0, 8.0, 1.0, 0.7, 2.0, 5.0]),
                  min_p=torch.tensor([0.2, 0.01, 0.001, 0.05, 0.0, 0.5, 1e-4, 0.3])),
}


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("case", PREFIX_CASES)
def test_ranking_prefix_draws_as_the_whole_ranking(monkeypatch, case, ties):
    """The torch path ranks only the best tokens while the filters keep fewer: widening to the
    whole vocabulary never changes a token or a log-probability, with ties at every boundary."""
    import cfg_triton.sampling as sampling

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    vocab = 5_000
    cond, uncond = logits(8, vocab), logits(8, vocab)
    if ties:  # a few distinct values: the k-th score, the top-p cut and the prefix end all tie
        cond, uncond = cond.round(), uncond.round()
        # Row 4: ten tokens, then a run of 1,000 ties, which holds the k-th score (k = 256) and most
        # of the mass behind top-p: a ranking cut inside the run must widen to see all of it.
        cond[4], uncond[4] = -10.0, 0.0
        cond[4, 100:110], cond[4, 1_000:2_000] = 5.0, 4.0
    cond[2, :4_000] = NEG_INF
    lengths = []
    original = sampling._kept_prefix

    def spy(*args, **kw):
        out = original(*args, **kw)
        lengths.append(out[0].shape[1])
        return out

    monkeypatch.setattr(sampling, "_kept_prefix", spy)
    first = sampling._PREFIX
    # The whole batch, then each row alone (a call widens for its widest row)
    calls = [slice(None)] + [slice(r, r + 1) for r in range(8)]
    draws = []
    for prefix in (first, vocab):
        monkeypatch.setattr(sampling, "_PREFIX", prefix)
        draws.append([cfg_triton.sample(
            cond[rows], uncond[rows], 1.5, seed=seed, step=3, return_logprobs=True,
            **{k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in PREFIX_CASES[case].items()})
            for seed in range(4) for rows in calls])
    for short, whole in zip(*draws):
        assert torch.equal(short.tokens, whole.tokens)
        torch.testing.assert_close(short.logprobs, whole.logprobs, rtol=1e-5, atol=1e-5)
    # Both ways were taken: rankings left short, and widened ones
    short_lengths = lengths[: len(draws[0])]
    assert min(short_lengths) < vocab and max(short_lengths) > first, short_lengths


def test_logprobs_are_the_drawn_distributions(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cond, uncond = logits(4, 500), logits(4, 500)
    for kw in (dict(temperature=0.8), dict(temperature=0.8, top_k=7), dict(temperature=1.2, top_p=0.7),
               dict(temperature=0.5, min_p=0.2), dict(temperature=0)):
        tokens, lp = cfg_triton.sample(cond, uncond, 2.0, seed=3, return_logprobs=True, **kw)
        if kw["temperature"] == 0:
            probs = expected(cond, uncond, 2.0).softmax(-1)
        else:
            probs = _exact_probs(cond, uncond, 2.0, kw["temperature"], kw.get("top_k"), kw.get("top_p"),
                                 kw.get("min_p"))
        torch.testing.assert_close(lp.double(), probs.gather(1, tokens[:, None])[:, 0].log(),
                                   rtol=1e-5, atol=1e-5)


def test_seed_and_step_key_the_draw(backend):
    cond, uncond = logits(3, 1000), logits(3, 1000)
    a = cfg_triton.sample(cond, uncond, 1.5, seed=1, step=0)
    assert torch.equal(a, cfg_triton.sample(cond, uncond, 1.5, seed=1, step=0))
    others = [cfg_triton.sample(cond, uncond, 1.5, seed=s, step=t) for s, t in ((2, 0), (1, 1), (3, 9))]
    assert any(not torch.equal(a, o) for o in others)
    # Rows are keyed too: identical rows under one seed draw independently.
    same = cfg_triton.sample(cond[:1].expand(64, -1), uncond[:1].expand(64, -1), 1.5, seed=1)
    assert len(set(same.tolist())) > 1


def test_rng_hash_is_uint32_murmur():
    # Two known values of the MurmurHash3 finalizer pin the torch hash (the kernels match it, above).
    h = rng.mix32(torch.tensor([0, 1, 0xFFFFFFFF]))
    assert h.tolist() == [0, 0x514E28B7, 0x81F16F39]
    u = rng.gumbel(rng.row_keys(torch.tensor([0]), torch.tensor([0])), 100_000)
    assert abs(u.mean().item() - 0.5772) < 0.01 and abs(u.var().item() - 1.6449) < 0.03


def test_dead_and_poisoned_rows(backend):
    cond, uncond = logits(4, 300), logits(4, 300)
    cond[0] = NEG_INF
    cond[1, 7] = float("nan")
    uncond[2, 9] = float("inf")
    for kw in (dict(temperature=0), dict(temperature=1.0), dict(temperature=1.0, min_p=0.1)):
        tokens, lp = cfg_triton.sample(cond, uncond, 1.5, return_logprobs=True, **kw)
        assert tokens[:3].tolist() == [-1, -1, -1] and lp[:3].isnan().all()
        assert tokens[3] >= 0 and lp[3].isfinite()


@pytest.mark.skipif(not cfg_triton.triton_available(), reason="triton is not installed")
def test_kernel_path_reads_no_device_value(monkeypatch):
    """No host read: the draw never calls `.item()` / `bool()` on a tensor (what a device sync and a
    broken CUDA-graph capture would come from); seed and step are tensors, as in a captured loop."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoValueReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                raise AssertionError("a tensor value was read on the host")
            return func(*args, **(kwargs or {}))

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cond, uncond = logits(2, 3000), logits(2, 3000)
    seed, step = torch.tensor([4, 5]), torch.tensor([0, 0])
    want = cfg_triton.sample(cond, uncond, 1.5, temperature=0.8, min_p=0.05, seed=seed, step=step)
    with NoValueReads():
        got = cfg_triton.sample(cond, uncond, 1.5, temperature=0.8, min_p=0.05, seed=seed, step=step,
                                return_logprobs=True)
    assert torch.equal(got.tokens, want)


@pytest.mark.parametrize("kw, error, match", [
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(min_p=1.5), ValueError, "min_p"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(step=torch.zeros(3, dtype=torch.long)), ValueError, "step"),
    (dict(mix=0.5, normalize=False), ValueError, "normalize=False"),
])
def test_bad_arguments_are_refused(kw, error, match):
    with pytest.raises(error, match=match):
        cfg_triton.sample(torch.zeros(2, 5), torch.zeros(2, 5), 1.5, **kw)
