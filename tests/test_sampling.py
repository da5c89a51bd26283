"""`cfg_triton.sample`: greedy against the float64 argmax, draws against exact float64 probabilities
(transformers' own warpers applied to the reference scores), and one token per seed on every path
and split count."""
import pytest
import torch
from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import cfg_triton
from cfg_triton import rng
from cfg_triton.processors import MAX_TEMPERATURE as MAX_T

from conftest import INTERPRETED
from helpers import DTYPES, NEG_INF, expected, logits

SEMANTICS = {"raw": dict(normalize=False), "normalized": {}, "interpolated": dict(mix=0.7)}


@pytest.mark.parametrize("shape", [(1, 70_000), (3, 4_099), (64, 2_049), (2, 10_007), (5, 1)],
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


def test_greedy_between_the_two_groups(backend):
    """Tokens masked in uncond alone compete with the live ones on their guided scores (here
    interpolated, where the groups' offset carries the mix): rows whose best of each group lie
    within ±0.5 of each other, in both orders, and greedy picks as the float64 reference does."""
    kw = SEMANTICS["interpolated"]
    cond, uncond = logits(64, 2_000), logits(64, 2_000)
    uncond[:, :16] = NEG_INF
    target = torch.linspace(-0.5, 0.5, 64, dtype=torch.float64)  # masked best minus live best
    for _ in range(4):  # raising the masked tokens moves every score a little: settle
        ref = expected(cond, uncond, 1.5, **kw)
        gap = ref[:, :16].max(-1).values - ref[:, 16:].max(-1).values
        cond[:, :16] += (target - gap)[:, None].float()
    winners = expected(cond, uncond, 1.5, **kw).argmax(-1)
    assert 10 < (winners < 16).sum() < 54  # both groups win some rows
    assert torch.equal(cfg_triton.sample(cond, uncond, 1.5, temperature=0, **kw), winners)


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
@pytest.mark.parametrize("semantics, filters", [("normalized", f) for f in KERNEL_FILTERS if f != "all"]
                         + [pytest.param(s, "all", marks=pytest.mark.slow) for s in SEMANTICS])
def test_kernels_draw_the_torch_paths_tokens(monkeypatch, semantics, filters):
    cond, uncond = logits(8, 1_001), logits(8, 1_001)
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
    # Without log-probabilities the kernels accept a kept unfiltered draw at once: the same tokens.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tokens = cfg_triton.sample(cond, uncond, torch.linspace(0, 3, 8), temperature=temperature,
                               seed=torch.arange(8) + seed, step=11, **kw)
    assert torch.equal(tokens, torch_path.tokens)


@pytest.mark.skipif(not INTERPRETED, reason="needs Triton's interpreter")
@pytest.mark.parametrize("filters", [dict(top_k=2), dict(top_p=0.5), dict(top_k=2, top_p=0.5)], ids=str)
def test_fast_accept_keeps_only_kept_draws(monkeypatch, filters):
    """Without log-probabilities the kernels keep the unfiltered draw when the filters keep it.
    Three tokens hold nearly all the mass, so the unfiltered draw is often the third, just past
    top-k 2 and the top-p 0.5 cut, and with both the second is past top-p's cut of the top-2 mass:
    the kernels must redraw there as the torch path does."""
    rows = 24
    cond = torch.full((rows, 128), -8.0)
    cond[:, 10:13] = torch.tensor([2.0, 1.8, 1.6])
    kw = dict(temperature=1.0, seed=torch.arange(rows), step=5)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch_path = cfg_triton.sample(cond, cond, 1.5, **kw, **filters)
    unfiltered = cfg_triton.sample(cond, cond, 1.5, **kw)
    assert (unfiltered == 12).sum() >= 3  # rejected draws, to be redrawn
    assert not (torch_path == 12).any() and ("top_k" not in filters or "top_p" not in filters
                                            or (torch_path == 10).all())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert torch.equal(cfg_triton.sample(cond, cond, 1.5, **kw, **filters), torch_path)


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_banned_tokens_in_some_rows_only(backend, semantics):
    """Tokens banned (-inf in cond) in some rows only, at scales where the fast path's lerp takes
    either of its formulas (weights below 0.5, in [0.5, 1), at 1, above): never drawn, greedy is
    the reference argmax, and log-probabilities are finite."""
    cond, uncond = logits(4, 300), logits(4, 300)
    cond[1, :150] = NEG_INF
    cond[3, 7] = NEG_INF
    uncond[1:, :150] += 6  # the banned tokens are the unconditional favourites
    kw = SEMANTICS[semantics]
    # (the interpreter, a program at a time, takes the scales where the torch path's lerp changes
    # formula)
    for gamma in (0.0, 0.3, 0.7, 1.0, 2.0) if backend == "torch" else (0.0, 0.7):
        greedy = cfg_triton.sample(cond, uncond, gamma, temperature=0, **kw)
        assert torch.equal(greedy, expected(cond, uncond, gamma, **kw).argmax(-1)), gamma
        drawn = cfg_triton.sample(cond, uncond, gamma, temperature=1.0, top_k=50, seed=3,
                                  return_logprobs=True, **kw)
        assert not cond[torch.arange(4), drawn.tokens].isneginf().any(), gamma
        assert drawn.logprobs.isfinite().all(), gamma


