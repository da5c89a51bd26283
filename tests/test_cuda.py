"""The compiled Triton kernels on a real GPU (skipped where torch sees none; bench/gpu.sh runs them)."""
import pytest
import torch

import cfg_triton

from helpers import DTYPES, NEG_INF, assert_matches, expected, logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SEMANTICS = {"raw": dict(normalize=False), "normalized": dict(), "interpolated": dict(mix=0.7)}
SHAPES = [(1, 262_144), (1, 32_000), (2, 151_936), (8, 49_152), (64, 128_256), (256, 2_049), (3, 1)]


def _cuda(*tensors):
    return [t.cuda() for t in tensors]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("semantics", SEMANTICS)
def test_matches_reference_on_gpu(semantics, dtype, shape):
    cond, uncond = logits(*shape, dtype), logits(*shape, dtype)
    gamma = torch.linspace(-1, 4, shape[0])
    kw = SEMANTICS[semantics]
    out = cfg_triton.guidance(*_cuda(cond, uncond), gamma.cuda(), **kw)
    assert cfg_triton.uses_triton(out)
    assert_matches(out.cpu(), expected(cond, uncond, gamma, **kw))


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_masks_and_nan_on_gpu(semantics):
    cond, uncond = logits(6, 70_001), logits(6, 70_001)
    cond[0, ::7] = NEG_INF
    uncond[1, ::5] = NEG_INF
    cond[2] = NEG_INF
    uncond[3] = NEG_INF
    uncond[4, 9] = float("nan")
    cond[5, 11] = float("inf")
    kw = SEMANTICS[semantics]
    for gamma in (0.0, 1.0, 3.0, -0.5):
        out = cfg_triton.guidance(*_cuda(cond, uncond), gamma, **kw).cpu()
        assert_matches(out, expected(cond, uncond, gamma, **kw))


def test_gamma_one_is_conditional_log_softmax_bit_for_bit_across_mix():
    cond, uncond = _cuda(logits(4, 262_144, torch.bfloat16), logits(4, 262_144, torch.bfloat16))
    outs = [cfg_triton.guidance(cond, uncond, 1.0, mix=a) for a in (0.0, 0.7, 1.0)]
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert_matches(outs[0].cpu(), torch.log_softmax(cond.cpu().double(), -1))


def test_stacked_halves_and_strided_rows_on_gpu():
    scores = logits(8, 49_152).cuda()
    out = cfg_triton.CFGLogitsProcessor(1.5, mix=0.7)(torch.ones(4, 1, dtype=torch.long), scores)
    assert_matches(out.cpu(), expected(scores[:4].cpu(), scores[4:].cpu(), 1.5, mix=0.7))
    seq = (torch.randn(2, 3, 32_000) * 4).cuda()
    out = cfg_triton.guidance(seq[:, -1], seq[:, 0], 2.0)
    assert_matches(out.cpu(), expected(seq[:, -1].cpu(), seq[:, 0].cpu(), 2.0))


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


def test_empty_batch_on_gpu():
    assert cfg_triton.guidance(torch.empty(0, 10, device="cuda"), torch.empty(0, 10, device="cuda"),
                               1.5).shape == (0, 10)


def test_inductor_fullgraph_on_gpu():
    def step(scores):
        cond, uncond = scores.chunk(2)
        return cfg_triton.guidance(cond, uncond, 1.5, mix=0.7).softmax(-1)

    scores = logits(4, 32_000).cuda()
    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(scores), step(scores))
