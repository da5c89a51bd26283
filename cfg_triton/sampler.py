"""CFG generation for any transformers causal LM: a prefill, a decode step, a stopping rule."""
from __future__ import annotations

import contextlib
import functools
import numbers
import warnings

import torch

from .lm import forward_last, give_back_cache, narrow_linears, positions, take_static_cache
from .processors import check_warpers
from .sampling import sample


def _left_pad(ids, mask, length):
    """Left-pads `[B, T]` ids and mask to `length` columns (with token 0: masked, but a valid id)."""
    extra = length - ids.shape[1]
    if extra == 0:
        return ids, mask
    return (torch.cat([ids.new_zeros((ids.shape[0], extra)), ids], dim=1),
            torch.cat([mask.new_zeros((mask.shape[0], extra)), mask], dim=1))


class _Branches:
    """The conditional and unconditional inputs, run as one `[2B]` batch or as two `[B]` batches;
    `uncond=None` runs the conditional branch alone (no guidance: both "branches" are it).

    With `new_tokens` set, each branch gets a transformers `StaticCache` and a mask of its final
    length, so every decode step has the same shapes and addresses: `decode` can then be compiled,
    and on CUDA replayed as a graph. Otherwise caches and masks grow step by step.
    """

    def __init__(self, model, cond, uncond, batched, new_tokens=None):
        self.model, self.batched = model, batched and uncond is not None
        if uncond is None:
            self.inputs = [cond]
        elif batched:
            length = max(cond[0].shape[1], uncond[0].shape[1])
            cond, uncond = _left_pad(*cond, length), _left_pad(*uncond, length)
            self.inputs = [(torch.cat([cond[0], uncond[0]]), torch.cat([cond[1], uncond[1]]))]
        else:
            self.inputs = [cond, uncond]
        self.seen = [ids.shape[1] for ids, _ in self.inputs]  # columns filled so far, per branch
        # The cache slot a step writes, counted on the device: no host-to-device copy per step.
        self.slots = [torch.full((1,), ids.shape[1] - 1, device=ids.device) for ids, _ in self.inputs]
        if new_tokens is None:
            self.shapes, self.caches = [], [None] * len(self.inputs)
            self.masks = [mask for _, mask in self.inputs]
        else:
            self.shapes = [(ids.shape[0], ids.shape[1] + new_tokens) for ids, _ in self.inputs]
            self.caches = [take_static_cache(model, *shape) for shape in self.shapes]
            self.masks = [torch.cat([mask, mask.new_zeros((mask.shape[0], new_tokens))], dim=1)
                          for _, mask in self.inputs]

    def release(self):
        """Hands static caches back for the next generation of the same shape."""
        for shape, cache in zip(self.shapes, self.caches):
            give_back_cache(self.model, *shape, cache)
        self.caches = []

    def prefill(self):
        """Runs the prompts; returns the (cond, uncond) logits of their last positions."""
        outs = []
        for i, (ids, _) in enumerate(self.inputs):
            mask = self.masks[i]
            slots = torch.arange(ids.shape[1], device=ids.device)
            logits, self.caches[i] = forward_last(self.model, ids, mask, positions(mask[:, : ids.shape[1]]),
                                                  self.caches[i], slots)
            outs.append(logits)
        return _pair(outs, self.batched)

    def advance(self):
        """Opens one more column in every branch's mask: (masks, positions, cache slots) of a step."""
        position_ids = []
        for i, mask in enumerate(self.masks):
            if mask.shape[1] == self.seen[i]:  # growing: append a column
                self.masks[i] = mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            else:  # static: the column exists, set it
                mask[:, self.seen[i]] = 1
            position_ids.append(mask.sum(-1, keepdim=True) - 1)
            self.slots[i].add_(1)
            self.seen[i] += 1
        return self.masks, position_ids, self.slots


def decode(model, batched, caches, ids, masks, position_ids, slots):
    """One decode step of both branches: forward on `ids` `[B]` -> (cond, uncond) `[B, V]` logits.

    A pure function of its tensor arguments (the static caches are updated in place), so that it
    compiles as one graph and, on CUDA, replays as one CUDA graph.
    """
    step_ids = (torch.cat([ids, ids]) if batched else ids)[:, None]
    logits = [forward_last(model, step_ids, mask, pos, cache, slot)[0]
              for mask, pos, cache, slot in zip(masks, position_ids, caches, slots)]
    return _pair(logits, batched)


def _pair(logits, batched):
    """(cond, uncond) from the branches' logits: a stacked `[2B]` batch, two `[B]` batches, or one
    (unguided: cond serves as both, which guidance at γ = 1 reduces to log_softmax(cond))."""
    if batched:
        return logits[0].chunk(2)
    return (logits[0], logits[-1])


@functools.lru_cache(maxsize=None)
def _compiled_decode(device_type: str):
    # CUDA: "reduce-overhead" captures the step as a CUDA graph, where a small model's decode step
    # is otherwise bound by Python and kernel launches. Elsewhere inductor compiles it plainly.
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(decode, fullgraph=True, dynamic=False, mode=mode)