@pytest.mark.skipif(not cfg_triton.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("filters", ["none", "min_p", pytest.param("all", marks=pytest.mark.slow)])
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
@pytest.mark.parametrize("name", [pytest.param("none", marks=pytest.mark.slow), *list(FILTERS)[1:]])
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
    # ln2·g is a standard Gumbel shifted by ln(ln 2): mean γ_Euler + ln(ln 2), variance π²/6.
    g = rng.gumbel(rng.row_keys(torch.tensor([0]), torch.tensor([0])), 100_000) * rng.LN2
    assert abs(g.mean().item() - 0.2107) < 0.01 and abs(g.var().item() - 1.6449) < 0.03


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


def _fmix32(h):
    """MurmurHash3's 32-bit finalizer, written out for the tests in Python ints."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _key(seed, row, step):
    """The documented row-key chain over the two 32-bit halves of an int64 seed and step."""
    mask = 0xFFFFFFFF
    h = _fmix32((seed & mask) ^ 0x9E3779B9)
    for part in ((seed >> 32) & mask, row, step & mask):
        h = _fmix32(h ^ part)
    return _fmix32(h ^ ((step >> 32) & mask)) if (step >> 32) & mask else h


def _noise(key, token):
    """Base-2 Gumbel noise of a token: one finalizer over `token * (key | 1) + fmix32(key)`."""
    import math

    u = ((_fmix32((token * (key | 1) + _fmix32(key)) & 0xFFFFFFFF) >> 9) + 0.5) * 2.0 ** -23
    return -math.log2(-math.log2(u))


SEEDS = [0, 1, -1, 2**32, 2**32 + 1, 2**63 - 1, -(2**63), 123_456_789_012]
STEPS = [0, 1, 7, 2**32 - 1, 2**32, 2**32 + 7, 2**33, -1, 2**63 - 1]


def test_rng_golden_values():
    """Row keys and noise against the chain written out independently, and literal values that
    pin both (a change of constant or order in the hash changes them)."""
    got = rng.row_keys(torch.tensor(SEEDS)[:, None].expand(-1, len(STEPS)).reshape(-1),
                       torch.tensor(STEPS).repeat(len(SEEDS)))
    want = [_key(s, i, t) for i, (s, t) in enumerate((s, t) for s in SEEDS for t in STEPS)]
    assert got.tolist() == want
    assert [_key(0, 0, 0), _key(5, 3, 11), _key(-1, 0, 2**32)] == [0x37DD7702, 0x88DED912, 0xF49BF52B]
    keys = rng.row_keys(torch.tensor([0, 5, -1]), torch.tensor([0, 11, 2**32]))
    noise = rng.gumbel(keys, 50_000)
    for r in range(3):
        for token in (0, 1, 49_999, 31_337):
            assert noise[r, token].item() == pytest.approx(_noise(int(keys[r]), token), rel=1e-6, abs=1e-6)
    assert [round(_noise(0x37DD7702, t), 6) for t in (0, 1, 49_999)] == [2.851007, 1.039974, 0.050732]
    at = torch.tensor([[31_337, 0], [1, 49_999], [7, 7]])
    assert torch.equal(rng.gumbel_at(keys, at, 50_000), noise.gather(1, at))


def test_distinct_seeds_and_steps_draw_distinct_noise():
    keys = {(s, t): rng.row_keys(s, t, 1, "cpu").item() for s in SEEDS for t in STEPS}
    assert len(set(keys.values())) == len(keys)  # 2**32 apart, negative, int64 extremes
    # Python ints and int64 tensors key alike.
    tensor = rng.row_keys(torch.tensor([SEEDS[5]] * 2), torch.tensor([STEPS[4]] * 2))
    assert tensor.tolist() == rng.row_keys(SEEDS[5], STEPS[4], 2, "cpu").tolist()
    cond, uncond = logits(2, 4_000, scale=0.1), logits(2, 4_000, scale=0.1)  # flat: draws differ
    draws = {tuple(cfg_triton.sample(cond, uncond, 1.5, seed=0, step=t).tolist())
             for t in (0, 2**32, 2**33)}
    assert len(draws) == 3
    for bad in (dict(seed=2**63), dict(seed=-(2**63) - 1), dict(step=2**64)):
        with pytest.raises(ValueError, match="int64"):
            cfg_triton.sample(cond, uncond, 1.5, **bad)


if cfg_triton.triton_available():
    import triton
    import triton.language as tl

    from cfg_triton.kernels import sampling as sampling_kernels

    @triton.jit
    def _noise_kernel(keys_ptr, out_ptr, V, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        multiplier, offset = sampling_kernels._hash_constants(keys_ptr, row)
        tl.store(out_ptr + row * V + idx, sampling_kernels._noise(multiplier, offset, idx), mask=idx < V)


@pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()), reason="needs Triton")
def test_kernel_noise_equals_the_torch_noise():
    """The kernels' `_noise` (interpreted, or compiled on a GPU, where log2 is the hardware's
    approximation) against `rng.gumbel` value for value."""
    device = "cpu" if INTERPRETED else "cuda"
    keys = rng.row_keys(torch.tensor(SEEDS[:4]), torch.tensor(STEPS[2:6])).to(device)
    vocab = 5_000
    out = torch.empty(4, vocab, device=device)
    _noise_kernel[(4, triton.cdiv(vocab, 1024))](keys, out, vocab, BLOCK=1024)
    torch.testing.assert_close(out, rng.gumbel(keys, vocab), rtol=0, atol=2e-6)


@pytest.mark.parametrize("temperature", [3e38, 1e7, float("inf"), float("nan")])
def test_absurd_temperatures_are_refused(temperature, tiny_llama):
    with pytest.raises(ValueError, match="temperature"):
        cfg_triton.sample(torch.zeros(2, 5), torch.zeros(2, 5), 1.5, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        cfg_triton.generate(tiny_llama, torch.tensor([[1, 2]]), do_sample=True,
                            temperature=temperature, max_new_tokens=2)


def test_the_hottest_temperature_draws_uniformly(monkeypatch):
    """At the largest temperature every kept token is (to 1e-5) equally likely: no overflow, and no
    drift toward low token ids; the kernels draw the torch path's tokens there."""
    vocab, rows = 16, 2_048
    cond, uncond = logits(1, vocab).expand(rows, -1).clone(), logits(1, vocab).expand(rows, -1)
    cond[:, 3] = NEG_INF
    kw = dict(temperature=MAX_T, seed=torch.arange(rows), step=0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tokens = cfg_triton.sample(cond, uncond, 1.5, **kw)
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[3] == 0
    kept = torch.cat([counts[:3], counts[4:]])
    expected_count = rows / (vocab - 1)
    chi2 = ((kept - expected_count) ** 2 / expected_count).sum().item()
    assert chi2 < 44.3  # the 0.9999 quantile of chi-square with 14 degrees of freedom
    if INTERPRETED:  # a few rows: the interpreter runs one program at a time
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        few = dict(temperature=MAX_T, seed=torch.arange(32), step=0)
        assert torch.equal(cfg_triton.sample(cond[:32], uncond[:32], 1.5, **few), tokens[:32])


def test_row_keys_a_draw_wherever_it_sits():
    """`row=0` draws each row what it would draw alone, whatever its position in the batch."""
    torch.manual_seed(3)
    cond, uncond = torch.randn(4, 300) * 3, torch.randn(4, 300) * 3
    seeds, steps = torch.tensor([5, 6, 7, 8]), torch.tensor([0, 3, 1, 9])
    together = cfg_triton.sample(cond, uncond, 1.5, temperature=1.0, seed=seeds, step=steps, row=0)
    alone = [int(cfg_triton.sample(cond[i:i + 1], uncond[i:i + 1], 1.5, temperature=1.0, seed=int(seeds[i]),
                                   step=int(steps[i]))) for i in range(4)]
    assert together.tolist() == alone
    by_position = cfg_triton.sample(cond, uncond, 1.5, temperature=1.0, seed=seeds, step=steps)
    assert by_position[0] == together[0] and by_position.tolist() != together.tolist()


def test_sample_requests_draws_each_row_with_its_own_parameters():
    """The engines' batched draw (`params.sample_requests`): every row equals a `sample` call of
    that row alone with its request's parameters; an unguided row ignores its uncond row."""
    from cfg_triton.params import GuidanceParams, sample_requests

    torch.manual_seed(4)
    cond, uncond = torch.randn(4, 300) * 3, torch.randn(4, 300) * 3
    params = [GuidanceParams(guidance_scale=1.5),
              GuidanceParams(guidance_scale=3.0, temperature=0.8, top_k=20),
              GuidanceParams(guidance_scale=2.0, temperature=1.2, top_p=0.9, min_p=0.05),
              GuidanceParams(guidance_scale=0.5, temperature=1.0)]
    seeds, steps = [11, 12, 13, 14], [0, 5, 2, 7]
    guided = [True, True, True, False]
    tokens = sample_requests(cond, uncond, params, seeds, steps, normalized=True, guided=guided)
    for i, p in enumerate(params):
        filters = {k: getattr(p, k) for k in ("top_k", "top_p", "min_p") if getattr(p, k) is not None}
        other = uncond[i:i + 1] if guided[i] else cond[i:i + 1]
        alone = cfg_triton.sample(cond[i:i + 1], other, p.guidance_scale if guided[i] else 1.0,
                                  temperature=p.temperature, seed=seeds[i], step=steps[i], **filters)
        assert int(tokens[i]) == int(alone), i
    mixed = sample_requests(cond, uncond, [GuidanceParams(guidance_scale=2.0, mix=0.7)] * 4, seeds, steps,
                            normalized=False)
    assert mixed.tolist() == cfg_triton.sample(cond, uncond, 2.0, mix=0.7, temperature=torch.zeros(4),
                                               seed=torch.tensor(seeds), step=torch.tensor(steps),
                                               row=0).tolist()
