import contextlib
import os

import torch

from cfg_triton import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NEG_INF = float("-inf")


def logits(batch, vocab, dtype=torch.float32, scale=4.0):
    """Logit-like values (spread of a real LM's, up to about ±20) rounded to `dtype`."""
    return (torch.randn(batch, vocab, dtype=torch.float64) * scale).to(dtype)


def expected(cond, uncond, gamma, **kw):
    """The float64 reference on exactly the values the op sees (inputs already rounded)."""
    to64 = lambda x: x.double() if isinstance(x, torch.Tensor) else x  # noqa: E731
    if "mix" in kw:
        kw["mix"] = to64(kw["mix"])
    return reference.guidance(cond.double(), uncond.double(), to64(gamma), **kw)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, scale: float = None):
    """Masks identical; finite values within float32 math error plus rounding to `out.dtype`.

    The op computes in float32: each output is a few float32 operations on values of magnitude at
    most `scale` (the largest input or output magnitude), and a row log-sum-exp whose relative error
    is a few ulps. 64 float32 ulps of `scale` bounds that with room; storing the result in a
    narrower dtype adds half an ulp of that dtype, relative to the value.
    """
    assert out.shape == ref.shape
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref)), "masked tokens differ"
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), "NaN placement differs"
    assert not torch.isposinf(out).any(), "+inf in output"
    finite = torch.isfinite(ref)
    if not finite.any():
        return
    if scale is None:
        scale = max(1.0, ref[finite].abs().max().item())
    atol = 64 * torch.finfo(torch.float32).eps * scale
    rtol = torch.finfo(out.dtype).eps
    torch.testing.assert_close(out[finite].double(), ref[finite], atol=atol, rtol=rtol)


@contextlib.contextmanager
def environment(name: str, value: str):
    """Sets an environment variable for the duration, then restores it (or its absence)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
