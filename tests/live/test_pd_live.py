"""PD disaggregation, load-adaptive, on a real nats-server with sim workers: a long
prompt goes prefill -> decode while the prefill pool has room, and runs unified
once the prefill pool is busy; the orchestrator counts each decision."""

from __future__ import annotations

import time

import nats

from cplane.client.sdk import Client
from cplane.schemas.messages import Final, Request, Role
from tests.natsfix import isolated_settings
from tests.stack import stack
from tests.waiting import until


def long_request(rid: str, tokens: int, max_tokens: int = 4) -> Request:
    return Request(request_id=rid, prompt_token_ids=[(i * 7) % 1000 + 1 for i in range(tokens)],
                   max_tokens=max_tokens, temperature=0.0)


async def test_adaptive_pd_disaggregates_until_the_prefill_pool_is_busy(nats_url: str) -> None:
    s = isolated_settings(
        nats_url, sim={"prefix_cache_tokens": 0},
        worker={"heartbeat_s": 0.1},
        orchestrator={"policy": "fifo", "pd_mode": "adaptive", "pd_min_prompt_tokens": 512})
    workers = [{"worker_id": "pre", "role": "prefill", "capacity": 1},
               {"worker_id": "dec", "role": "decode"},
               {"worker_id": "uni", "role": "unified"}]
    async with stack(s, workers=workers) as run:
        orch = run.orchestrator
        assert orch is not None
        await until(lambda: all(orch.registry.knows(w) for w in ("pre", "dec", "uni")), 10)
        client = Client(await nats.connect(nats_url), s)
        try:
            # Room on both sides: a long prompt is disaggregated.
            first = await (await client.submit(long_request("pd-a", 600))).result(timeout=30)
            assert isinstance(first, Final) and first.workers == ["pre", "dec"], first
            # A short prompt is not, whatever the load.
            short = await (await client.submit(long_request("pd-s", 100))).result(timeout=30)
            assert short.workers == ["uni"], short.workers
            # A very long prefill (seconds at the sim's cost) fills the one-slot
            # prefill pool; once its heartbeat says so, long prompts run unified.
            busy = await client.submit(long_request("pd-busy", 60_000, max_tokens=2))

            def prefill_full() -> bool:
                view = orch.registry.snapshot(time.time() * 1000)
                return any(w.held_items >= 1 for w in view.of_role(Role.PREFILL))

            await until(prefill_full, 15, "the prefill pool busy in the orchestrator's view")
            later = await (await client.submit(long_request("pd-b", 600))).result(timeout=30)
            assert later.workers == ["uni"], later.workers
            done = await busy.result(timeout=60)
            assert done.workers == ["pre", "dec"], done.workers
        finally:
            await client.close()
        assert orch.stats.pd == 2  # pd-a and pd-busy; pd-s and pd-b ran unified
        assert orch.stats.dispatched == 4
