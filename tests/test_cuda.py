"""The Triton kernels as the GPU runs them: compiled on CUDA (bench/gpu.sh), else in the interpreter.

Without a GPU these cases run on CPU tensors through Triton's interpreter at CPU-sized shapes, so
the file's logic is exercised in CI; the CUDA-only checks (graph capture, the direct launch of
compiled kernels, more than 2**31 elements) skip there.
"""
import itertools
import os

import pytest
import torch

import cfg_triton
from cfg_triton import ops
from cfg_triton.modes import INTERPOLATED, NORMALIZED, RAW

from helpers import DTYPES, NEG_INF, assert_matches, expected, logits

ON_GPU = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and ops.triton_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(not (ON_GPU or INTERPRETED),
                                reason="needs a CUDA GPU or Triton's interpreter")
cuda_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")

SEMANTICS = {"raw": dict(normalize=False), "normalized": dict(), "interpolated": dict(mix=0.7)}
SHAPES = ([(1, 262_144), (1, 32_000), (2, 151_936), (8, 49_152), (64, 128_256), (256, 2_049), (3, 1)]
          if ON_GPU else [(1, 40_000), (2, 5_003), (9, 2_049), (3, 1)])
MODES = {RAW: "raw", NORMALIZED: "normalized", INTERPOLATED: "interpolated"}


