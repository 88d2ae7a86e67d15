"""The sim engine: deterministic tokens, latency model, batching, abort, resume, PD."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from cplane.schemas.messages import FinishReason
from cplane.schemas.settings import SimSettings
from cplane.workers.engines.base import Delta, Engine, EngineInputError, EngineRequest
from cplane.workers.engines.sim import SimEngine, token_text
from tests.waiting import until


@pytest.fixture
async def engine() -> AsyncIterator[SimEngine]:
    eng = SimEngine(SimSettings(decode_a_ms=2.0, prefill_a_ms=1.0), model="m")
    await eng.start()
    yield eng
    await eng.shutdown()


async def run(eng: SimEngine, req: EngineRequest) -> tuple[list[int], Delta]:
    ids: list[int] = []
    last = None
    async for d in eng.generate(req):
        ids += d.token_ids
        last = d
    assert last is not None
    return ids, last


def test_sim_implements_the_engine_protocol() -> None:
    assert isinstance(SimEngine(SimSettings()), Engine)


def greedy(request_id: str, **kw: object) -> EngineRequest:
    """A request whose tokens are deterministic (temperature 0)."""
    return EngineRequest(request_id=request_id, temperature=0.0, **kw)  # type: ignore[arg-type]


async def test_tokens_are_deterministic(engine: SimEngine) -> None:
    a, last = await run(engine, greedy("a", prompt="hello there", max_tokens=12))
    b, _ = await run(engine, greedy("b", prompt="hello there", max_tokens=12))
    c, _ = await run(engine, greedy("c", prompt="other words", max_tokens=12))
    assert a == b and a != c and len(a) == 12
    assert last.finish_reason is FinishReason.LENGTH and last.prompt_tokens == 2


async def test_sampling_without_seed_differs_between_runs(engine: SimEngine) -> None:
    a, _ = await run(engine, EngineRequest(request_id="a", prompt="hi", max_tokens=20))
    b, _ = await run(engine, EngineRequest(request_id="b", prompt="hi", max_tokens=20))
    assert a != b and len(a) == len(b) == 20  # 20 draws from 32k ids: equal by chance ~never
    s1, _ = await run(engine, EngineRequest(request_id="s1", prompt="hi", max_tokens=20, seed=7))
    s2, _ = await run(engine, EngineRequest(request_id="s2", prompt="hi", max_tokens=20, seed=7))
    assert s1 == s2  # a seed makes sampling repeatable


async def test_resume_continues_the_same_sequence(engine: SimEngine) -> None:
    full, _ = await run(engine, greedy("f", prompt="p q r", max_tokens=10))
    rest, _ = await run(engine, greedy("r", prompt="p q r", max_tokens=10,
                                       resume_token_ids=full[:4]))
    assert rest == full[4:]


async def test_prefill_then_decode_equals_unified(engine: SimEngine) -> None:
    full, _ = await run(engine, greedy("u", prompt="a b c d", max_tokens=8))
    first, pre = await run(engine, greedy("p", prompt="a b c d", max_tokens=8,
                                          prefill_only=True))
    assert first == full[:1] and pre.kv_transfer_params is not None
    rest, dec = await run(engine, greedy(
        "d", prompt="a b c d", max_tokens=8, resume_token_ids=first,
        kv_transfer_params=pre.kv_transfer_params))
    assert first + rest == full
    assert dec.cached_prompt_tokens == 4  # the KV "moved": no prefill on the decode side


async def test_latency_model_prefill_grows_with_prompt() -> None:
    eng = SimEngine(SimSettings(prefill_a_ms=1.0, prefill_b_ms=0.01, decode_a_ms=1.0))
    await eng.start()
    try:
        async def ttft(n_words: int) -> float:
            t0 = time.perf_counter()
            async for _ in eng.generate(EngineRequest(request_id=f"t{n_words}",
                                                      prompt="w " * n_words, max_tokens=1)):
                break
            return time.perf_counter() - t0
        assert await ttft(8000) > await ttft(10) + 0.05  # 80 ms of modelled prefill
    finally:
        await eng.shutdown()


async def test_continuous_batching_runs_requests_together(engine: SimEngine) -> None:
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(run(engine, EngineRequest(
        request_id=f"b{i}", prompt="x", max_tokens=20)) for i in range(16)))
    batched = time.perf_counter() - t0
    assert all(len(ids) == 20 for ids, _ in outs)
    assert batched < 16 * 20 * 0.002 / 2  # far below running them one by one


async def test_abort_frees_the_slot(engine: SimEngine) -> None:
    async def consume() -> Delta:
        last = None
        async for d in engine.generate(EngineRequest(request_id="long", prompt="x",
                                                     max_tokens=10_000)):
            last = d
        assert last is not None
        return last

    task = asyncio.create_task(consume())
    await until(lambda: engine.stats().running == 1, 2, "the sequence to start")
    assert engine.stats().kv_usage > 0
    await engine.abort("long")
    last = await asyncio.wait_for(task, 2)
    assert last.finish_reason is FinishReason.CANCELLED
    assert engine.stats().running == 0 and engine.stats().kv_usage == 0


async def test_bad_prompts(engine: SimEngine) -> None:
    with pytest.raises(EngineInputError):
        await run(engine, EngineRequest(request_id="x", max_tokens=3))
    with pytest.raises(EngineInputError) as exc:
        await run(engine, EngineRequest(request_id="y", prompt_token_ids=[1] * 200_000))
    assert exc.value.code == "prompt_too_long"
    with pytest.raises(EngineInputError) as exc:
        await run(engine, EngineRequest(request_id="z", prompt="a b c d", max_prompt_tokens=3))
    assert exc.value.code == "prompt_too_long"


async def test_stop_strings_and_stats(engine: SimEngine) -> None:
    ids, _ = await run(engine, greedy("s", prompt="x", max_tokens=50))
    text = "".join(token_text(t) for t in ids)
    word = text.split()[3]
    ids2, last = await run(engine, greedy("s2", prompt="x", max_tokens=50, stop=[word]))
    assert last.finish_reason is FinishReason.STOP and len(ids2) < 50
    assert engine.stats().gen_tokens_per_s > 0


async def test_zero_cost_hands_over_a_whole_output_at_once() -> None:
    """No time passes between free steps: a short output is one delta, the same
    tokens as a paced engine's; a long one still comes in several (the loop turns)."""
    free = SimEngine(SimSettings(zero_cost=True), model="m")
    paced = SimEngine(SimSettings(decode_a_ms=0.5, prefill_a_ms=0.5), model="m")
    for eng in (free, paced):
        await eng.start()
    try:
        deltas = [d async for d in free.generate(greedy("z", prompt="hi there", max_tokens=30))]
        assert len(deltas) == 1 and len(deltas[0].token_ids) == 30
        assert deltas[0].finish_reason is FinishReason.LENGTH and deltas[0].prompt_tokens == 2
        same, _ = await run(paced, greedy("p", prompt="hi there", max_tokens=30))
        assert same == deltas[0].token_ids
        # 8 x 1000 tokens exceed one turn's bound (4096): more than one delta each,
        # yet every token arrives, in order.
        many = await asyncio.gather(*(collect_deltas(free, greedy(f"l{i}", prompt="x",
                                                                  max_tokens=1000))
                                      for i in range(8)))
        assert all(sum(len(d.token_ids) for d in ds) == 1000 for ds in many)
        assert all(1 < len(ds) < 1000 for ds in many)
    finally:
        for eng in (free, paced):
            await eng.shutdown()


async def collect_deltas(eng: SimEngine, req: EngineRequest) -> list[Delta]:
    return [d async for d in eng.generate(req)]
