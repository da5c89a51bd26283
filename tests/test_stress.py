"""The serving engines' liveness contract under random schedules (tests/stress.py): tiny and odd
limits, random arrivals and cancellations. Every schedule must keep these invariants: every
request ends (with its tokens, a refusal at submission, or by its cancellation) within a bound;
finished guided requests equal `cfg_triton.generate` token for token, and cancelled ones are a
prefix of it; no token is drawn unguided; the cache and the engine's bookkeeping are empty
afterwards; and the engine answers a new request.

The transformers engine runs the tiny random Llama (fast, peaked: greedy and seeded draws do not
hinge on rounding). The default run plays a few dozen schedules; `-m slow` plays 200 or more.
"""
import asyncio
import os
import time

import pytest
import torch

from cfg_triton import generate
from cfg_triton.params import GuidanceParams
from helpers import environment
from stress import draw, play

SHORT, LONG = int(os.environ.get("CFG_TRITON_STRESS", 24)), 200
FIRST = int(os.environ.get("CFG_TRITON_STRESS_FIRST", 0))  # to replay a failing seed


class _NoTokenizer:  # the engine reads only the EOS id (the tiny Llama has none)
    eos_token_id = None


@pytest.fixture(scope="module", autouse=True)
def torch_path():
    with environment("TRITON_INTERPRET", "0"):
        yield


def _reference(model, item, cache):
    key = (tuple(item.prompt), tuple(item.negative or ()), item.params)
    if key not in cache:
        neg = None if item.negative is None or not item.params.guided else torch.tensor([item.negative])
        cache[key] = generate(model, torch.tensor([item.prompt]), negative_input_ids=neg,
                              **item.params.generate_kwargs())[0, len(item.prompt):].tolist()
    return cache[key]


def _idle(engine, timeout=10.0):
    """Waits until the engine holds no sequence; returns what is left of its bookkeeping."""
    scheduler = engine._scheduler
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = (engine.busy_sequences(), set(engine._requests), set(scheduler.active_requests),
                set(scheduler.waiting_requests))
        if not any(left):
            return None
        time.sleep(0.02)
    return left


def _play_transformers(model, seed, cache):
    from cfg_triton.continuous import TransformersEngine

    schedule = draw(seed, model.config.vocab_size)
    # Before the engine starts: its thread runs the same model (and may still finish a step that
    # a cancellation overtook while the results are checked).
    expected = [_reference(model, item, cache) for item in schedule.items]
    engine = TransformersEngine(model, _NoTokenizer(), **schedule.limits)
    try:
        results = asyncio.run(play(engine, schedule, timeout=60))
        for item, (status, tokens), expected in zip(schedule.items, results, expected):
            where = f"seed {seed}, {schedule.limits}, {item}"
            assert status in ("done", "cancelled", "refused"), where
            if status == "refused":
                continue
            if status == "done":
                assert tokens == expected, where
            else:
                assert tokens == expected[: len(tokens)], where
        assert engine.counters["degraded_tokens"] == 0, seed
        steps = engine.counters["steps"]
        assert _idle(engine) is None, (seed, _idle(engine, 0))
        # A cancellation takes effect at the next step: a step already scheduled may still run.
        assert engine.counters["steps"] - steps <= 1, (seed, "sequences outlived their request")
        after = GuidanceParams(guidance_scale=1.5, max_new_tokens=2)
        last = asyncio.run(play(engine, type(schedule)(seed, {}, [type(schedule.items[0])(
            [1, 2], None, after, 0.0, None)]), timeout=30))
        assert last[0][0] == "done", seed
        return [status for status, _ in results]
    finally:
        engine.stop()


@pytest.mark.model
def test_transformers_engine_random_schedules(tiny_llama):
    statuses, cache = [], {}
    for seed in range(FIRST, FIRST + SHORT):
        statuses += _play_transformers(tiny_llama, seed, cache)
    assert {"done", "cancelled"} <= set(statuses)


@pytest.mark.model
def test_transformers_engine_schedule_that_stopped_the_offloading_engine(tiny_llama):
    """Schedule 52 (8 pages of 8 tokens, pairs that fit alone but not together): the engine that
    admitted pairs by their token sum and offloaded under pressure died there ("No requests can
    be scheduled and no requests can be offloaded"), failing every request."""
    assert "done" in _play_transformers(tiny_llama, 52, {})


@pytest.mark.slow
def test_transformers_engine_random_schedules_long(tiny_llama):
    statuses, cache = [], {}
    for seed in range(1000, 1000 + LONG):
        statuses += _play_transformers(tiny_llama, seed, cache)
    assert {"done", "cancelled", "refused"} <= set(statuses)