@pytest.fixture(autouse=True)
def _interpreter_on_cpu(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _dev(*tensors):
    return [t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("semantics", SEMANTICS)
def test_matches_reference_on_device(semantics, dtype, shape):
    cond, uncond = logits(*shape, dtype), logits(*shape, dtype)
    gamma = torch.linspace(-1, 4, shape[0])
    kw = SEMANTICS[semantics]
    out = cfg_triton.guidance(*_dev(cond, uncond), gamma.to(DEVICE), **kw)
    assert cfg_triton.uses_triton(out)
    assert_matches(out.cpu(), expected(cond, uncond, gamma, **kw))


SPECIALIZATIONS = [(in_t, out_t, mode, g_rows, m_rows)
                   for in_t, out_t, mode in itertools.product(DTYPES, DTYPES + [torch.float64], MODES)
                   for g_rows in (False, True)
                   for m_rows in ((False, True) if mode == INTERPOLATED else (False,))]


@pytest.mark.parametrize("in_t, out_t, mode, gamma_rows, mix_rows", SPECIALIZATIONS,
                         ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, int) or
                         isinstance(v, bool) else MODES[v])
def test_every_specialization_writes_every_element_poisoned(in_t, out_t, mode, gamma_rows, mix_rows):
    """Each kernel specialization `launch` can produce, into an output pre-filled with NaN: an
    element the kernels skip stays NaN and fails the comparison."""
    batch, vocab = (3, 70_001) if ON_GPU else (3, 2_500)
    cond, uncond = logits(batch, vocab, in_t), logits(batch, vocab, in_t)
    cond[0, ::97] = NEG_INF
    uncond[1, ::89] = NEG_INF
    gamma = torch.tensor([1.5, -0.5, 3.0])
    mix = torch.tensor([0.7, 0.0, 1.0])
    c, u = _dev(cond, uncond)
    out = torch.full((batch, vocab), float("nan"), dtype=out_t, device=DEVICE)
    n_splits, split_len = ops._kernels.plan(batch, vocab, ops._num_sms(c.device))
    stats = torch.full((batch * n_splits * ops._kernels.STATS,), float("nan"), device=DEVICE)
    ops._kernels.launch(c, u, out, stats, mode, 1.5, gamma.to(DEVICE) if gamma_rows else None,
                        0.7, mix.to(DEVICE) if mix_rows else None, n_splits, split_len)
    kw = {RAW: dict(normalize=False), NORMALIZED: {}, INTERPOLATED: dict(mix=mix if mix_rows else 0.7)}
    ref = expected(cond, uncond, gamma if gamma_rows else 1.5, **kw[mode])
    assert_matches(out.cpu().to(torch.float64 if out_t == torch.float64 else out_t), ref)


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_masks_and_nan_on_device(semantics):
    vocab = 70_001 if ON_GPU else 3_001
    cond, uncond = logits(6, vocab), logits(6, vocab)
    cond[0, ::7] = NEG_INF
    uncond[1, ::5] = NEG_INF
    cond[2] = NEG_INF
    uncond[3] = NEG_INF
    uncond[4, 9] = float("nan")
    cond[5, 11] = float("inf")
    kw = SEMANTICS[semantics]
    for gamma in (0.0, 1.0, 3.0, -0.5):
        out = cfg_triton.guidance(*_dev(cond, uncond), gamma, **kw).cpu()
        assert_matches(out, expected(cond, uncond, gamma, **kw))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("semantics", SEMANTICS)
def test_two_runs_are_bitwise_equal(semantics, dtype):
    shape = (8, 49_152) if ON_GPU else (2, 5_000)
    cond, uncond = _dev(logits(*shape, dtype), logits(*shape, dtype))
    first = cfg_triton.guidance(cond, uncond, 1.5, **SEMANTICS[semantics])
    second = cfg_triton.guidance(cond, uncond, 1.5, **SEMANTICS[semantics])
    assert torch.equal(first.isnan(), second.isnan())
    assert torch.equal(first, second)


@cuda_only
@pytest.mark.parametrize("semantics", SEMANTICS)
def test_fast_launch_equals_jit_launch(semantics):
    """The second call of a specialization calls the compiled kernels directly (no JIT dispatch):
    bit for bit what the JIT launch gives."""
    cond, uncond = _dev(logits(4, 49_153, torch.bfloat16), logits(4, 49_153, torch.bfloat16))
    ops._kernels._compiled.clear()
    via_jit = cfg_triton.guidance(cond, uncond, 2.0, **SEMANTICS[semantics])
    assert ops._kernels._compiled, "the first launch did not register its compiled kernels"
    direct = cfg_triton.guidance(cond, uncond, 2.0, **SEMANTICS[semantics])
    assert torch.equal(direct, via_jit)
    # A strided view of other alignment is another specialization and must not reuse the entry.
    wide = torch.zeros(4, 49_153 + 1, dtype=torch.bfloat16, device=DEVICE)
    wide[:, 1:] = cond
    shifted = cfg_triton.guidance(wide[:, 1:], uncond, 2.0, **SEMANTICS[semantics])
    assert torch.equal(shifted, via_jit)


@cuda_only
@pytest.mark.parametrize("semantics", SEMANTICS)
def test_cuda_graph_capture_and_replay(semantics):
    cond, uncond = _dev(logits(2, 151_936, torch.bfloat16), logits(2, 151_936, torch.bfloat16))
    gamma = torch.tensor([1.5, 3.0], device=DEVICE)
    kw = SEMANTICS[semantics]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cfg_triton.guidance(cond, uncond, gamma, **kw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cfg_triton.guidance(cond, uncond, gamma, **kw)
    for seed in range(3):  # new values in the captured inputs, then a replay
        torch.manual_seed(seed)
        new_c, new_u = logits(2, 151_936, torch.bfloat16), logits(2, 151_936, torch.bfloat16)
        cond.copy_(new_c)
        uncond.copy_(new_u)
        gamma.copy_(torch.tensor([0.5 + seed, -1.0]))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(out.cpu(), expected(new_c, new_u, gamma.cpu(), **kw))


def test_gamma_one_is_conditional_log_softmax_bit_for_bit_across_mix():
    vocab = 262_144 if ON_GPU else 5_000
    cond, uncond = _dev(logits(4, vocab, torch.bfloat16), logits(4, vocab, torch.bfloat16))
    outs = [cfg_triton.guidance(cond, uncond, 1.0, mix=a) for a in (0.0, 0.7, 1.0)]
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert_matches(outs[0].cpu(), torch.log_softmax(cond.cpu().double(), -1))


def test_stacked_halves_and_strided_rows_on_device():
    scores = logits(8, 49_152 if ON_GPU else 4_099).to(DEVICE)
    out = cfg_triton.CFGLogitsProcessor(1.5, mix=0.7)(torch.ones(4, 1, dtype=torch.long), scores)
    assert_matches(out.cpu(), expected(scores[:4].cpu(), scores[4:].cpu(), 1.5, mix=0.7))
    seq = (torch.randn(2, 3, 32_000 if ON_GPU else 3_001) * 4).to(DEVICE)
    out = cfg_triton.guidance(seq[:, -1], seq[:, 0], 2.0)
    assert_matches(out.cpu(), expected(seq[:, -1].cpu(), seq[:, 0].cpu(), 2.0))


@cuda_only
def test_more_than_2_31_elements():
    free, _ = torch.cuda.mem_get_info()
    batch, vocab = 8_200, 262_144  # B·V > 2**31
    if free < batch * vocab * 2 * 2 + batch * vocab * 2 + (1 << 30):
        pytest.skip("not enough GPU memory")
    cond = torch.randn(batch, vocab, device="cuda", dtype=torch.bfloat16)
    uncond = torch.randn(batch, vocab, device="cuda", dtype=torch.bfloat16)
    out = cfg_triton.guidance(cond, uncond, 1.5, mix=0.7, out_dtype=torch.bfloat16)
    for row in (0, batch // 2, batch - 1):
        assert_matches(out[row : row + 1].cpu(),
                       expected(cond[row : row + 1].cpu(), uncond[row : row + 1].cpu(), 1.5, mix=0.7))


def test_empty_batch_on_device():
    assert cfg_triton.guidance(torch.empty(0, 10, device=DEVICE), torch.empty(0, 10, device=DEVICE),
                               1.5).shape == (0, 10)


def test_inductor_fullgraph_against_reference():
    def step(scores):
        cond, uncond = scores.chunk(2)
        return cfg_triton.guidance(cond, uncond, 1.5, mix=0.7).softmax(-1)

    scores = logits(4, 32_000 if ON_GPU else 3_000)
    compiled = torch.compile(step, fullgraph=True)
    got = compiled(scores.to(DEVICE)).cpu()
    want = expected(scores[:2], scores[2:], 1.5, mix=0.7).softmax(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_token_logprobs_on_device(semantics):
    shape = (64, 49_152) if ON_GPU else (5, 3_001)
    cond, uncond = logits(*shape, torch.bfloat16), logits(*shape, torch.bfloat16)
    uncond[0, :100] = NEG_INF
    targets = torch.randint(0, shape[1], (shape[0],))
    targets[1] = expected(cond, uncond, 1.5, **SEMANTICS[semantics])[1].argmax()
    lp, greedy = cfg_triton.token_logprobs(*_dev(cond, uncond, targets), 1.5, **SEMANTICS[semantics])
    ref = expected(cond, uncond, 1.5, **SEMANTICS[semantics])
    assert_matches(lp.cpu()[:, None], ref.gather(1, targets[:, None]), scale=ref.abs().max().item())
    assert torch.equal(greedy.cpu(), ref.argmax(-1) == targets)


@pytest.mark.parametrize("min_p", [None, 0.05])
@pytest.mark.parametrize("semantics", SEMANTICS)
def test_sample_on_device_draws_the_torch_paths_tokens(semantics, min_p):
    shape = (64, 128_256) if ON_GPU else (4, 3_001)
    cond, uncond = logits(*shape), logits(*shape)
    uncond[1, :50] = NEG_INF
    temperature = torch.linspace(0, 2, shape[0])
    kw = dict(SEMANTICS[semantics], min_p=min_p, seed=7, step=3, return_logprobs=True)
    got = cfg_triton.sample(*_dev(cond, uncond), 1.5, temperature=temperature.to(DEVICE), **kw)
    os.environ["TRITON_INTERPRET"] = "0"  # the torch path on CPU tensors
    try:
        want = cfg_triton.sample(cond, uncond, 1.5, temperature=temperature, **kw)
    finally:
        os.environ["TRITON_INTERPRET"] = "0" if ON_GPU else "1"
    assert (got.tokens.cpu() == want.tokens).float().mean() >= (0.98 if ON_GPU else 1.0)
    same = got.tokens.cpu() == want.tokens
    torch.testing.assert_close(got.logprobs.cpu()[same], want.logprobs[same].float(), rtol=1e-3, atol=1e-3)


@cuda_only
def test_sample_is_captured_in_a_cuda_graph():
    """A decode step's draw replays from a CUDA graph: seed and step live on the device."""
    cond, uncond = _dev(logits(8, 128_256, torch.bfloat16), logits(8, 128_256, torch.bfloat16))
    seed = torch.arange(8, device=DEVICE)
    step = torch.zeros(8, dtype=torch.long, device=DEVICE)
    kw = dict(temperature=0.9, min_p=0.05, seed=seed, step=step)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cfg_triton.sample(cond, uncond, 1.5, **kw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = cfg_triton.sample(cond, uncond, 1.5, **kw)
    for t in range(3):
        step.fill_(t)
        graph.replay()
        torch.cuda.synchronize()
        eager = cfg_triton.sample(cond, uncond, 1.5, temperature=0.9, min_p=0.05, seed=seed, step=t)
        assert torch.equal(tokens, eager)


@cuda_only
def test_hardware_log2_changes_a_draw_only_at_near_ties():
    """On a GPU the noise's two log2 are the hardware's approximation: a draw may differ from the
    torch path's (exact log2) only where the two noisy keys lie within that rounding of each
    other, at most 1 row in 10**4."""
    from cfg_triton import rng

    rows, vocab = 20_000, 4_096
    cond, uncond = logits(rows, vocab), logits(rows, vocab)
    kw = dict(temperature=1.0, seed=torch.arange(rows), step=9)
    got = cfg_triton.sample(*_dev(cond, uncond), 1.5, **{**kw, "seed": kw["seed"].to(DEVICE)}).cpu()
    os.environ["TRITON_INTERPRET"] = "0"  # the torch path on CPU tensors
    want = cfg_triton.sample(cond, uncond, 1.5, **kw)
    differ = (got != want).nonzero()[:, 0]
    assert len(differ) <= rows // 10_000
    keys = torch.lerp(uncond.double(), cond.double(), 1.5) + rng.LN2 * rng.gumbel(
        rng.row_keys(kw["seed"], torch.full((rows,), 9)), vocab).double()
    for r in differ.tolist():
        a, b = keys[r, got[r]].item(), keys[r, want[r]].item()
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (r, a, b)


@cuda_only
def test_gpu_draws_follow_the_exact_distribution():
    """200,000 draws of one row (distinct seeds) on the GPU against its exact probabilities."""
    draws, vocab = 200_000, 64
    cond, uncond = logits(1, vocab, scale=1.5), logits(1, vocab, scale=1.5)
    tokens = cfg_triton.sample(*_dev(cond.expand(draws, -1), uncond.expand(draws, -1)), 1.5,
                               temperature=0.8, seed=torch.arange(draws, device=DEVICE), step=1)
    probs = (expected(cond, uncond, 1.5)[0] / 0.8).softmax(-1)
    freq = torch.bincount(tokens.cpu(), minlength=vocab).double() / draws
    sigma = (probs * (1 - probs) / draws).sqrt()
    assert ((freq - probs).abs() <= 5 * sigma + 1e-6).all()
