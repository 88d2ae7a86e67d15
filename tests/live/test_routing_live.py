"""Routers in the live orchestrator, on a real nats-server: work goes to the
chosen worker's own subject, and that worker serves it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import nats
import pytest

from cplane.client.sdk import Client
from cplane.schemas.messages import Final, Request
from tests.natsfix import isolated_settings
from tests.stack import stack
from tests.waiting import until


async def served_by(client: Client, rid: str, max_tokens: int = 4) -> Final:
    handle = await client.submit(Request(request_id=rid, prompt="a b c", max_tokens=max_tokens))
    return await handle.result(timeout=30)


@contextlib.asynccontextmanager
async def three_workers(nats_url: str, router: str,
                        stats: dict[str, int] | None = None) -> AsyncIterator[Client]:
    """A client onto an orchestrator routing with `router` over three zero-cost
    workers, once it has heard all three; `stats` gets the orchestrator's routing
    counts at the end."""
    s = isolated_settings(nats_url, sim={"zero_cost": True},
                          orchestrator={"router": router, "policy": "fifo"})
    async with stack(s, workers=3) as run:
        orch = run.orchestrator
        assert orch is not None
        await until(lambda: len(orch.registry.book) == 3)
        client = Client(await nats.connect(nats_url), s)
        try:
            yield client
        finally:
            await client.close()
            if stats is not None:
                stats.update(orch.stats.routed)


async def test_round_robin_sends_each_worker_its_turn(nats_url: str) -> None:
    async with three_workers(nats_url, "round_robin") as client:
        order = [(await served_by(client, f"rr{i}")).workers[0] for i in range(9)]
    # one request at a time: every window of three covers the three workers
    for i in range(0, 9, 3):
        assert sorted(order[i:i + 3]) == ["w0", "w1", "w2"], order
    assert order[:3] == order[3:6] == order[6:9]


async def test_least_loaded_spreads_a_burst_by_what_it_routed(nats_url: str) -> None:
    # 12 long requests at once onto 3 workers of 4 slots, all idle at their last
    # heartbeat (every 5 s): only the counts routed since then tell them apart,
    # so each worker gets 4 and none queues work behind a full engine. (The unit
    # tests show the count, not the tie rotation, deciding.)
    s = isolated_settings(nats_url, sim={"decode_a_ms": 5.0},
                          worker={"capacity": 4, "heartbeat_s": 5.0},
                          orchestrator={"router": "least_loaded", "max_batch": 1})
    async with stack(s, workers=3) as run:
        orch = run.orchestrator
        assert orch is not None
        await until(lambda: len(orch.registry.book) == 3)
        client = Client(await nats.connect(nats_url), s)
        finals = await asyncio.gather(*(served_by(client, f"ll{i}", 40) for i in range(12)))
        await client.close()
    counts = {w: sum(f.workers[0] == w for f in finals) for w in ("w0", "w1", "w2")}
    assert counts == {"w0": 4, "w1": 4, "w2": 4}, counts


async def test_prefix_aware_sends_a_shared_prefix_where_it_is_cached(nats_url: str) -> None:
    # Requests sharing a 1,024-token prefix: the first lands anywhere, the rest
    # follow it, and the (sim) engine there reports the prefix as cached.
    prefix = list(range(1000, 2024))
    async with three_workers(nats_url, "prefix_aware") as client:
        finals = []
        for i in range(6):
            h = await client.submit(Request(request_id=f"px{i}", max_tokens=2,
                                            prompt_token_ids=[*prefix, 7, i]))
            finals.append(await h.result(timeout=30))
        other = await client.submit(Request(request_id="other", max_tokens=2,
                                            prompt_token_ids=list(range(5000, 6100))))
        await other.result(timeout=30)
    assert len({f.workers[0] for f in finals}) == 1, [(f.workers, f.usage) for f in finals]
    assert finals[0].usage.cached_prompt_tokens == 0
    assert all(f.usage.cached_prompt_tokens == 1024 for f in finals[1:])


async def test_affinity_keeps_a_session_on_one_worker(nats_url: str) -> None:
    async with three_workers(nats_url, "affinity") as client:
        homes: dict[str, set[str]] = {}
        for i in range(12):
            session = f"s{i % 4}"
            h = await client.submit(Request(request_id=f"af{i}", prompt="a b", max_tokens=2,
                                            session_id=session))
            homes.setdefault(session, set()).add((await h.result(timeout=30)).workers[0])
    assert all(len(ws) == 1 for ws in homes.values()), homes
    assert len({next(iter(ws)) for ws in homes.values()}) > 1  # sessions spread


ALL_ROUTERS = ("round_robin", "random", "least_loaded", "load_balanced", "least_connections",
               "weighted_round_robin", "least_response_time", "power_of_two", "affinity",
               "locality", "prefix_aware", "pool")


@pytest.mark.parametrize("router", ALL_ROUTERS)
async def test_every_router_serves_through_the_live_stack(nats_url: str, router: str) -> None:
    # Each strategy, selected by configuration, in a live orchestrator: every
    # request is served, and it went where the router sent it (a named worker;
    # `pool` alone leaves the choice to the first worker that pulls).
    routed: dict[str, int] = {}
    async with three_workers(nats_url, router, routed) as client:
        finals = [await served_by(client, f"{router}-{i}") for i in range(6)]
    assert all(f.workers and f.workers[0] in {"w0", "w1", "w2"} for f in finals)
    kind = "pool" if router == "pool" else "worker"
    assert routed == {f"unified/{kind}": 6}, routed