def _as_list(token_ids):
    if token_ids is None:
        return []
    return [int(t) for t in (token_ids if isinstance(token_ids, (list, tuple)) else [token_ids])]


@torch.inference_mode()
def generate(model, input_ids, attention_mask=None, *, negative_input_ids=None,
             negative_attention_mask=None, guidance_scale=1.5, mix=None, mode="batched",
             max_new_tokens=64, min_new_tokens=0, do_sample=False, temperature=1.0, top_k=None,
             top_p=None, min_p=None, eos_token_id=None, pad_token_id=None, seed=None, generator=None,
             streamer=None, compile=False):
    """Generates with classifier-free guidance; returns `[B, T + n]` ids, the prompt then new tokens.

    `input_ids`/`attention_mask`: prompts `[B, T]`, padded on either side (the mask says where; each
    row's tokens are moved to the right end). The unconditional branch is `negative_input_ids`
    (`[B, T']` with its mask; an empty one means the BOS token) or, by default, each prompt's last
    token. The result repeats `input_ids` as given. Each step draws the next token with
    `cfg_triton.sample(cond, uncond, guidance_scale, mix=mix, ...)`: the guided scores (normalized
    CFG; interpolated when `mix` is set), `min_new_tokens` (EOS masked in the conditional branch),
    then temperature, top-k, top-p and min-p in that order; greedy unless `do_sample`. Both
    branches get the chosen token. `mode="batched"` runs both branches as one `[2B]` forward;
    `"sequential"` runs two `[B]` forwards with separate caches (less peak memory). Finished rows
    are padded with `pad_token_id`; EOS and pad default to the model's generation config.
    `streamer` gets `put(ids)` / `end()`.

    Sampling is reproducible by `seed`: step `t` of row `r` draws with the noise keyed by
    (seed, r, t), on every device and with or without `compile`. Without a seed one is drawn from
    `generator` (or torch's global generator), so a seeded generator still reproduces a run; the
    generator is no longer consumed step by step, so its draws differ from releases before `seed`.

    `guidance_scale=1` without `mix` is no guidance: only the conditional branch runs (plain
    decoding through this loop; a negative prompt is then unused, with a warning).

    `compile=True` runs the decode step (both forwards) with static KV caches
    through `torch.compile`, as a CUDA graph on CUDA ("reduce-overhead"); the prefill stays eager.
    It compiles once per model, batch shape and length, so it pays off for repeated calls of one
    shape. Tokens are the same as eager: the draw runs outside the compiled step with the same keys.
    """
    if do_sample:
        check_warpers(temperature, top_k, top_p, min_p)  # before any model work
    seed = _seed(seed, generator)
    # γ = 1 without a mix is the conditional distribution itself: the unconditional branch is
    # skipped, which makes this also the loop's own unguided baseline.
    unguided = mix is None and isinstance(guidance_scale, numbers.Real) and guidance_scale == 1
    branches, eos, pad_id = _prepare(model, input_ids, attention_mask, negative_input_ids,
                                     negative_attention_mask, mode, max_new_tokens, min_new_tokens,
                                     eos_token_id, pad_token_id, compile, unguided)
    step_fn = _compiled_decode(input_ids.device.type) if compile else decode
    graphs = compile and input_ids.device.type == "cuda"
    eos_t = torch.tensor(eos, device=input_ids.device, dtype=input_ids.dtype)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens = []
    if streamer is not None:
        streamer.put(input_ids.cpu())
    with contextlib.ExitStack() as stack:
        stack.callback(branches.release)
        if not compile:
            stack.enter_context(narrow_linears(model))
        cond, uncond = branches.prefill()
        warp = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p) if do_sample \
            else dict(temperature=0.0)
        for step in range(max_new_tokens):
            if step < min_new_tokens and eos:
                cond = cond.index_fill(1, eos_t, float("-inf"))  # a copy: never the model's buffer
            next_ids = sample(cond, uncond, guidance_scale, mix=mix, seed=seed, step=step, **warp)
            # Finished rows show pad but keep feeding the model a real token: any pad id is safe.
            shown = torch.where(finished, pad_id, next_ids)
            tokens.append(shown)
            if streamer is not None:
                streamer.put(shown.cpu())
            finished |= torch.isin(shown, eos_t)
            if bool(finished.all()) or step + 1 == max_new_tokens:
                break
            if graphs:  # the last step's outputs have been consumed: the graph may overwrite them
                torch.compiler.cudagraph_mark_step_begin()
            cond, uncond = step_fn(model, branches.batched, branches.caches, next_ids, *branches.advance())
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids] + [t[:, None] for t in tokens], dim=1)


def _seed(seed, generator) -> int:
    """The sampling seed: `seed` itself, else one drawn from `generator` (or torch's global one)."""
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
        if not -(2**63) <= seed < 2**63:
            raise ValueError(f"seed must fit in int64, got {seed}")
        return int(seed)
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


