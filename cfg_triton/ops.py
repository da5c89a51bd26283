"""`cfg_triton.guidance`: validation, the registered torch op, and dispatch to Triton or torch."""
from __future__ import annotations

import functools
import numbers
import os
from typing import Optional

import torch

from . import torch_impl
from .modes import INTERPOLATED, NORMALIZED, RAW

try:  # Triton has wheels for Linux only; elsewhere the torch path serves every device.
    from .kernels import guidance as _kernels
except ImportError:  # pragma: no cover - exercised only where triton is absent
    _kernels = None

_FP32_MAX = torch.finfo(torch.float32).max
_FP64_MAX = torch.finfo(torch.float64).max
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
# The interpreter has no SMs; pretend to have a few so that small batches still split the vocabulary.
_INTERPRETER_SMS = 8


def triton_available() -> bool:
    return _kernels is not None


def uses_triton(t: torch.Tensor) -> bool:
    """Whether `guidance` on tensors like `t` runs the Triton kernels (else the torch path)."""
    if _kernels is None or t.dtype not in _TRITON_FLOATS:
        return False
    # The interpreter flag is read per call: tests switch it per case.
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_SMS


_scratch = {}


def _stats_scratch(device: torch.device, numel: int) -> torch.Tensor:
    """fp32 statistics scratch, reused across calls on one (device, stream).

    Reuse is safe because the statistics are written and read by kernels queued on one stream;
    another stream gets its own buffer. Inside CUDA-graph capture the buffer is a fresh allocation
    from the graph's pool, so a captured graph never shares it with eager calls.
    """
    stream = None
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.empty(numel, dtype=torch.float32, device=device)
        stream = torch.cuda.current_stream(device).cuda_stream
    key = (device, stream)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < numel:
        buf = _scratch[key] = torch.empty(max(numel, 1), dtype=torch.float32, device=device)
    return buf


def _aligned(t) -> bool:
    return t is None or t.data_ptr() % 16 == 0


def _run_triton(cond, uncond, gamma_rows, gamma, mix_rows, mix, mode, out_dtype):
    batch, vocab = cond.shape
    device = cond.device
    out = torch.empty((batch, vocab), dtype=out_dtype, device=device)
    n_splits, split_len = _kernels.plan(batch, vocab, _num_sms(device))
    stats = _stats_scratch(device, batch * n_splits * _kernels.STATS if mode != RAW else 1)
    if not cond.is_cuda:  # the interpreter: no compiled kernel to call directly
        _kernels.launch(cond, uncond, out, stats, mode, gamma, gamma_rows, mix, mix_rows, n_splits,
                        split_len)
        return out
    # Everything Triton specializes on: dtypes, integer arguments, pointer alignment (out and the
    # scratch are fresh allocations, always aligned), and the device whose module is loaded.
    key = (device.index, mode, cond.dtype, out_dtype, batch, vocab, cond.stride(0), uncond.stride(0),
           n_splits, _aligned(cond) and _aligned(uncond), gamma_rows is None, _aligned(gamma_rows),
           mix_rows is None, _aligned(mix_rows))
    if device.index == torch.cuda.current_device():
        _kernels.launch(cond, uncond, out, stats, mode, gamma, gamma_rows, mix, mix_rows, n_splits,
                        split_len, key)
    else:  # launches go to the current device's stream; switch only when it is another device
        with torch.cuda.device(device):
            _kernels.launch(cond, uncond, out, stats, mode, gamma, gamma_rows, mix, mix_rows,
                            n_splits, split_len, key)
    return out


