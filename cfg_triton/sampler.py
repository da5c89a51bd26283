"""CFG generation for any transformers causal LM: a prefill, a decode step, a stopping rule."""
from __future__ import annotations

import torch

from .lm import forward_last, narrow_linears, positions
from .ops import guidance
from .processors import warp_scores


def _left_pad(ids, mask, length):
    """Left-pads `[B, T]` ids and mask to `length` columns (with token 0: masked, but a valid id)."""
    extra = length - ids.shape[1]
    if extra == 0:
        return ids, mask
    return (torch.cat([ids.new_zeros((ids.shape[0], extra)), ids], dim=1),
            torch.cat([mask.new_zeros((mask.shape[0], extra)), mask], dim=1))


class _Branches:
    """The conditional and unconditional inputs, run as one `[2B]` batch or as two `[B]` batches."""

    def __init__(self, model, cond, uncond, batched):
        self.model, self.batched = model, batched
        if batched:
            length = max(cond[0].shape[1], uncond[0].shape[1])
            cond, uncond = _left_pad(*cond, length), _left_pad(*uncond, length)
            self.inputs = [(torch.cat([cond[0], uncond[0]]), torch.cat([cond[1], uncond[1]]))]
        else:
            self.inputs = [cond, uncond]
        self.caches = [None] * len(self.inputs)
        self.masks = [mask for _, mask in self.inputs]

    def logits(self, ids=None):
        """Prefill when `ids` is None, else one decode step with `ids` `[B, 1]`: (cond, uncond) logits."""
        outs = []
        for i, (first_ids, _) in enumerate(self.inputs):
            if ids is None:
                step_ids, pos = first_ids, positions(self.masks[i])
            else:
                step_ids = torch.cat([ids, ids]) if self.batched else ids
                self.masks[i] = torch.cat([self.masks[i], self.masks[i].new_ones(step_ids.shape)], dim=1)
                pos = self.masks[i].sum(-1, keepdim=True) - 1
            logits, self.caches[i] = forward_last(self.model, step_ids, self.masks[i], pos,
                                                  self.caches[i])
            outs.append(logits)
        return outs[0].chunk(2) if self.batched else outs


def _as_list(token_ids):
    if token_ids is None:
        return []
    return [int(t) for t in (token_ids if isinstance(token_ids, (list, tuple)) else [token_ids])]


@torch.inference_mode()
def generate(model, input_ids, attention_mask=None, *, negative_input_ids=None,
             negative_attention_mask=None, guidance_scale=1.5, mix=None, mode="batched",
             max_new_tokens=64, min_new_tokens=0, do_sample=False, temperature=1.0, top_k=None,
             top_p=None, eos_token_id=None, pad_token_id=None, generator=None, streamer=None):
    """Generates with classifier-free guidance; returns `[B, T + n]` ids, the prompt then new tokens.

    `input_ids`/`attention_mask`: left-padded prompts `[B, T]`. The unconditional branch is
    `negative_input_ids` (`[B, T']`, left-padded, with its mask) or, by default, each prompt's last
    token. Each step the guided scores are `cfg_triton.guidance(cond, uncond, guidance_scale,
    mix=mix)` (normalized CFG; interpolated when `mix` is set), then `min_new_tokens`, temperature,
    top-k and top-p apply in that order; greedy unless `do_sample`. Both branches get the chosen
    token. `mode="batched"` runs both branches as one `[2B]` forward; `"sequential"` runs two `[B]`
    forwards with separate caches (less peak memory). Finished rows are padded with `pad_token_id`;
    EOS and pad default to the model's generation config. `streamer` gets `put(ids)` / `end()`.
    """
    branches, eos, pad_id = _prepare(model, input_ids, attention_mask, negative_input_ids,
                                     negative_attention_mask, mode, max_new_tokens, min_new_tokens,
                                     eos_token_id, pad_token_id)
    eos_t = torch.tensor(eos, device=input_ids.device, dtype=input_ids.dtype)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens = []
    if streamer is not None:
        streamer.put(input_ids.cpu())
    with narrow_linears(model):
        cond, uncond = branches.logits()
        for step in range(max_new_tokens):
            scores = guidance(cond, uncond, guidance_scale, mix=mix)
            if step < min_new_tokens and eos:
                scores[:, eos_t] = float("-inf")
            if do_sample:
                probs = warp_scores(scores, temperature, top_k, top_p).softmax(-1)
                next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                next_ids = scores.argmax(-1)
            # Finished rows show pad but keep feeding the model a real token: any pad id is safe.
            shown = torch.where(finished, pad_id, next_ids)
            tokens.append(shown)
            if streamer is not None:
                streamer.put(shown.cpu())
            finished |= torch.isin(shown, eos_t)
            if bool(finished.all()) or step + 1 == max_new_tokens:
                break
            cond, uncond = branches.logits(next_ids[:, None])
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids] + [t[:, None] for t in tokens], dim=1)


def _prepare(model, input_ids, attention_mask, negative_input_ids, negative_attention_mask, mode,
             max_new_tokens, min_new_tokens, eos_token_id, pad_token_id):
    """Validates `generate`'s arguments, fills in defaults; returns (branches, eos ids, pad id)."""
    if mode not in ("batched", "sequential"):
        raise ValueError(f"mode must be 'batched' or 'sequential', got {mode!r}")
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [B, T] tensor, got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0 or min_new_tokens < 0:
        raise ValueError("max_new_tokens and min_new_tokens must be >= 0")
    config = getattr(model, "generation_config", None)
    eos = _as_list(eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None))
    pad_id = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    pad_id = pad_id if pad_id is not None else (eos[0] if eos else 0)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if negative_input_ids is None:  # transformers' default: the prompt's last token
        negative_input_ids = input_ids[:, -1:]
        negative_attention_mask = torch.ones_like(negative_input_ids)
    elif negative_attention_mask is None:
        negative_attention_mask = torch.ones_like(negative_input_ids)
    if negative_input_ids.shape[0] != input_ids.shape[0]:
        raise ValueError("negative_input_ids must have one row per prompt")
    branches = _Branches(model, (input_ids, attention_mask), (negative_input_ids, negative_attention_mask),
                         mode == "batched")
    return branches, eos, pad_id
