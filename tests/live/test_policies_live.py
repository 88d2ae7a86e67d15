"""Policies on a real nats-server: shedding answers at once, budgets are refused before
they run and costs are reported, tenant fairness holds with two orchestrator replicas."""

from __future__ import annotations

import asyncio

import nats

from cplane.client.sdk import Client, RequestFailed
from cplane.schemas.messages import ErrorCode, Final, Request
from tests.live.test_replicas import stop_all
from tests.natsfix import isolated_settings
from tests.stack import stack, start_replicas, start_worker
from tests.waiting import until


async def outcome(handle: object) -> Final | RequestFailed:
    try:
        return await handle.result(timeout=60)  # type: ignore[attr-defined, no-any-return]
    except RequestFailed as exc:
        return exc


async def test_sheddable_requests_get_overloaded_at_once_and_the_rest_complete(
        nats_url: str) -> None:
    # One worker, one slot, ~0.3 s per request; 12 interactive requests (250 ms
    # TTFT, sheddable) and 4 batch ones at once: interactive ones that cannot
    # start in time are refused with overloaded + retry_after_ms as soon as the
    # drain rate is known; batch ones run late; every request ends once.
    s = isolated_settings(nats_url, orchestrator={"headroom": 0.0, "policy": "slo_aware"},
                          worker={"capacity": 1}, sim={"decode_a_ms": 30.0})
    async with stack(s, workers=1):
        client = Client(await nats.connect(nats_url), s)
        hs = [await client.submit(Request(request_id=f"i{i}", prompt="a b", max_tokens=10),
                                  slo_class="interactive") for i in range(12)]
        hs += [await client.submit(Request(request_id=f"b{i}", prompt="a b", max_tokens=10),
                                   slo_class="batch") for i in range(4)]
        results = await asyncio.gather(*(outcome(h) for h in hs))
        await client.close()
    by_id = {(r.request_id if isinstance(r, Final) else r.error.request_id): r for r in results}
    assert len(by_id) == 16
    shed = [r for r in results if isinstance(r, RequestFailed)]
    assert shed, "nothing was shed"
    for r in shed:
        assert r.error.code is ErrorCode.OVERLOADED and r.error.retryable
        assert r.error.request_id.startswith("i") and (r.error.retry_after_ms or 0) > 0
    assert all(isinstance(by_id[f"b{i}"], Final) for i in range(4))  # batch runs late


async def test_a_budget_too_small_is_refused_and_finals_carry_their_cost(nats_url: str) -> None:
    s = isolated_settings(nats_url, sim={"zero_cost": True},
                          worker={"price_in_per_1k": 1.0, "price_out_per_1k": 2.0},
                          orchestrator={"policy": "cost_optimized"})
    async with stack(s, workers=1):
        client = Client(await nats.connect(nats_url), s)
        ok = await client.submit(Request(request_id="ok", prompt_token_ids=list(range(100)),
                                         max_tokens=50, ignore_eos=True, cost_budget=1.0))
        poor = await client.submit(Request(request_id="poor", prompt_token_ids=list(range(100)),
                                           max_tokens=50, cost_budget=0.1))
        final = await ok.result(timeout=30)
        refused = await outcome(poor)
        await client.close()
    assert final.usage.cost == (100 * 1.0 + 50 * 2.0) / 1000
    assert isinstance(refused, RequestFailed) and refused.error.code is ErrorCode.OVER_BUDGET
    assert not refused.error.retryable


async def test_tenant_fairness_holds_with_two_orchestrator_replicas(nats_url: str) -> None:
    # Tenant a floods (30 requests) before b and c send 3 each; one worker slot.
    # With fair = true the light tenants are served in turn with a, not after it.
    s = isolated_settings(nats_url, worker={"capacity": 1}, sim={"decode_a_ms": 5.0},
                          orchestrator={"policy": "fifo", "policy_params": {"fair": True},
                                        "headroom": 0.0})
    conns = [await nats.connect(nats_url), await nats.connect(nats_url)]
    async with stack(s, workers=0, orchestrator=False) as run:
        orchs = await start_replicas(s, run, conns)
        client = Client(await nats.connect(nats_url), s)
        hs = []
        for i in range(30):
            hs.append(await client.submit(Request(request_id=f"a{i}", prompt="x", max_tokens=8,
                                                  tenant="a")))
        for i in range(3):
            for t in "bc":
                hs.append(await client.submit(Request(request_id=f"{t}{i}", prompt="x",
                                                      max_tokens=8, tenant=t)))
        leader = next(o for o in orchs if o.leading)
        await until(lambda: leader.ledger.held_heads(2, 100) and
                    len(list(leader.ledger.held_heads(2, 100))) == 36, 10, "all held")
        await start_worker(s, run, worker_id="w0", capacity=1)
        finals = await asyncio.gather(*(h.result(timeout=60) for h in hs))
        await client.close()
        await stop_all(run)
    for c in conns:
        if not c.is_closed:
            await c.close()
    order = [f.request_id for f in sorted(finals, key=lambda f: f.ts_ms)]
    light = [i for i, rid in enumerate(order) if rid[0] in "bc"]
    # fair: b and c alternate with a from the start (all six among the first 10);
    # fifo alone would serve them last (positions 30-35)
    assert max(light) < 10, order