def _guidance_impl(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    gamma_rows: Optional[torch.Tensor],
    gamma: float,
    mix_rows: Optional[torch.Tensor],
    mix: float,
    mode: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    if cond.shape[0] == 0:
        return torch.empty(cond.shape, dtype=out_dtype, device=cond.device)
    if uses_triton(cond):
        return _run_triton(cond, uncond, gamma_rows, gamma, mix_rows, mix, mode, out_dtype)
    g = gamma if gamma_rows is None else gamma_rows[:, None]
    a = mix if mix_rows is None else mix_rows[:, None]
    return torch_impl.guidance(cond, uncond, g, a, mode, out_dtype)


# The registered op is what torch.compile traces; eager calls run `_guidance_impl` directly.
_guidance_op = torch.library.custom_op("cfg_triton::guidance", _guidance_impl, mutates_args=())


@_guidance_op.register_fake
def _(cond, uncond, gamma_rows, gamma, mix_rows, mix, mode, out_dtype):
    return cond.new_empty(cond.shape, dtype=out_dtype)


def _check_logits(cond, uncond) -> None:
    # One compound test for the common case; the detailed messages are built only on failure.
    if not (isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor)
            and cond.dtype in _FLOATS and cond.dtype == uncond.dtype and cond.dim() == 2
            and cond.shape == uncond.shape and cond.device == uncond.device):
        _explain_bad_logits(cond, uncond)
    if torch.is_grad_enabled() and (cond.requires_grad or uncond.requires_grad):
        raise ValueError("guidance is an inference op without a backward; call it under "
                         "torch.no_grad() (or differentiate cfg_triton.reference instead)")


def _explain_bad_logits(cond, uncond) -> None:
    for name, t in (("cond", cond), ("uncond", uncond)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64 logits, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be [B, V] (reshape [B, T, V] to [B*T, V]), got shape "
                             f"{tuple(t.shape)}")
    if cond.dtype != uncond.dtype:
        raise TypeError(f"cond and uncond must share a dtype, got {cond.dtype} and {uncond.dtype}")
    if cond.device != uncond.device:
        raise ValueError(f"cond and uncond must be on one device, got {cond.device} and {uncond.device}")
    if cond.shape[1] != uncond.shape[1]:
        raise ValueError(f"cond and uncond have different vocabularies: V = {cond.shape[1]} and "
                         f"{uncond.shape[1]}")
    raise ValueError(f"cond and uncond have different batch sizes: {cond.shape[0]} and "
                     f"{uncond.shape[0]}")


def _per_row(name: str, value, like: torch.Tensor, unit_interval: bool):
    """A scalar or per-row `[B]` argument -> (float, None) or (0.0, fp32 `[B]` tensor on like's device).

    Values must be representable in the compute dtype (float32, float64 for float64 logits). Values
    of a tensor on an accelerator are not read: that would sync the device and break CUDA-graph
    capture (see `guidance`).
    """
    limit = _FP64_MAX if like.dtype == torch.float64 else _FP32_MAX
    if isinstance(value, (float, int)) and not isinstance(value, bool):
        value = float(value)
        if not -limit <= value <= limit:  # also False for NaN
            raise ValueError(f"{name} must be finite and representable in the compute dtype "
                             f"(|{name}| <= {limit:.4g}), got {value}")
        if unit_interval and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
        return value, None
    if not isinstance(value, torch.Tensor):
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return _per_row(name, float(value), like, unit_interval)  # NumPy and other real scalars
        raise TypeError(f"{name} must be a real number or a [B] tensor, got {type(value).__name__}")
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name} must be a real number or a tensor of real numbers, got {value.dtype}")
    if value.device != like.device:
        raise ValueError(f"{name} is on device {value.device} but the logits are on {like.device}")
    batch = like.shape[0]
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
        raise ValueError(f"{name} must be a scalar or a [B] tensor with B = {batch}, got shape "
                         f"{tuple(value.shape)}")
    rows = value.to(torch.float64 if like.dtype == torch.float64 else torch.float32)
    rows = rows.expand(batch).contiguous()
    if rows.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(torch.isfinite(rows).all()):
            raise ValueError(f"{name} must be finite and representable in the compute dtype "
                             f"(|{name}| <= {limit:.4g})")
        if unit_interval and not bool(((rows >= 0) & (rows <= 1)).all()):
            raise ValueError(f"{name} must be in [0, 1]")
    return 0.0, rows


