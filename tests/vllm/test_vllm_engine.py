"""VllmEngine against real vLLM (CPU wheel) on a tiny random Llama; no NATS.

The engines are session fixtures (tests/vllm_fixtures.py). Every test uses
its own prompts and request ids, so tests do not depend on their order.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import vllm  # noqa: F401 - these tests fail, never skip, where vLLM is missing

from cplane.schemas.messages import ChatMessage, ErrorCode, FinishReason
from cplane.workers.engines.base import (
    CONNECTOR_KEY,
    Delta,
    Engine,
    EngineInputError,
    EngineRequest,
)
from cplane.workers.engines.vllm import VllmEngine
from tests.waiting import until

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(240)]

_ids = itertools.count()


def rid(tag: str) -> str:
    return f"{tag}-{next(_ids)}"


def prompt_ids(seed: int, n: int = 70) -> list[int]:
    """A distinct prompt per seed (ids 3.. avoid the special tokens 0-2)."""
    return [3 + (seed * 131 + i * 17) % 450 for i in range(n)]


async def collect(stream: AsyncIterator[Delta]) -> tuple[list[int], str, Delta]:
    tokens: list[int] = []
    text = ""
    last: Delta | None = None
    async for d in stream:
        assert last is None or last.finish_reason is None, "delta after the final one"
        tokens += d.token_ids
        text += d.text
        last = d
    assert last is not None and last.finish_reason is not None
    return tokens, text, last


async def direct(engine: VllmEngine, ids: list[int], **sampling: Any) -> Any:
    """The same request straight through AsyncLLM: the reference output."""
    from vllm.inputs.engine import tokens_input
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(output_kind=RequestOutputKind.FINAL_ONLY, **sampling)
    final = None
    async for out in engine.llm.generate(tokens_input(ids), params, rid("direct")):
        final = out
    assert final is not None and final.finished
    return final


def greedy(request_id: str, **kw: Any) -> EngineRequest:
    return EngineRequest(request_id=request_id, temperature=0.0, **kw)


async def test_vllm_engine_satisfies_protocol(vllm_engine: VllmEngine) -> None:
    assert isinstance(vllm_engine, Engine)
    assert vllm_engine.name == "vllm"
    assert vllm_engine.models == ["tiny-llama"]


async def test_vllm_unified_matches_asyncllm(vllm_engine: VllmEngine) -> None:
    tok = vllm_engine.llm.get_tokenizer()
    text_prompt = "The quick brown fox jumps over the lazy dog. Hello, world!"
    cases = [
        (greedy(rid("u"), prompt=text_prompt, max_tokens=24), tok.encode(text_prompt)),
        (greedy(rid("u"), prompt_token_ids=prompt_ids(1), max_tokens=24), prompt_ids(1)),
        (greedy(rid("u"), prompt_token_ids=prompt_ids(2, 9), max_tokens=5), prompt_ids(2, 9)),
    ]
    for req, ids in cases:
        tokens, text, last = await collect(vllm_engine.generate(req))
        ref = await direct(vllm_engine, ids, temperature=0.0, max_tokens=req.max_tokens)
        out = ref.outputs[0]
        assert tokens == list(out.token_ids)
        assert text == out.text
        assert last.finish_reason == FinishReason(out.finish_reason)
        assert last.prompt_tokens == len(ids)
        assert len(tokens) <= req.max_tokens


async def test_vllm_stop_string_ends_with_stop(vllm_engine: VllmEngine) -> None:
    ids = prompt_ids(3)
    ref = (await direct(vllm_engine, ids, temperature=0.0, max_tokens=32)).outputs[0]
    stop = next(
        (
            ref.text[i : i + 2]
            for i in range(len(ref.text) // 3, len(ref.text) - 1)
            if ref.text[i : i + 2].isalnum()
        ),
        None,
    )
    if stop is None:
        pytest.skip("the tiny model's greedy text has no alphanumeric pair to stop on")
    req = greedy(rid("stop"), prompt_token_ids=ids, max_tokens=32, stop=[stop])
    _, text, last = await collect(vllm_engine.generate(req))
    assert last.finish_reason == FinishReason.STOP
    assert text == ref.text[: ref.text.index(stop)]


async def test_vllm_resume_continues_after_streamed_tokens(vllm_engine: VllmEngine) -> None:
    ids = prompt_ids(4)
    ref, _, _ = await collect(
        vllm_engine.generate(greedy(rid("r"), prompt_token_ids=ids, max_tokens=20, ignore_eos=True))
    )
    req = greedy(
        rid("r"), prompt_token_ids=ids, max_tokens=20, ignore_eos=True, resume_token_ids=ref[:7]
    )
    tokens, _, last = await collect(vllm_engine.generate(req))
    assert tokens == ref[7:]
    assert last.finish_reason == FinishReason.LENGTH
    assert last.prompt_tokens == len(ids)  # resumed tokens are not prompt
    # Nothing left to generate: finishes at once, without calling vLLM.
    done = greedy(rid("r"), prompt_token_ids=ids, max_tokens=7, resume_token_ids=ref[:7])
    tokens, _, last = await collect(vllm_engine.generate(done))
    assert tokens == [] and last.finish_reason == FinishReason.LENGTH


async def test_vllm_pd_greedy_matches_unified(
    vllm_prefill_engine: VllmEngine, vllm_decode_engine: VllmEngine, vllm_kv_dir: Path
) -> None:
    ids = prompt_ids(5)  # 70 tokens: ExampleConnector stores the first 64
    stored_before = set(os.listdir(vllm_kv_dir))
    pre = greedy(rid("p"), prompt_token_ids=ids, max_tokens=16, ignore_eos=True, prefill_only=True)
    first, _, p_last = await collect(vllm_prefill_engine.generate(pre))
    assert len(first) == 1
    assert p_last.kv_transfer_params == {CONNECTOR_KEY: "ExampleConnector"}
    assert set(os.listdir(vllm_kv_dir)) - stored_before, "prefill stored no KV"

    dec = greedy(
        rid("d"),
        prompt_token_ids=ids,
        max_tokens=16,
        ignore_eos=True,
        resume_token_ids=first,
        kv_transfer_params=p_last.kv_transfer_params,
    )
    rest, _, d_last = await collect(vllm_decode_engine.generate(dec))
    # The decode engine never saw this prompt: its cache hit is the transfer.
    assert d_last.cached_prompt_tokens is not None and d_last.cached_prompt_tokens >= 32
    assert d_last.prompt_tokens == len(ids)
    assert d_last.finish_reason == FinishReason.LENGTH

    unified, _, _ = await collect(
        vllm_prefill_engine.generate(
            greedy(rid("u"), prompt_token_ids=ids, max_tokens=16, ignore_eos=True)
        )
    )
    assert first + rest == unified


async def test_vllm_pd_sampled_decode_continues_after_first_token(
    vllm_prefill_engine: VllmEngine, vllm_decode_engine: VllmEngine
) -> None:
    ids = prompt_ids(6)
    sampled: dict[str, Any] = {
        "temperature": 1.0,
        "seed": 1234,
        "ignore_eos": True,
        "max_tokens": 12,
    }
    first, _, p_last = await collect(
        vllm_prefill_engine.generate(
            EngineRequest(request_id=rid("p"), prompt_token_ids=ids, prefill_only=True, **sampled)
        )
    )
    rest, _, d_last = await collect(
        vllm_decode_engine.generate(
            EngineRequest(
                request_id=rid("d"),
                prompt_token_ids=ids,
                resume_token_ids=first,
                kv_transfer_params=p_last.kv_transfer_params,
                **sampled,
            )
        )
    )
    assert len(first) == 1 and len(rest) == 11
    assert d_last.cached_prompt_tokens is not None and d_last.cached_prompt_tokens >= 32
    # The decode ran on prompt + first token: the same seeded request sent
    # straight to vLLM with that prompt gives the same continuation.
    ref = await direct(
        vllm_decode_engine, ids + first, temperature=1.0, seed=1234, ignore_eos=True, max_tokens=11
    )
    assert rest == list(ref.outputs[0].token_ids)


async def test_vllm_abort_ends_with_cancelled_and_frees(vllm_engine: VllmEngine) -> None:
    req = greedy(rid("a"), prompt_token_ids=prompt_ids(7, 20), max_tokens=480, ignore_eos=True)
    stream = vllm_engine.generate(req)
    got: list[int] = []
    async for d in stream:
        got += d.token_ids
        if len(got) >= 3:
            break
    t0 = time.monotonic()
    await vllm_engine.abort(req.request_id)
    rest, _, last = await asyncio.wait_for(collect(stream), timeout=10)
    assert last.finish_reason == FinishReason.CANCELLED
    assert time.monotonic() - t0 < 5
    assert len(got) + len(rest) < 480
    assert vllm_engine.stats().running == 0
    assert vllm_engine.llm.get_num_unfinished_requests() == 0
    # The engine is free: a following request runs, and its last step shows
    # the scheduler with nothing else running.
    tokens, _, last = await collect(
        vllm_engine.generate(
            greedy(rid("a"), prompt_token_ids=prompt_ids(8, 20), max_tokens=8, ignore_eos=True)
        )
    )
    assert len(tokens) == 8 and last.finish_reason == FinishReason.LENGTH
    assert vllm_engine.scheduler_counts == (0, 0)
    await vllm_engine.abort("no-such-request")  # ignored


async def test_vllm_consumer_leaving_aborts_request(vllm_engine: VllmEngine) -> None:
    req = greedy(rid("c"), prompt_token_ids=prompt_ids(9, 20), max_tokens=480, ignore_eos=True)
    stream = vllm_engine.generate(req)
    assert isinstance(stream, AsyncIterator)
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    assert vllm_engine.llm.get_num_unfinished_requests() == 0

    async def consume() -> None:
        async for _ in vllm_engine.generate(
            greedy(rid("c"), prompt_token_ids=prompt_ids(10, 20), max_tokens=480, ignore_eos=True)
        ):
            pass

    task = asyncio.create_task(consume())
    await until(lambda: vllm_engine.stats().running == 1, 30, "the request to run")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert vllm_engine.llm.get_num_unfinished_requests() == 0
    assert vllm_engine.stats().running == 0


async def test_vllm_32_concurrent_requests(vllm_engine: VllmEngine) -> None:
    reqs = [
        EngineRequest(
            request_id=rid("cc"),
            prompt_token_ids=prompt_ids(100 + i, 10 + i),
            max_tokens=8 + i % 9,
            ignore_eos=True,
            temperature=0.8,
            seed=i,
            priority=i % 5,
        )
        for i in range(32)
    ]
    results = await asyncio.gather(*(collect(vllm_engine.generate(r)) for r in reqs))
    for req, (tokens, _, last) in zip(reqs, results, strict=True):
        assert len(tokens) == req.max_tokens
        assert last.finish_reason == FinishReason.LENGTH
        assert last.prompt_tokens == len(req.prompt_token_ids or [])


async def test_vllm_chat_and_token_prompts(vllm_engine: VllmEngine) -> None:
    tok = vllm_engine.llm.get_tokenizer()
    messages = [ChatMessage(role="user", content="tell me a story")]
    chat_ids = tok.encode(
        str(
            tok.apply_chat_template(
                [{"role": "user", "content": "tell me a story"}],
                tokenize=False,
                add_generation_prompt=True,
            )
        ),
        add_special_tokens=False,
    )
    assert chat_ids[0] == tok.bos_token_id  # the template wrote the BOS
    by_chat = await collect(
        vllm_engine.generate(greedy(rid("chat"), messages=messages, max_tokens=10))
    )
    by_ids = await collect(
        vllm_engine.generate(greedy(rid("chat"), prompt_token_ids=chat_ids, max_tokens=10))
    )
    assert by_chat[0] == by_ids[0] and by_chat[1] == by_ids[1]
    assert by_chat[2].prompt_tokens == len(chat_ids)


async def test_vllm_bad_input_raises(vllm_engine: VllmEngine) -> None:
    limit = vllm_engine.max_model_len
    too_long = [
        greedy(rid("x"), prompt_token_ids=prompt_ids(11, limit)),
        greedy(rid("x"), prompt="hello " * limit),
        greedy(rid("x"), prompt_token_ids=prompt_ids(12, limit - 3), resume_token_ids=[5, 6, 7]),
    ]
    for req in too_long:
        with pytest.raises(EngineInputError) as err:
            await collect(vllm_engine.generate(req))
        assert err.value.code == ErrorCode.PROMPT_TOO_LONG
    bad = [
        greedy(rid("x")),  # no prompt at all
        greedy(rid("x"), prompt_token_ids=[10**6]),  # outside the vocabulary
        EngineRequest(request_id=rid("x"), prompt="hi", temperature=-1.0),
    ]
    for req in bad:
        with pytest.raises(EngineInputError) as err:
            await collect(vllm_engine.generate(req))
        assert err.value.code == ErrorCode.INVALID_REQUEST
    assert vllm_engine.stats().running == 0


async def test_vllm_stats_report_rates_and_cache(vllm_engine: VllmEngine) -> None:
    ids = prompt_ids(13, 100)
    for _ in range(2):  # the second run hits the prefix cache
        await collect(
            vllm_engine.generate(
                greedy(rid("s"), prompt_token_ids=ids, max_tokens=16, ignore_eos=True)
            )
        )
    s = vllm_engine.stats()
    assert s.gen_tokens_per_s > 0 and s.prompt_tokens_per_s > 0
    assert 0.0 <= s.kv_usage <= 1.0
    assert 0.0 < s.prefix_hit_rate <= 1.0
    assert s.running == 0 and s.waiting == 0


async def test_vllm_two_engines_step_together(
    vllm_engine: VllmEngine, vllm_decode_engine: VllmEngine
) -> None:
    def reqs(tag: str) -> list[EngineRequest]:
        return [
            greedy(
                rid(tag), prompt_token_ids=prompt_ids(200 + i, 30), max_tokens=24, ignore_eos=True
            )
            for i in range(12)
        ]

    both = [
        collect(e.generate(r))
        for e in (vllm_engine, vllm_decode_engine)
        for r in reqs(e.settings.scheduling_policy)
    ]
    results = await asyncio.wait_for(asyncio.gather(*both), timeout=60)
    assert all(len(tokens) == 24 for tokens, _, _ in results)
    # Same model, same greedy prompts: both engines agree.
    assert [t for t, _, _ in results[:12]] == [t for t, _, _ in results[12:]]


async def test_vllm_engines_leave_global_prometheus_alone(
    vllm_engine: VllmEngine, vllm_decode_engine: VllmEngine
) -> None:
    from prometheus_client import REGISTRY

    names = [n for names in REGISTRY._collector_to_names.values() for n in names]
    assert not [n for n in names if n.startswith("vllm:")]


async def test_vllm_unstarted_engine(vllm_model_dir: Path) -> None:
    from tests.vllm_fixtures import tiny_settings

    engine = VllmEngine(tiny_settings(vllm_model_dir))
    assert engine.stats().running == 0
    with pytest.raises(RuntimeError):
        await collect(engine.generate(greedy(rid("n"), prompt="hi")))
    await engine.shutdown()
    await engine.shutdown()  # idempotent


async def test_vllm_resume_inside_a_character_sends_no_prompt_text(
    vllm_engine: VllmEngine,
) -> None:
    # "é" is two byte tokens in the tiny tokenizer; the streamed tokens stop
    # after its first byte, so the client has seen "hello world " only.
    tok = vllm_engine.llm.get_tokenizer()
    prompt = tok.encode("hello world")
    streamed = tok.encode(" é", add_special_tokens=False)[:2]
    assert tok.decode(streamed).endswith("\ufffd")
    req = greedy(
        rid("e"),
        prompt_token_ids=prompt,
        resume_token_ids=streamed,
        max_tokens=10,
        ignore_eos=True,
    )
    tokens, text, _ = await collect(vllm_engine.generate(req))
    assert len(tokens) == 8
    sent = tok.decode(prompt + streamed[:1])
    assert text == tok.decode(prompt + streamed + tokens)[len(sent) :]
    assert "hello" not in text


async def test_vllm_pd_prompt_of_whole_blocks(
    vllm_prefill_engine: VllmEngine, vllm_decode_engine: VllmEngine
) -> None:
    # 64 tokens: the decode prompt has 65, where vLLM's own ExampleConnector
    # loads a file it never checked for and kills the engine core.
    ids = prompt_ids(14, 64)
    first, _, p_last = await collect(
        vllm_prefill_engine.generate(
            greedy(rid("p"), prompt_token_ids=ids, max_tokens=8, ignore_eos=True, prefill_only=True)
        )
    )
    dec = greedy(
        rid("d"),
        prompt_token_ids=ids,
        max_tokens=8,
        ignore_eos=True,
        resume_token_ids=first,
        kv_transfer_params=p_last.kv_transfer_params,
    )
    rest, _, _ = await collect(vllm_decode_engine.generate(dec))
    unified, _, _ = await collect(
        vllm_prefill_engine.generate(
            greedy(rid("u"), prompt_token_ids=ids, max_tokens=8, ignore_eos=True)
        )
    )
    assert first + rest == unified
