"""`cfg_triton.score`: teacher-forced guided log-likelihoods of continuations, as the CFG paper
evaluated its zero-shot benchmarks.

Each example is a context and a continuation. The conditional branch reads context + continuation;
the unconditional branch reads a short unconditional context (by default the context's last token)
followed by the same continuation. Each continuation token is scored under the guided distribution
of its position, and the example's score is the sum, with `greedy` set when every continuation
token is the guided argmax (LAMBADA's accuracy).

Memory stays bounded whatever the inputs: examples are batched by a token budget, the model is
asked for the continuation positions' logits only, and `token_logprobs` reduces them to `O(1)` per
position without a guided `[B, T, V]` temporary. The unconditional inputs are batched among
themselves, so they are never padded to the contexts' length.
"""
from __future__ import annotations

import numbers
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from .lm import _forward_params, positions
from .logprobs import token_logprobs
from .sampler import _bos


class Scores(NamedTuple):
    """`logprobs`: float64 `[E]`, each continuation's summed guided log-probability;
    `greedy`: bool `[E]`, whether every continuation token is the guided argmax."""

    logprobs: torch.Tensor
    greedy: torch.Tensor


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), as lm-evaluation-harness splits them for causal LMs.

    Trailing whitespace of the context moves to the continuation, and the pair is encoded as one
    string, so that the continuation's first token is the one the model would read after the
    context (" word" rather than "word"). No special tokens are added.
    """
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    head = tokenizer.encode(context, add_special_tokens=False)
    return head, whole[len(head):]


@torch.inference_mode()
def score(model, tokenizer, contexts: Sequence[str], continuations: Sequence[str], *,
          negative_contexts: Optional[Sequence[str]] = None, guidance_scale=1.5, mix=None,
          normalize: bool = True, batch_size: int = 16, max_batch_tokens: int = 4096,
          max_length: Optional[int] = None) -> Scores:
    """Guided log-likelihood of each continuation given its context (strings).

    `negative_contexts` (strings, one per example) replace the default unconditional context, the
    context's last token; an empty one means the model's BOS token. `guidance_scale`, `mix` and
    `normalize` are as for `guidance` (`normalize=False` is the paper's unnormalized sum of
    `log p_u + γ (log p_c − log p_u)` over raw logits). See `score_tokens` for batching.
    """
    if isinstance(contexts, str) or isinstance(continuations, str):
        raise TypeError("contexts and continuations must be sequences of strings, not one string")
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    pairs = [encode_pair(tokenizer, c, x) for c, x in zip(contexts, continuations)]
    negatives = None
    if negative_contexts is not None:
        if isinstance(negative_contexts, str) or len(negative_contexts) != len(contexts):
            raise ValueError("negative_contexts must hold one string per example")
        negatives = [tokenizer.encode(n, add_special_tokens=False) for n in negative_contexts]
    return score_tokens(model, [p[0] for p in pairs], [p[1] for p in pairs], negatives=negatives,
                        guidance_scale=guidance_scale, mix=mix, normalize=normalize,
                        batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                        max_length=max_length)


def _check_examples(contexts, continuations, negatives):
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    if negatives is not None and len(negatives) != len(contexts):
        raise ValueError(f"{len(negatives)} negative contexts for {len(contexts)} examples")
    for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
        if len(ctx) == 0:
            raise ValueError(f"example {i} has an empty context: its first continuation token has "
                             "nothing to be predicted from (prepend a BOS token)")
        if len(cont) == 0:
            raise ValueError(f"example {i} has an empty continuation")


def _batches(lengths: list[int], cont_lengths: list[int], batch_size: int, max_batch_tokens: int,
             max_logit_rows: int) -> list[list[int]]:
    """Example indices, longest first, cut into batches of at most `batch_size` examples whose
    padded size (examples x longest input) stays within `max_batch_tokens` and whose continuation
    logits (examples x longest continuation) stay within `max_logit_rows` (one example at least)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current, longest, longest_cont = [], [], 0, 0
    for i in order:
        grow = max(longest, lengths[i]), max(longest_cont, cont_lengths[i])
        n = len(current) + 1
        if current and (n > batch_size or n * grow[0] > max_batch_tokens or n * grow[1] > max_logit_rows):
            batches.append(current)
            current, grow = [], (lengths[i], cont_lengths[i])
        current.append(i)
        longest, longest_cont = grow
    if current:
        batches.append(current)
    return batches