def checked_inputs(cond, uncond, guidance_scale, mix, normalize):
    """The checks and conventions every op on both branches shares (`guidance`, `token_logprobs`,
    `sample`): `[B, V]` logits -> (cond, uncond with unit last stride, mode, γ, γ rows, α, α rows),
    each parameter as `_per_row` returns it."""
    if mix is not None and not normalize:
        raise ValueError("mix interpolates normalized CFG; it cannot be combined with normalize=False")
    _check_logits(cond, uncond)
    mode = INTERPOLATED if mix is not None else NORMALIZED if normalize else RAW
    gamma, gamma_rows = _per_row("guidance_scale", guidance_scale, cond, unit_interval=False)
    mix_value, mix_rows = (0.0, None) if mix is None else _per_row("mix", mix, cond, unit_interval=True)
    if cond.stride(1) != 1:
        cond = cond.contiguous()
    if uncond.stride(1) != 1:
        uncond = uncond.contiguous()
    return cond, uncond, mode, gamma, gamma_rows, mix_value, mix_rows


def guidance(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale,
    *,
    mix=None,
    normalize: bool = True,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Classifier-free guidance of next-token logits, fused into one read of both branches.

    Args:
        cond: `[B, V]` logits given the prompt; float16, bfloat16, float32 or float64. Rows may be
            strided (`logits[:, -1, :]`, or the halves of a stacked `[2B, V]` tensor) at no copy.
        uncond: `[B, V]` logits of the unconditional or negative-prompt branch; same dtype, device.
        guidance_scale: γ, a real number (Python or NumPy) or a `[B]` tensor (one γ per row); it
            must be finite in the compute dtype (|γ| <= 3.4e38 for float32 math).
        mix: α in [0, 1] (number or `[B]` tensor) for the interpolated semantics, else None.
        normalize: with `mix=None`, whether to normalize (see below).
        out_dtype: dtype of the result (float32 by default; math is float32, float64 for float64).

    Returns `[B, V]` in `out_dtype`, per row, with `cl = log_softmax(cond)`, `ul = log_softmax(uncond)`:
        * `normalize=False, mix=None`: raw CFG `u + γ (c − u)`;
        * `normalize=True, mix=None`: normalized CFG `g = ul + γ (cl − ul)`;
        * `mix=α`: `α · log_softmax(g) + (1 − α) · cl`; at γ = 1 this is `cl` for every α.

    Masked tokens and non-finite input:
        * a token that is `-inf` in `cond` is `-inf` in the output, for every γ and α;
        * a token that is `-inf` only in `uncond` gets no guidance: its unconditional log-probability
          is taken to be its conditional one (`ul_i := cl_i`; raw mode `u_i := c_i`), so its output is
          its conditional score (`c_i` raw, `cl_i` normalized; the interpolated variant then
          renormalizes as usual);
        * a row that is all `-inf` in `cond` comes out all `-inf`;
        * NaN or `+inf` in a row's input makes that row's output NaN (raw mode: that element); it is
          not checked for, so that the op never syncs.

    Tensor γ and α are checked on the CPU only: reading the values of a GPU tensor would sync the
    device and break CUDA-graph capture, so there a non-finite γ gives its row NaN and a mix outside
    [0, 1] is used as given. The Triton path never reads device values; the torch path (CPU, and
    float64 input anywhere) reads one per call to choose its masked-token path.

    An inference op: inputs that require grad raise unless grad mode is off.
    CUDA tensors run the Triton kernels; CPU tensors run the torch path (with `TRITON_INTERPRET=1`
    they run the Triton kernels in Triton's interpreter); float64 always runs the torch path.
    A last dimension that is not contiguous is copied first.
    """
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in _FLOATS:
        raise TypeError(f"out_dtype must be a floating dtype, got {out_dtype}")
    cond, uncond, mode, gamma, gamma_rows, mix_value, mix_rows = checked_inputs(
        cond, uncond, guidance_scale, mix, normalize)
    # The registered op is what torch.compile traces; eager calls skip the dispatcher's overhead
    # (about 12 µs a call, a third of the whole op at B = 1 on a CPU).
    op = _guidance_op if torch.compiler.is_compiling() else _guidance_impl
    return op(cond, uncond, gamma_rows, gamma, mix_rows, mix_value, mode, out_dtype)
