"""Random schedules for the serving engines' liveness contract (tests/test_stress.py).

A schedule is drawn from one seed: the engine's limits (pages, page size, step budget, sequence
limit) and a few requests (random prompts and negative prompts of 1 to 80 tokens, some identical,
some one token, the default unconditional input, unguided ones), each with an arrival delay and
maybe a cancellation (the client closes the request after some tokens, or before any). `run`
plays it against an engine and checks the invariants that every schedule must keep.
"""
from __future__ import annotations

import asyncio
import dataclasses
import random

from cfg_triton.params import GuidanceParams


@dataclasses.dataclass
class Item:
    prompt: list[int]
    negative: list[int] | None
    params: GuidanceParams
    delay: float          # seconds after the schedule starts
    cancel_after: int | None  # close after this many tokens (0: as soon as it starts); None: never


@dataclasses.dataclass
class Schedule:
    seed: int
    limits: dict          # engine keyword arguments
    items: list[Item]


def draw(seed: int, vocab: int, *, max_prompt=80, max_new=12, max_items=6) -> Schedule:
    rng = random.Random(seed)
    limits = dict(page_size=rng.choice([4, 8, 16]), num_blocks=rng.randint(4, 16) * 2,
                  max_batch_tokens=rng.randint(8, 64), max_requests=rng.randint(2, 7))
    ids = lambda n: [rng.randrange(1, vocab) for _ in range(n)]  # noqa: E731
    items = []
    for _ in range(rng.randint(2, max_items)):
        prompt = ids(rng.choice([1, rng.randint(1, max_prompt)]))
        negative = rng.choice([None, prompt, ids(1), ids(rng.randint(1, max_prompt)), prompt[: len(prompt) // 2] or None])
        sampled = rng.random() < 0.3
        params = GuidanceParams(guidance_scale=rng.choice([1.0, 1.5, 1.5, 3.0]),
                                mix=rng.choice([None, None, 0.7]),
                                temperature=0.8 if sampled else 0.0, top_k=20 if sampled else None,
                                seed=rng.randrange(2**31) if sampled else None,
                                max_new_tokens=rng.randint(1, max_new))
        cancel = rng.choice([None, None, None, 0, rng.randint(1, max_new)])
        items.append(Item(prompt, negative, params, rng.random() * 0.05, cancel))
    return Schedule(seed, limits, items)


async def play(engine, schedule: Schedule, timeout: float):
    """Runs every item; returns per item ("refused" | "cancelled" | "done", tokens). Raises
    TimeoutError when any item has not ended within `timeout` seconds (the liveness contract)."""
    async def one(item: Item):
        await asyncio.sleep(item.delay)
        try:
            engine.check_fits(item.prompt, item.negative, item.params)
        except ValueError:
            return "refused", []
        tokens, outputs = [], engine.generate(item.prompt, item.negative, item.params)
        try:
            if item.cancel_after == 0:  # the client goes before the first token
                first = asyncio.ensure_future(outputs.__anext__())
                await asyncio.sleep(0.001)
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
                return "cancelled", tokens
            async for out in outputs:
                tokens = out.token_ids
                if out.error is not None:
                    return "error", tokens
                if item.cancel_after is not None and len(tokens) >= item.cancel_after and not out.finished:
                    return "cancelled", tokens
            return "done", tokens
        finally:
            await outputs.aclose()

    return await asyncio.wait_for(asyncio.gather(*(one(i) for i in schedule.items)), timeout)