def _prepare(model, input_ids, attention_mask, negative_input_ids, negative_attention_mask, mode,
             max_new_tokens, min_new_tokens, eos_token_id, pad_token_id, compile=False,
             unguided=False):
    """Validates `generate`'s arguments before any model work, fills in defaults, left-aligns
    right-padded rows; returns (branches, eos ids, pad id)."""
    if mode not in ("batched", "sequential"):
        raise ValueError(f"mode must be 'batched' or 'sequential', got {mode!r}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    for name, value in (("max_new_tokens", max_new_tokens), ("min_new_tokens", min_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    config = getattr(model, "generation_config", None)
    eos = _as_list(eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None))
    pad_id = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    pad_id = pad_id if pad_id is not None else (eos[0] if eos else 0)
    input_ids, attention_mask = _checked_tokens("input_ids", input_ids, attention_mask, pad_id)
    batch = input_ids.shape[0]
    if unguided:
        if negative_input_ids is not None or negative_attention_mask is not None:
            warnings.warn("guidance_scale=1 without mix is no guidance: the negative prompt is "
                          "not used", stacklevel=3)
        negative_input_ids = negative_attention_mask = None
    elif negative_input_ids is None:
        if negative_attention_mask is not None:
            raise ValueError("negative_attention_mask was given without negative_input_ids")
        # transformers' default: each prompt's last token (the prompt is left-aligned by now)
        negative_input_ids, negative_attention_mask = input_ids[:, -1:], attention_mask[:, -1:]
    else:
        negative_input_ids, negative_attention_mask = _checked_tokens(
            "negative_input_ids", negative_input_ids, negative_attention_mask, pad_id,
            empty=_bos(model, batch, input_ids))
        if negative_input_ids.shape[0] != batch:
            raise ValueError(f"negative_input_ids must have one row per prompt: {batch} prompts, "
                             f"{negative_input_ids.shape[0]} negative rows")
    uncond = None if unguided else (negative_input_ids, negative_attention_mask)
    branches = _Branches(model, (input_ids, attention_mask), uncond, mode == "batched",
                         max_new_tokens if compile else None)
    return branches, eos, pad_id


def _bos(model, batch, like):
    """`[B, 1]` of the model's BOS token: what an empty negative prompt conditions on, as an empty
    prompt does in the CFG paper. None when the model has no BOS token."""
    bos = getattr(getattr(model, "generation_config", None), "bos_token_id", None)
    if bos is None:
        bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    return None if bos is None else torch.full((batch, 1), int(bos), dtype=like.dtype, device=like.device)


def _checked_tokens(name, ids, mask, pad_id, empty=None):
    """A `[B, T]` id tensor and its mask, checked, with every row's tokens moved to the right end.

    `[B, 0]` ids (an empty prompt) become `empty` where given. Right padding, or any other layout,
    is made left padding by a stable sort on the mask, so each row keeps its token order.
    """
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer torch.Tensor [B, T] (e.g. tokenizer(..., "
                        f"return_tensors='pt').input_ids), got {type(ids).__name__}")
    if ids.dim() != 2 or ids.shape[0] == 0:
        raise ValueError(f"{name} must be a [B, T] tensor with B >= 1, got shape {tuple(ids.shape)}")
    if ids.shape[1] == 0 or (mask is not None and mask.shape == ids.shape and not mask.any(dim=1).all()):
        if empty is None:
            raise ValueError(f"{name} has a row without tokens (T = 0 or an all-zero mask row); "
                             "give every row at least one token")
        if ids.shape[1] == 0 or not mask.any():  # wholly empty: every row conditions on `empty`
            return empty, torch.ones_like(empty)
        # Some rows empty: they get `empty`'s token, the others keep theirs.
        dead = ~mask.bool().any(dim=1, keepdim=True)
        ids = torch.cat([ids, torch.where(dead, empty, pad_id)], dim=1)
        mask = torch.cat([mask, dead.to(mask.dtype)], dim=1)
    if mask is None:
        if ids.shape[0] > 1 and bool(((ids[:, 0] == pad_id) | (ids[:, -1] == pad_id)).any()):
            warnings.warn(f"{name} begins or ends with the pad token {pad_id} in some rows but no "
                          "attention mask was given: padding is then read as text. Pass the "
                          "tokenizer's attention_mask.", stacklevel=4)
        return ids, torch.ones_like(ids)
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        raise ValueError(f"the attention mask of {name} must have its shape {tuple(ids.shape)}, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.device != ids.device:
        raise ValueError(f"{name} is on {ids.device} but its attention mask is on {mask.device}")
    mask = mask.to(torch.long)
    if bool((mask[:, 1:] < mask[:, :-1]).any()):  # not left-padded: move tokens to the right end
        order = torch.sort(mask, dim=1, stable=True).indices
        ids, mask = ids.gather(1, order), mask.gather(1, order)
    return ids, mask
