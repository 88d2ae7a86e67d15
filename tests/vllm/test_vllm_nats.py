"""Real vLLM (CPU, tiny random Llama) behind real NATS: the whole pipeline.

The engines are the session fixtures of tests/vllm_fixtures.py, shared with
test_vllm_engine.py; every test uses its own subjects and streams.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats
import pytest

from cplane.client.sdk import Client
from cplane.schemas.messages import FinishReason, Request, TokenChunk
from tests.natsfix import isolated_settings
from tests.stack import stack
from tests.vllm_model import MODEL_NAME
from tests.waiting import until

pytestmark = pytest.mark.vllm
PROMPTS = [
    "The quick brown fox jumps over the lazy dog near the river bank",
    "NATS JetStream keeps messages in streams and hands them to consumers "
    "one by one, in order, as long as they ask",
]


async def run_through(client: Client, req: Request) -> tuple[list[TokenChunk], Any]:
    handle = await client.submit(req)
    chunks = [c async for c in handle]
    return chunks, await handle.result(timeout=120)


async def direct_ids(engine: Any, prompt: str, n: int) -> list[int]:
    """Token ids straight from the engine's AsyncLLM, with vLLM's own types."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    outs = [o async for o in engine.llm.generate(prompt, params,
                                                 request_id=f"direct-{hash(prompt)}")]
    return list(outs[-1].outputs[0].token_ids)


async def test_vllm_unified_through_nats_equals_direct_asyncllm(
    nats_url: str, vllm_engine: Any
) -> None:
    s = isolated_settings(nats_url, worker={"model": MODEL_NAME})
    async with stack(s, workers=[{"engine": vllm_engine, "worker_id": "vllm-u"}]):
        client = Client(await nats.connect(nats_url), s)
        for i, prompt in enumerate(PROMPTS):
            req = Request(request_id=f"vu{i}", prompt=prompt, max_tokens=24, temperature=0.0,
                          ignore_eos=True, model=MODEL_NAME)
            chunks, final = await run_through(client, req)
            ids = [t for c in chunks for t in c.token_ids]
            assert ids == await direct_ids(vllm_engine, prompt, 24)
            assert [c.seq for c in chunks] == list(range(len(chunks)))
            assert final.finish_reason is FinishReason.LENGTH
            assert final.usage.completion_tokens == 24 and final.usage.prompt_tokens > 0
            assert final.text == "".join(c.text for c in chunks)
            assert final.workers == ["vllm-u"] and final.model == MODEL_NAME
        await client.close()


async def test_vllm_pd_through_prefill_and_decode_workers(
    nats_url: str, vllm_prefill_engine: Any, vllm_decode_engine: Any
) -> None:
    """prefill worker -> decode worker (ExampleConnector): same tokens as unified
    under greedy sampling; the decode side reports cached prompt tokens (the KV
    moved); with temperature > 0 the first token is the prefill's and the rest
    continue after it."""
    s = isolated_settings(nats_url, orchestrator={"pd_mode": "always"},
                          worker={"model": MODEL_NAME})
    workers = [
        {"engine": vllm_prefill_engine, "worker_id": "pre", "role": "prefill"},
        {"engine": vllm_decode_engine, "worker_id": "dec", "role": "decode"},
    ]
    async with stack(s, workers=workers) as run:
        client = Client(await nats.connect(nats_url), s)
        # 70 words: a prompt well past one 32-token block, so there is KV to move
        prompt = " ".join(PROMPTS * 3)
        req = Request(request_id="pd-greedy", prompt=prompt, max_tokens=16, temperature=0.0,
                      ignore_eos=True, model=MODEL_NAME)
        chunks, final = await run_through(client, req)
        ids = [t for c in chunks for t in c.token_ids]
        assert ids == await direct_ids(vllm_prefill_engine, prompt, 16)
        assert final.workers == ["pre", "dec"]
        assert len(chunks[0].token_ids) == 1 and chunks[0].worker_id == "pre"
        assert all(c.worker_id == "dec" for c in chunks[1:])
        assert final.usage.cached_prompt_tokens > 0, "the decode engine recomputed the prompt"
        assert final.usage.completion_tokens == 16
        assert final.timings.ttft_ms <= final.timings.e2e_ms
        # sampled: the client's sequence is one consistent stream
        req = Request(request_id="pd-sampled", prompt=prompt, max_tokens=12, temperature=0.9,
                      seed=3, ignore_eos=True, model=MODEL_NAME)
        chunks, final = await run_through(client, req)
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        assert sum(len(c.token_ids) for c in chunks) == 12 == final.usage.completion_tokens
        assert final.text == "".join(c.text for c in chunks)
        orch = run.orchestrator
        assert orch is not None and orch.counters["pd"] == 2
        await client.close()


async def test_vllm_cancel_running_request_frees_engine(nats_url: str, vllm_engine: Any) -> None:
    s = isolated_settings(nats_url, worker={"model": MODEL_NAME})
    async with stack(s, workers=[{"engine": vllm_engine, "worker_id": "vllm-c"}]):
        client = Client(await nats.connect(nats_url), s)
        h = await client.submit(Request(request_id="vc1", prompt=PROMPTS[0], max_tokens=400,
                                        ignore_eos=True, model=MODEL_NAME))
        await anext(aiter(h))
        await h.cancel()
        final = await h.result(timeout=60)
        assert final.finish_reason is FinishReason.CANCELLED
        assert final.usage.completion_tokens < 400
        await until(lambda: vllm_engine.stats().running == 0, 5, "the engine to drop it")

        async def acked() -> bool:  # the ack follows the Final's store
            return (await client.js.stream_info(s.streams.work.name)).state.messages == 0

        await until(acked, 5, "the work item's ack")
        await client.close()


async def test_vllm_32_concurrent_requests_through_nats(nats_url: str, vllm_engine: Any) -> None:
    s = isolated_settings(nats_url, worker={"model": MODEL_NAME, "capacity": 32})
    async with stack(s, workers=[{"engine": vllm_engine, "worker_id": "vllm-32"}]):
        client = Client(await nats.connect(nats_url), s)
        reqs = [Request(request_id=f"v32-{i}", prompt=PROMPTS[i % 2] + f" {i}",
                        max_tokens=8 + i % 5, ignore_eos=True, model=MODEL_NAME)
                for i in range(32)]
        results = await asyncio.gather(*(run_through(client, r) for r in reqs))
        for r, (chunks, final) in zip(reqs, results, strict=True):
            assert sum(len(c.token_ids) for c in chunks) == r.max_tokens
            assert final.usage.completion_tokens == r.max_tokens
        await client.close()


async def test_vllm_bad_prompt_gets_error_reply(nats_url: str, vllm_engine: Any) -> None:
    s = isolated_settings(nats_url, worker={"model": MODEL_NAME})
    async with stack(s, workers=[{"engine": vllm_engine, "worker_id": "vllm-e"}]):
        client = Client(await nats.connect(nats_url), s)
        h = await client.submit(Request(request_id="vlong", prompt_token_ids=[5] * 2000,
                                        model=MODEL_NAME))
        term = await h.terminal(timeout=60)
        assert term.code == "prompt_too_long"  # type: ignore[union-attr]
        await client.close()
