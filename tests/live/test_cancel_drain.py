"""Cancellation and worker drain on a real nats-server with sim workers."""

from __future__ import annotations

import nats
from nats.aio.client import Client as NATS

from cplane.client.sdk import Client
from cplane.schemas.messages import FinishReason, Request
from tests.natsfix import isolated_settings
from tests.stack import stack, start_worker
from tests.waiting import quiet_for, until


def req(rid: str, n: int, **kw: object) -> Request:
    # temperature 0: the hand-back test compares against a reference run
    return Request(request_id=rid, prompt="tell me a story", max_tokens=n,  # type: ignore[arg-type]
                   **{"temperature": 0.0, **kw})


async def work_left(nc: NATS, stream: str) -> int:
    return (await nc.jetstream().stream_info(stream)).state.messages


async def work_is(nc: NATS, stream: str, n: int) -> bool:
    return await work_left(nc, stream) == n


async def test_cancel_running_request_frees_the_engine(nats_url: str, nc: NATS) -> None:
    s = isolated_settings(nats_url, sim={"decode_a_ms": 10.0})
    async with stack(s, workers=1) as run:
        client = Client(nc, s)
        h = await client.submit(req("run1", 10_000))
        first = await anext(aiter(h))
        assert first.seq == 0
        await h.cancel()
        final = await h.result(timeout=10)
        assert final.finish_reason is FinishReason.CANCELLED
        assert 0 < final.usage.completion_tokens < 10_000
        engine = run.workers[0].engine
        await until(lambda: engine.stats().running == 0, 10, "the engine to drop the sequence")
        await until(lambda: work_is(nc, s.streams.work.name, 0), 10, "the work item's ack")
        # the engine serves the next request
        assert (await client.generate(req("run2", 3), timeout=10)).usage.completion_tokens == 3


async def test_cancel_while_queued_never_runs(nats_url: str, nc: NATS) -> None:
    s = isolated_settings(nats_url, sim={"zero_cost": True})
    async with stack(s, workers=0) as run:  # no fleet: requests wait
        client = Client(nc, s)
        h = await client.submit(req("q1", 5))
        orch = run.orchestrator
        assert orch is not None
        await until(lambda: "q1" in orch.ledger, 10, "the orchestrator to hold q1 (no fleet)")
        await h.cancel()
        final = await h.result(timeout=10)
        assert final.finish_reason is FinishReason.CANCELLED
        assert final.usage.completion_tokens == 0 and final.workers == []
        # cancelled before it even reached the orchestrator
        await client.cancel("q2")
        await until(lambda: "q2" in orch._cancels, 10, "the orchestrator to know the cancel")
        h2 = await client.submit(req("q2", 5))
        assert (await h2.result(timeout=10)).finish_reason is FinishReason.CANCELLED
        w = await start_worker(s, run)
        assert w.ctx is not None
        ctx = w.ctx
        await quiet_for(0.5, lambda: ctx.counts["finals"] > 0,
                        why="a ready worker pulls a dispatched item within milliseconds; "
                            "the cancelled q1 and q2 must never reach it")
        assert await work_left(nc, s.streams.req.name) == 0


async def test_cancel_while_in_the_work_queue(nats_url: str, nc: NATS) -> None:
    # headroom lets the orchestrator dispatch 2 items to a 1-slot worker: the
    # second waits in LLM_WORK, and its cancel must stop it there.
    s = isolated_settings(nats_url, orchestrator={"headroom": 1.0, "max_batch": 1},
                          sim={"decode_a_ms": 10.0})
    async with stack(s, workers=[{"capacity": 1}]) as run:
        client = Client(nc, s)
        busy = await client.submit(req("busy", 60))
        await anext(aiter(busy))
        waiting = await client.submit(req("waiting", 5))
        await until(lambda: work_is(nc, s.streams.work.name, 2), 10,
                    "the second item to wait in LLM_WORK")
        await waiting.cancel()
        final = await waiting.result(timeout=10)
        assert final.finish_reason is FinishReason.CANCELLED and final.usage.completion_tokens == 0
        assert (await busy.result(timeout=10)).usage.completion_tokens == 60
        assert run.workers[0].ctx is not None and run.workers[0].ctx.counts["cancelled"] == 1


async def test_drain_hands_unfinished_work_to_another_worker(nats_url: str) -> None:
    """Stopping a worker mid-generation: the client's stream continues gap-free
    on another worker, with the same tokens an uninterrupted run produces."""
    # 800 tokens at 4 ms: the first worker is still generating (3 s) when the second
    # has started and the first is stopped, even on a loaded machine (at 120 tokens, a
    # slow start let the first finish alone once)
    n = 800
    s = isolated_settings(nats_url, worker={"drain_timeout_s": 0.1}, sim={"decode_a_ms": 4.0})
    nc = await nats.connect(nats_url)
    client = Client(nc, s)
    async with stack(s, workers=[{"worker_id": "first"}]) as run:
        ref_handle = await client.submit(req("ref", n))
        ref_ids = [t async for c in ref_handle for t in c.token_ids]
        ref = await ref_handle.result(timeout=20)
        h = await client.submit(req("moved", n))
        chunks = []
        async for c in h:
            chunks.append(c)
            if sum(len(x.token_ids) for x in chunks) >= 20:
                break
        await start_worker(s, run, worker_id="second")
        await run.stop_worker(run.workers[0])  # drains: hands the request back
        async for c in h:
            chunks.append(c)
        final = await h.result(timeout=20)
    await nc.close()
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert [t for c in chunks for t in c.token_ids] == ref_ids
    assert final.text == ref.text and final.usage.completion_tokens == n
    assert final.workers == ["first", "second"]


async def test_worker_refuses_work_for_a_model_it_does_not_serve(nats_url: str, nc: NATS) -> None:
    # Bypass the orchestrator: a work item naming another model reaches the pool.
    import msgspec

    from cplane.schemas.messages import ErrorReply, Priority, Role, WorkBatch, WorkItem

    s = isolated_settings(nats_url, sim={"zero_cost": True})
    async with stack(s, workers=[{"model": "mine"}], orchestrator=False):
        done = await nc.subscribe(s.subjects.done("i", "wrongmodel"))
        item = WorkItem(request=req("wrongmodel", 3, model="theirs"), priority=Priority.NORMAL,
                        slo_class="standard")
        await nc.jetstream().publish(s.subjects.work(Role.UNIFIED),
                                     msgspec.json.encode(WorkBatch(items=[item])))
        err = msgspec.json.decode((await done.next_msg(timeout=10)).data, type=ErrorReply)
        assert err.code == "unknown_model" and "mine" in err.message
