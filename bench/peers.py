"""What users run today, to benchmark against: the literal reference and transformers' processor math."""
import torch

from cfg_triton import reference

BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def min_bytes(batch, vocab, dtype):
    """GUIDANCE.md §4: read both branches once, write fp32 scores once."""
    return 2 * batch * vocab * BYTES[dtype] + batch * vocab * 4


def eager_reference(semantics, fp32=False):
    """The literal reference; with `fp32`, on inputs upcast to float32 as the fused op computes."""
    fn = {
        "raw": lambda c, u, g: reference.raw_cfg(c, u, g),
        "normalized": lambda c, u, g: reference.normalized_cfg(c, u, g),
        "interpolated": lambda c, u, g: reference.interpolated_cfg(c, u, g, 0.7),
    }[semantics]
    return (lambda c, u, g: fn(c.float(), u.float(), g)) if fp32 else fn


def transformers_math(semantics):
    """The arithmetic inside transformers' two CFG processors (no model call), None where it has none.

    Like transformers' generate loop, it works on fp32 scores, so lower-precision logits are upcast.
    """
    if semantics == "raw":  # ClassifierFreeGuidanceLogitsProcessor on the two halves
        return lambda c, u, g: u.float() + (c.float() - u.float()) * g
    if semantics == "normalized":  # UnbatchedClassifierFreeGuidanceLogitsProcessor
        def unbatched(c, u, g):
            scores = torch.nn.functional.log_softmax(c.float(), dim=-1)
            uncond = torch.nn.functional.log_softmax(u.float(), dim=-1)
            return g * (scores - uncond) + uncond
        return unbatched
    return None