def _last_logits(model, rows: list[list[int]], keep: int, device) -> torch.Tensor:
    """`[B, keep, V]` logits of the last `keep` positions of token rows, left-padded into one batch."""
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[j, width - len(r):] = 1
    ids, mask = ids.to(device), mask.to(device)
    kw = {"logits_to_keep": keep} if "logits_to_keep" in _forward_params(type(model)) else {}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False,
                   **kw).logits
    return logits[:, -keep:]


@torch.inference_mode()
def score_tokens(model, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], *,
                 negatives: Optional[Sequence[Sequence[int]]] = None, guidance_scale=1.5, mix=None,
                 normalize: bool = True, batch_size: int = 16, max_batch_tokens: int = 4096,
                 max_length: Optional[int] = None,
                 progress: Optional[Callable[[int], None]] = None) -> Scores:
    """`score` on token ids: `contexts[i]` and `continuations[i]` are lists of ids (both non-empty),
    `negatives[i]` an unconditional context (default `[contexts[i][-1]]`; empty means BOS).

    Batches hold at most `batch_size` examples and `max_batch_tokens` padded input tokens (at least
    one example each), so peak memory is bounded by the budget, not by the longest document.
    Inputs longer than `max_length` (default: the model's `max_position_embeddings`) keep their
    last `max_length` tokens. `guidance_scale=1` without `mix` runs the conditional branch only.
    `progress(n)` is called after each batch with the number of examples it finished.
    """
    _check_examples(contexts, continuations, negatives)
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
        raise TypeError(f"guidance_scale must be a real number, got {type(guidance_scale).__name__}")
    for name, value in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    device = next(model.parameters()).device
    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None) or 2048
    unguided = mix is None and float(guidance_scale) == 1.0
    bos = None
    if negatives is not None and any(len(n) == 0 for n in negatives):
        bos = _bos(model, 1, torch.zeros(1, dtype=torch.long))
        if bos is None:
            raise ValueError("an empty negative context means the BOS token, but the model has none")
        bos = bos[0].tolist()

    cond_rows, uncond_rows = [], []
    for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
        ctx, cont = list(ctx), list(cont)
        if len(cont) > max_length:
            raise ValueError(f"example {i}: its continuation ({len(cont)} tokens) is longer than "
                             f"max_length = {max_length}")
        cond_rows.append((ctx + cont)[-(max_length + 1):-1])
        neg = [ctx[-1]] if negatives is None else (list(negatives[i]) or bos)
        uncond_rows.append((neg + cont)[-(max_length + 1):-1])

    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else model.config.vocab_size
    max_logit_rows = max(1, (1 << 26) // max(vocab, 1))  # 256 MiB of fp32 logits per branch
    cont_lengths = [len(c) for c in continuations]
    logprobs = torch.zeros(len(contexts), dtype=torch.float64)
    greedy = torch.zeros(len(contexts), dtype=torch.bool)
    for batch in _batches([len(r) for r in cond_rows], cont_lengths, batch_size, max_batch_tokens,
                          max_logit_rows):
        keep = max(cont_lengths[i] for i in batch)
        # Continuations end every row (left padding): position t of a row with n continuation
        # tokens predicts continuation token t - (keep - n); earlier positions are padding.
        targets = torch.zeros((len(batch), keep), dtype=torch.long)
        used = torch.zeros((len(batch), keep), dtype=torch.bool)
        for j, i in enumerate(batch):
            targets[j, keep - cont_lengths[i]:] = torch.tensor(continuations[i], dtype=torch.long)
            used[j, keep - cont_lengths[i]:] = True
        cond = _last_logits(model, [cond_rows[i] for i in batch], keep, device)
        uncond = cond if unguided else _last_logits(model, [uncond_rows[i] for i in batch], keep, device)
        lp, top = token_logprobs(cond, uncond, targets.to(device), 1.0 if unguided else guidance_scale,
                                 mix=mix, normalize=normalize)
        lp, top = lp.cpu().double(), top.cpu()
        logprobs[batch] = torch.where(used, lp, 0.0).sum(-1)
        greedy[batch] = (top | ~used).all(-1)
        if progress is not None:
            progress(len(batch))
    return Scores(logprobs, greedy)
