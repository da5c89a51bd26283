"""One request's guidance and sampling parameters, validated once for every front end (the
transformers-engine server, the vLLM integration, anything that queues requests)."""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from .processors import MAX_TEMPERATURE, MIN_TEMPERATURE

# |γ| beyond this is no longer guidance but the difference of the branches alone (and the CLI's bound).
MAX_GUIDANCE_SCALE = 1e6


class ParamError(ValueError):
    """A bad parameter: `param` names it (as an HTTP front end reports it), the message says why."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param} {message}")
        self.param = param


def _real(name, value, low, high, *, low_open=False, allow_none=False):
    if value is None and allow_none:
        return None
    try:
        finite = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    except OverflowError:  # an integer beyond float range
        finite = False
    if not finite:
        raise ParamError(name, f"must be a finite number, got {_short(value)}")
    if value > high or value < low or (low_open and value == low):
        raise ParamError(name, f"must be in {'(' if low_open else '['}{low:g}, {high:g}], got {_short(value)}")
    return float(value)


def _short(value, limit=40):
    """`repr(value)` cut to `limit` characters: a client may send a number of thousands of digits."""
    if isinstance(value, int) and abs(value) >= 10**limit:  # repr of over 4,300 digits raises
        return f"an integer of {len(str(value))} digits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _integer(name, value, low, high, *, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ParamError(name, f"must be an integer, got {_short(value)}")
    if not low <= value <= high:
        raise ParamError(name, f"must be in [{low}, {high}], got {_short(value)}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class GuidanceParams:
    """Guidance and sampling of one request, checked on construction (`ParamError` names the field).

    `guidance_scale` γ and `mix` α follow `cfg_triton.sample` (`mix=None`: normalized CFG). γ = 1
    without a mix is no guidance: such a request runs as one sequence. `temperature=0` is greedy;
    otherwise it lies in [1e-6, 1e6]. `top_k`, `top_p`, `min_p` are off when None (and at 0, 1, 0,
    the values clients send for "off"). `seed` keys the counter-based noise (None: the front end
    draws one); `max_new_tokens` >= 1 bounds the completion.
    """

    guidance_scale: float = 1.0
    mix: float | None = None
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None
    max_new_tokens: int = 16

    def __post_init__(self):
        fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        fix("guidance_scale", _real("guidance_scale", self.guidance_scale, -MAX_GUIDANCE_SCALE,
                                    MAX_GUIDANCE_SCALE))
        fix("mix", _real("mix", self.mix, 0.0, 1.0, allow_none=True))
        temperature = _real("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        if 0 < temperature < MIN_TEMPERATURE:
            raise ParamError("temperature", f"must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, "
                                            f"{MAX_TEMPERATURE:g}], got {temperature!r}")
        fix("temperature", temperature)
        top_k = _integer("top_k", self.top_k, 0, 2**62, allow_none=True)
        fix("top_k", top_k or None)
        top_p = _real("top_p", self.top_p, 0.0, 1.0, low_open=True, allow_none=True)
        fix("top_p", None if top_p == 1.0 else top_p)
        min_p = _real("min_p", self.min_p, 0.0, 1.0, allow_none=True)
        fix("min_p", min_p or None)
        fix("seed", _integer("seed", self.seed, -(2**63), 2**63 - 1, allow_none=True))
        fix("max_new_tokens", _integer("max_new_tokens", self.max_new_tokens, 1, 2**31 - 1))

    @property
    def guided(self) -> bool:
        """Whether the request needs its unconditional branch."""
        return not (self.guidance_scale == 1.0 and self.mix is None)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generate_kwargs(self) -> dict:
        """The matching keyword arguments of `cfg_triton.generate` (seed included when set)."""
        kwargs = dict(guidance_scale=self.guidance_scale, mix=self.mix,
                      max_new_tokens=self.max_new_tokens, seed=self.seed, do_sample=not self.greedy)
        if not self.greedy:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                          min_p=self.min_p)
        return kwargs


def sample_requests(cond, uncond, params: list[GuidanceParams], seeds, steps, *, normalized: bool,
                    guided=None):
    """One `cfg_triton.sample` call over rows of different requests: row r with `params[r]`.

    `cond`, `uncond`: `[N, V]` logits; `normalized`: no row has a mix (`sample` takes a mix for
    every row or none, so the two modes are separate calls); `guided`: per-row flags, a False row
    drawn without guidance (γ = 1, α = 1: its `uncond` row is not used). The noise is keyed by
    (`seeds[r]`, row 0, `steps[r]`), so a request draws the same wherever the batch puts it.
    Returns the `[N]` token ids.
    """
    from .sampling import sample

    def column(values, dtype=torch.float32):
        return torch.tensor(values, dtype=dtype, device=cond.device)

    guided = [True] * len(params) if guided is None else guided
    gamma = column([p.guidance_scale if g else 1.0 for p, g in zip(params, guided)])
    mix = None if normalized else column([p.mix if g else 1.0 for p, g in zip(params, guided)])
    filters = {}
    if any(p.top_k for p in params):
        filters["top_k"] = column([p.top_k or 0 for p in params], torch.int64)
    if any(p.top_p for p in params):
        filters["top_p"] = column([p.top_p or 1.0 for p in params])
    if any(p.min_p for p in params):
        filters["min_p"] = column([p.min_p or 0.0 for p in params])
    return sample(cond, uncond, gamma, mix=mix, temperature=column([p.temperature for p in params]),
                  seed=column(seeds, torch.int64), step=column(steps, torch.int64), row=0, **filters)
