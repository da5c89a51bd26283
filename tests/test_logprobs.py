"""`cfg_triton.token_logprobs` against gathering from `guidance()` and from the float64 reference."""
import pytest
import torch

import cfg_triton
from cfg_triton.reference import guidance as reference

from helpers import DTYPES, NEG_INF, assert_matches, expected, logits

SEMANTICS = {
    "raw": dict(normalize=False),
    "normalized": dict(),
    "interpolated": dict(mix=0.7),
}
# One row split across programs, a few rows, many short rows with a V that is not a multiple of
# the tile, and a single-token vocabulary.
SHAPES = [(1, 262_144), (3, 49_152), (64, 2_049), (2, 10_007), (9, 1_031), (5, 1)]


def _targets(batch, vocab):
    return torch.randint(0, vocab, (batch,))


def _gathered(full, targets):
    return full.gather(-1, targets[..., None])[..., 0]


def _greedy(full, targets):
    """The spec of `greedy`: the target is the row's argmax (lowest index on ties), and the row
    holds no NaN and some finite score."""
    return (full.argmax(-1) == targets) & ~torch.isnan(full).any(-1) & (full.amax(-1) > float("-inf"))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("semantics", SEMANTICS)
def test_equals_gathering_from_guidance(backend, semantics, dtype, shape):
    cond, uncond = logits(*shape, dtype), logits(*shape, dtype)
    targets = _targets(shape[0], shape[1])
    targets[0] = cfg_triton.guidance(cond, uncond, 1.5, **SEMANTICS[semantics])[0].argmax()
    kw = SEMANTICS[semantics]
    lp, greedy = cfg_triton.token_logprobs(cond, uncond, targets, 1.5, **kw)
    full = cfg_triton.guidance(cond, uncond, 1.5, **kw)
    want = _gathered(full, targets)
    # The same formula from the same statistics, gathered in another order (the kernels' tiles,
    # the torch path's row chunks): equal up to float32 rounding of the row constants.
    torch.testing.assert_close(lp, want, rtol=0, atol=8 * torch.finfo(torch.float32).eps * 32)
    ref = expected(cond, uncond, 1.5, **kw)
    assert_matches(lp[:, None], _gathered(ref, targets)[:, None], scale=ref.abs().max().item())
    assert torch.equal(greedy, _greedy(ref, targets))
    assert greedy[0]


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_masks_and_bad_input_follow_guidance(backend, semantics):
    cond, uncond = logits(6, 3000), logits(6, 3000)
    cond[0, 7] = NEG_INF  # masked in cond: -inf
    uncond[1, 9] = NEG_INF  # masked only in uncond: its conditional score
    uncond[1, 10:2000] = NEG_INF
    cond[2] = NEG_INF  # a dead row
    cond[3, 5] = float("nan")
    uncond[4, 11] = float("inf")
    cond[5, 100] = 1e4  # one token far above the rest: the winner among masked-in-uncond tokens
    uncond[5, 100] = NEG_INF
    targets = torch.tensor([7, 9, 0, 5, 11, 100])
    kw = SEMANTICS[semantics]
    lp, greedy = cfg_triton.token_logprobs(cond, uncond, targets, 2.0, **kw)
    ref = expected(cond, uncond, 2.0, **kw)
    want = _gathered(ref, targets)
    assert lp[0] == NEG_INF and lp[2] == NEG_INF
    assert torch.equal(torch.isnan(lp), torch.isnan(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(lp[finite].double(), want[finite], rtol=1e-6, atol=1e-3)
    # Row 2 is all -inf: it has no argmax (sample draws -1 there), so no target is greedy.
    assert greedy.tolist() == [False, False, False, False, False, True]
    assert cfg_triton.sample(cond[2:3], uncond[2:3], 2.0, temperature=0, **kw).tolist() == [-1]
    full = cfg_triton.guidance(cond, uncond, 2.0, **kw)
    assert torch.equal(torch.isnan(lp), torch.isnan(_gathered(full, targets)))


def test_a_poisoned_row_is_never_greedy(backend):
    """NaN or +inf anywhere in a row makes its target not greedy, even where the target is the
    argmax of the row's other tokens."""
    cond, uncond = logits(3, 500), logits(3, 500)
    cond[:, 7] += 60.0  # the clear winner of every row
    uncond[0, 3] = float("inf")
    cond[1, 9] = float("nan")
    greedy = cfg_triton.token_logprobs(cond, uncond, torch.tensor([7, 7, 7]), 1.5).greedy
    assert greedy.tolist() == [False, False, True]


def test_ties_go_to_the_lowest_index(backend):
    cond = torch.zeros(3, 5000)
    uncond = torch.zeros(3, 5000)
    cond[:, [40, 4000]] = 5.0  # two tokens tie for the maximum, in different tiles
    cond[2, 4000] = 5.0 + 1e-3
    targets = torch.tensor([40, 4000, 4000])
    for kw in SEMANTICS.values():
        assert cfg_triton.token_logprobs(cond, uncond, targets, 1.5, **kw).greedy.tolist() == [True, False, True]


def test_masked_winner_beats_live_only_on_its_guided_score(backend):
    # A token masked only in uncond keeps its conditional score; it wins only when that score is
    # above the best guided score of the live tokens.
    cond = torch.zeros(2, 100)
    uncond = torch.zeros(2, 100)
    cond[:, 3] = 2.0
    uncond[:, 3] = -1.0  # guided up: 2 + 1.5 * 3 - ... above cond alone
    cond[:, 50] = 2.5
    uncond[:, 50] = NEG_INF
    cond[1, 50] = 9.0
    lp, greedy = cfg_triton.token_logprobs(cond, uncond, torch.tensor([3, 50]), 1.5)
    full = cfg_triton.guidance(cond, uncond, 1.5)
    assert greedy.tolist() == (full.argmax(-1) == torch.tensor([3, 50])).tolist() == [True, True]


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_per_row_parameters(backend, semantics):
    cond, uncond = logits(5, 4099), logits(5, 4099)
    gamma = torch.tensor([0.0, 1.0, 1.5, 3.0, -1.0])
    kw = dict(SEMANTICS[semantics])
    if "mix" in kw:
        kw["mix"] = torch.tensor([0.0, 0.2, 0.7, 1.0, 0.5])
    targets = _targets(5, 4099)
    lp, greedy = cfg_triton.token_logprobs(cond, uncond, targets, gamma, **kw)
    ref = expected(cond, uncond, gamma, **kw)
    assert_matches(lp[:, None], _gathered(ref, targets)[:, None], scale=ref.abs().max().item())
    assert torch.equal(greedy, _greedy(ref, targets))


@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_three_dimensional_logits(backend, layout):
    full_c, full_u = logits(2 * 7, 1000).reshape(2, 7, 1000), logits(2 * 7, 1000).reshape(2, 7, 1000)
    if layout == "sliced":  # logits[:, -4:]: rows not evenly spaced, so flattening copies
        cond, uncond = full_c[:, 3:], full_u[:, 3:]
    else:  # what a model's `logits_to_keep` returns: flattening is a view
        cond, uncond = full_c[:, 3:].contiguous(), full_u[:, 3:].contiguous()
        assert cond.flatten(0, 1).data_ptr() == cond.data_ptr()
    targets = torch.randint(0, 1000, (2, 4))
    lp, greedy = cfg_triton.token_logprobs(cond, uncond, targets, 1.5)
    assert lp.shape == greedy.shape == (2, 4)
    flat = cfg_triton.token_logprobs(cond.reshape(8, 1000), uncond.reshape(8, 1000), targets.reshape(8), 1.5)
    assert torch.equal(lp.reshape(8), flat.logprobs) and torch.equal(greedy.reshape(8), flat.greedy)


def test_float64_stays_float64():
    cond, uncond = logits(3, 500, torch.float64), logits(3, 500, torch.float64)
    targets = _targets(3, 500)
    lp, _ = cfg_triton.token_logprobs(cond, uncond, targets, 2.5, mix=0.3)
    assert lp.dtype == torch.float64
    torch.testing.assert_close(lp, _gathered(reference(cond, uncond, 2.5, mix=0.3), targets),
                               rtol=1e-12, atol=1e-12)


def test_long_inputs_run_in_chunks(monkeypatch):
    # The torch path walks rows in chunks; chunk edges must not change any row.
    import cfg_triton.logprobs as logprobs

    cond, uncond = logits(37, 300), logits(37, 300)
    targets = _targets(37, 300)
    whole = cfg_triton.token_logprobs(cond, uncond, targets, 1.5, mix=0.5)
    monkeypatch.setattr(logprobs, "_TORCH_CHUNK_ELEMENTS", 5 * 300)
    chunked = cfg_triton.token_logprobs(cond, uncond, targets, 1.5, mix=0.5)
    torch.testing.assert_close(chunked.logprobs, whole.logprobs, rtol=0, atol=1e-5)
    assert torch.equal(chunked.greedy, whole.greedy)


def test_empty_batch():
    lp, greedy = cfg_triton.token_logprobs(torch.zeros(0, 10), torch.zeros(0, 10),
                                           torch.zeros(0, dtype=torch.long), 1.5)
    assert lp.shape == greedy.shape == (0,)


@pytest.mark.parametrize("args, error, match", [
    ((torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(3, dtype=torch.long)), ValueError, "shape"),
    ((torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(2)), TypeError, "integer"),
    ((torch.zeros(2, 5), torch.zeros(2, 5), torch.tensor([0, 5])), ValueError, "outside the vocabulary"),
    ((torch.zeros(2, 5), torch.zeros(2, 5), torch.tensor([-1, 0])), ValueError, "outside the vocabulary"),
    ((torch.zeros(2, 0), torch.zeros(2, 0), torch.tensor([0, 0])), ValueError, "empty vocabulary"),
    ((torch.zeros(2, 3, 5), torch.zeros(2, 4, 5), torch.zeros(2, 3, dtype=torch.long)), ValueError,
     "one shape"),
    ((torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.float16), torch.tensor([0, 0])), TypeError,
     "share a dtype"),
])
def test_bad_input_is_refused(args, error, match):
    with pytest.raises(error, match=match):
        cfg_triton.token_logprobs(*args, 1.5)


def test_mix_needs_normalization():
    with pytest.raises(ValueError, match="normalize=False"):
        cfg_triton.token_logprobs(torch.zeros(1, 5), torch.zeros(1, 5), torch.tensor([0]), 1.5,
                                  mix=0.5, normalize=False)


def test_per_row_scales_across_torch_path_chunks(monkeypatch):
    """The torch path works through row chunks: each chunk takes its own rows' γ and α."""
    from cfg_triton import logprobs

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(logprobs, "_TORCH_CHUNK_ELEMENTS", 3 * 500)  # chunks of 3 rows: 3, 3, 3, 1
    cond, uncond = logits(10, 500), logits(10, 500)
    targets = torch.randint(0, 500, (10,))
    gamma, mix = torch.linspace(-1, 4, 10), torch.linspace(0, 1, 10)
    for kw in ({}, dict(mix=mix), dict(normalize=False)):
        lp, greedy = cfg_triton.token_logprobs(cond, uncond, targets, gamma, **kw)
        ref = expected(cond, uncond, gamma[:, None].double(),
                       **{k: (v[:, None] if k == "mix" else v) for k, v in kw.items()})
        torch.testing.assert_close(lp.double(), _gathered(ref, targets), rtol=1e-5, atol=1e-4)
        assert torch.equal(greedy, _greedy(ref, targets))
