"""Precise prefix routing on real vLLM (CPU, tiny model): two workers forward
vLLM's own KV-cache events; a request sharing a long prefix with what one
engine has cached goes to that engine, and vLLM's prefix-cache counters there
show the hit. The orchestrator never sent those prefixes anywhere: only the
events can tell it where they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nats
import pytest

from cplane.client.sdk import Client
from cplane.schemas.messages import Request
from cplane.workers.engines.base import EngineRequest
from tests.natsfix import isolated_settings
from tests.stack import stack
from tests.vllm_model import MODEL_NAME
from tests.waiting import until

pytestmark = pytest.mark.vllm
BLOCK = 32  # the fixtures' vLLM block size


def _text(tag: str, words: int) -> str:
    return " ".join(f"{tag}{i % 7}x{i}" for i in range(words))


async def _warm(engine: Any, rid: str, prompt: str) -> None:
    async for _ in engine.generate(EngineRequest(request_id=rid, prompt=prompt, max_tokens=1,
                                                 temperature=0.0)):
        pass


async def test_vllm_kv_events_steer_requests_to_the_cached_prefix(
    nats_url: str, vllm_engine: Any, vllm_decode_engine: Any, vllm_model_dir: Path
) -> None:
    s = isolated_settings(
        nats_url, worker={"model": MODEL_NAME, "kv_events_ms": 10.0},
        orchestrator={"router": "prefix_aware", "policy": "fifo",
                      "prefix_tokenizer": str(vllm_model_dir), "prefix_block_tokens": BLOCK})
    engines = {"va": vllm_engine, "vb": vllm_decode_engine}
    assert all(e.block_tokens == BLOCK for e in engines.values())
    prefixes = {"va": [_text("apple", 40), _text("cherry", 40)],
                "vb": [_text("banana", 40), _text("damson", 40)]}
    async with stack(s, workers=[{"engine": e, "worker_id": w} for w, e in engines.items()]
                     ) as run:
        orch = run.orchestrator
        assert orch is not None and orch._hasher is not None
        await until(lambda: orch.registry.knows("va") and orch.registry.knows("vb"), 30)
        for wid, texts in prefixes.items():
            for i, text in enumerate(texts):
                await _warm(engines[wid], f"warm-{wid}-{i}", text)
        ix = orch.core.state.prefix
        blocks = {t: orch._hasher.blocks(Request(request_id="x", prompt=t, model=MODEL_NAME))
                  for ts in prefixes.values() for t in ts}
        assert all(len(b) >= 2 for b in blocks.values()), {t[:8]: len(b) for t, b in blocks.items()}
        await until(lambda: all(ix.match(w, blocks[t]) == len(blocks[t])
                                for w, ts in prefixes.items() for t in ts),
                    30, "vLLM's cached blocks in the router's index")

        client = Client(await nats.connect(nats_url), s)
        try:
            n = 0
            for wid, texts in prefixes.items():
                for text in texts:
                    before = engines[wid].prefix_counts()
                    handle = await client.submit(Request(
                        request_id=f"vp{n}", prompt=text + " and then some more words",
                        max_tokens=2, temperature=0.0, model=MODEL_NAME))
                    final = await handle.result(timeout=120)
                    n += 1
                    assert final.workers == [wid], (wid, final.workers)
                    hit = len(blocks[text]) * BLOCK
                    assert final.usage.cached_prompt_tokens >= hit, final.usage
                    engine = engines[wid]
                    await until(lambda e=engine, b=before[1], h=hit: e.prefix_counts()[1] - b >= h,
                                10,
                                "vLLM's own prefix-hit counter on the chosen engine")
        finally:
            await client.close()
