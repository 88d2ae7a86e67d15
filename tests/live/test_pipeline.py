"""End to end on a real nats-server: client -> LLM_REQ -> orchestrator -> LLM_WORK -> worker."""

from __future__ import annotations

import asyncio
import itertools
import time

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS

from cplane.client.sdk import Client, Overloaded, RejectedAtPublish
from cplane.schemas.codec import output_decoder
from cplane.schemas.messages import ErrorReply, Final, FinishReason, Priority, Request, TokenChunk
from tests.natsfix import isolated_settings
from tests.stack import stack, start_worker
from tests.waiting import quiet_for, until


def req(rid: str, **kw: object) -> Request:
    base: dict[str, object] = {"prompt": "the quick brown fox", "max_tokens": 8}
    base.update(kw)
    return Request(request_id=rid, **base)  # type: ignore[arg-type]


async def collect(client: Client, r: Request, **kw: object) -> tuple[list[TokenChunk], Final]:
    handle = await client.submit(r, **kw)  # type: ignore[arg-type]
    chunks = [c async for c in handle]
    return chunks, await handle.result(timeout=30)


async def test_many_concurrent_requests_stream_tokens_and_final(nats_url: str) -> None:
    s = isolated_settings(nats_url, sim={"zero_cost": True})
    async with stack(s, workers=2):
        client = Client(await nats.connect(nats_url), s)
        n = 200
        results = await asyncio.gather(
            *(collect(client, req(f"c{i}", max_tokens=5 + i % 20)) for i in range(n))
        )
        await client.close()
    for i, (chunks, final) in enumerate(results):
        want = 5 + i % 20
        assert [c.seq for c in chunks] == list(range(len(chunks)))  # gap-free, in order
        tokens = [t for c in chunks for t in c.token_ids]
        assert len(tokens) == want == final.usage.completion_tokens
        assert final.finish_reason is FinishReason.LENGTH
        assert "".join(c.text for c in chunks) == final.text
        assert final.chunks == len(chunks)
        assert final.timings.ttft_ms <= final.timings.e2e_ms
        assert final.workers and final.workers[0] in {"w0", "w1"}
    # both workers took part
    assert {f.workers[0] for _, f in results} == {"w0", "w1"}


async def test_first_token_then_batched_chunks(nats_url: str) -> None:
    # 40 tokens, 1 ms steps, chunks at least 200 ms apart: the first token
    # goes alone, the rest in chunks of at most 16 (count), never one per token.
    s = isolated_settings(
        nats_url, sim={"prefill_a_ms": 1.0, "decode_a_ms": 1.0},
        worker={"chunk_tokens": 16, "chunk_interval_ms": 200}
    )
    async with stack(s, workers=1):
        client = Client(await nats.connect(nats_url), s)
        chunks, final = await collect(client, req("batched", max_tokens=40))
        await client.close()
    assert len(chunks[0].token_ids) == 1
    assert all(len(c.token_ids) <= 16 for c in chunks)
    assert len(chunks) <= 5
    assert final.usage.completion_tokens == 40


async def test_one_chunk_per_engine_step_by_default(nats_url: str) -> None:
    # Steps of ~6.5 ms (the sim's default cost): every step's token goes out at
    # the end of its step, none waits for a timer; seqs have no gaps.
    s = isolated_settings(nats_url)
    async with stack(s, workers=1):
        client = Client(await nats.connect(nats_url), s)
        chunks, final = await collect(client, req("stepped", max_tokens=30))
        await client.close()
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert sum(len(c.token_ids) for c in chunks) == 30 == final.usage.completion_tokens
    assert len(chunks) >= 25  # about one a step (a late reader may merge a few)
    gaps = [b.ts_ms - a.ts_ms for a, b in itertools.pairwise(chunks)]
    assert sorted(gaps)[len(gaps) // 2] >= 5.0  # paced by the engine's steps


async def test_priority_order_under_contention(nats_url: str) -> None:
    # One worker with one slot; everything is queued before the fleet exists,
    # so the orchestrator chooses among all five priorities at once.
    s = isolated_settings(
        nats_url,
        orchestrator={"headroom": 0.0, "aging_s": 3600.0},
        sim={"decode_a_ms": 2.0},
    )
    client = Client(await nats.connect(nats_url), s)
    async with stack(s, workers=0) as run:
        handles = []
        for i in range(2):
            for p in reversed(Priority):  # background first ... critical last
                handles.append(await client.submit(req(f"{p.value}-{i}", max_tokens=3), priority=p))
        orch = run.orchestrator
        assert orch is not None
        await until(lambda: orch.ledger.held_count() == len(handles), 15,
                    "the orchestrator to hold every request (no fleet yet)")
        await start_worker(s, run, capacity=1)
        finals = [await h.result(timeout=30) for h in handles]
    await client.close()
    done_order = [f.request_id.split("-")[0] for f in sorted(finals, key=lambda f: f.ts_ms)]
    levels = [Priority(p).level for p in done_order]
    assert levels == sorted(levels), done_order


async def test_raw_json_publish_without_sdk(nats_url: str, nc: NATS) -> None:
    s = isolated_settings(nats_url, sim={"zero_cost": True})
    subj = s.subjects
    async with stack(s, workers=1):
        got: list[bytes] = []
        done = asyncio.Event()

        async def on(msg: object) -> None:
            got.append(msg.data)  # type: ignore[attr-defined]
            if msg.subject.startswith(f"{subj.prefix}.done."):  # type: ignore[attr-defined]
                done.set()

        await nc.subscribe(subj.outputs_of("i", "raw1"), cb=on)
        js = nc.jetstream()
        body = b'{"request_id": "raw1", "prompt": "hello from any language", "max_tokens": 4}'
        ack = await js.publish(subj.request("high", "interactive"), body)
        assert ack.seq >= 1
        await asyncio.wait_for(done.wait(), 20)
    outs = [output_decoder.decode(d) for d in got]
    assert isinstance(outs[-1], Final) and outs[-1].usage.completion_tokens == 4
    assert sum(len(o.token_ids) for o in outs if isinstance(o, TokenChunk)) == 4


@pytest.mark.parametrize(
    ("body", "rid", "needle"),
    [
        (b"\x00 not json {", None, "invalid request"),
        (b'{"request_id": "nofields"}', "nofields", "exactly one of prompt"),
        (b'{"request_id": "badprio", "prompt": "x", "priority": "urgent"}', "badprio", "priority"),
        (b'{"request_id": "badtype", "prompt": "x", "max_tokens": "many"}', "badtype", "max_tokens"),
        (b'{"prompt": "no id"}', None, "request_id"),
    ],
)
async def test_bad_input_gets_error_reply_and_is_terminated(
    nats_url: str, nc: NATS, body: bytes, rid: str | None, needle: str
) -> None:
    s = isolated_settings(nats_url, sim={"zero_cost": True})
    subj = s.subjects
    js = nc.jetstream()
    async with stack(s, workers=1):
        errors: list[ErrorReply] = []
        ev = asyncio.Event()

        async def on(msg: object) -> None:
            out = output_decoder.decode(msg.data)  # type: ignore[attr-defined]
            if isinstance(out, ErrorReply):
                errors.append(out)
                ev.set()

        group = "i" if rid else "invalid"
        await nc.subscribe(f"{subj.prefix}.done.{group}.*", cb=on)
        await js.publish(subj.request("normal", "standard"), body)
        await asyncio.wait_for(ev.wait(), 10)
        assert errors[0].code == "invalid_request"
        assert needle in errors[0].message
        if rid:
            assert errors[0].request_id == rid
        # terminated: nothing left in LLM_REQ, nothing redelivered, the system still serves
        client = Client(nc, s)
        _, final = await collect(client, req(f"after-{rid}", max_tokens=2))
        assert final.usage.completion_tokens == 2

        async def req_empty() -> bool:
            return (await js.stream_info(s.streams.req.name)).state.messages == 0

        await until(req_empty, 10, "LLM_REQ to be empty (the bad message terminated)")
        await quiet_for(0.3, lambda: len(errors) > 1,
                        why="a redelivered bad message would be refused again at once")


async def test_unknown_priority_subject_refused_at_publish(nats_url: str, nc: NATS) -> None:
    s = isolated_settings(nats_url)
    async with stack(s, workers=0, orchestrator=True):
        client = Client(nc, s)
        with pytest.raises(RejectedAtPublish, match=r"slo_class 'x\.y' is not a subject token"):
            await client.submit(req("urgent1"), priority="normal", slo_class="x.y")
        with pytest.raises(RejectedAtPublish, match="priority 'urgent' is not one of"):
            await client.submit(req("urgent2"), priority="urgent")
        assert not client._open
        from nats.js.errors import NoStreamResponseError

        with pytest.raises(NoStreamResponseError):
            await nc.jetstream().publish(f"{s.subjects.prefix}.req.urgent.standard", b"{}")


async def test_duplicate_request_id_is_served_once(nats_url: str, nc: NATS) -> None:
    s = isolated_settings(nats_url, sim={"zero_cost": True})
    subj = s.subjects
    js = nc.jetstream()
    async with stack(s, workers=1):
        client = Client(nc, s)
        # SDK: Nats-Msg-Id dedup at the server
        h1 = await client.submit(req("dup1"))
        f1 = await h1.result(timeout=10)
        h2 = await client.submit(req("dup1"))
        assert h2.duplicate
        f2 = await h2.result(timeout=10)  # answered from LLM_DONE
        assert f2.text == f1.text
        # raw publishes without the header: the orchestrator's own dedup
        body = msgspec.json.encode(req("dup2", max_tokens=3))
        finals = []

        async def on(msg: object) -> None:
            finals.append(msg)

        await nc.subscribe(subj.done("i", "dup2"), cb=on)
        await js.publish(subj.request("normal", "standard"), body)
        await js.publish(subj.request("normal", "standard"), body)
        await until(lambda: finals, 10, "dup2's terminal")
        await quiet_for(1.0, lambda: len(finals) > 1,
                        why="the copy queued right behind it would be served within "
                            "milliseconds (zero-cost sim) if the orchestrator did not drop it")
        info = await js.stream_info(s.streams.done.name, subjects_filter=f"{subj.prefix}.s.done.>")
        assert info.state.subjects == {subj.done_store("i", "dup1"): 1,
                                       subj.done_store("i", "dup2"): 1}


async def test_stream_full_refuses_publish(nats_url: str, nc: NATS) -> None:
    from cplane.bus.provision import ensure_streams

    s = isolated_settings(nats_url, stream_req={"max_msgs": 3})
    await ensure_streams(nc.jetstream(), s)  # streams, but no orchestrator draining them
    client = Client(nc, s)
    for i in range(3):
        await client.submit(req(f"full{i}"))
    with pytest.raises(Overloaded, match="full"):
        await client.submit(req("full3"))


async def test_long_generation_is_not_redelivered(nats_url: str) -> None:
    # ack_wait 1.5 s, generation ~4 s: in_progress keeps the work message alive.
    s = isolated_settings(
        nats_url,
        worker={"ack_wait_s": 1.5, "in_progress_every_s": 0.4},
        orchestrator={"ack_wait_s": 1.5, "in_progress_every_s": 0.4},
        sim={"decode_a_ms": 100.0},
    )
    async with stack(s, workers=1) as run:
        client = Client(await nats.connect(nats_url), s)
        t0 = time.monotonic()
        chunks, final = await collect(client, req("long", max_tokens=40))
        assert time.monotonic() - t0 > 3.0
        await client.close()
        assert final.usage.completion_tokens == 40
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        assert run.workers[0].ctx is not None
        assert run.workers[0].ctx.counts["finals"] == 1


async def test_requests_wait_for_capacity_and_batch_when_deep(nats_url: str) -> None:
    s = isolated_settings(
        nats_url, orchestrator={"headroom": 0.0, "max_batch": 8}, sim={"decode_a_ms": 5.0}
    )
    async with stack(s, workers=[{"capacity": 8}, {"capacity": 8}]) as run:
        orch = run.orchestrator
        assert orch is not None
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, sum(orch.ledger.in_flight_by_pool().values()))
                await asyncio.sleep(0.002)  # the sampling period of the watcher, not a wait

        watcher = asyncio.create_task(watch())
        client = Client(await nats.connect(nats_url), s)
        res = await asyncio.gather(*(collect(client, req(f"cap{i}", max_tokens=6)) for i in range(80)))
        watcher.cancel()
        await client.close()
    assert all(f.usage.completion_tokens == 6 for _, f in res)
    assert peak <= 16  # never more in flight than the fleet's 2 x 8 slots
    assert orch.counters["dispatched"] == 80
    assert orch.counters["batches"] < 80  # a deep queue went out in batches


async def test_heartbeats_report_load(nats_url: str, nc: NATS) -> None:
    from cplane.schemas.codec import heartbeat_decoder

    s = isolated_settings(nats_url, worker={"heartbeat_s": 0.2}, sim={"decode_a_ms": 20.0})
    beats = []

    async def on(msg: object) -> None:
        beats.append(heartbeat_decoder.decode(msg.data))  # type: ignore[attr-defined]

    await nc.subscribe(s.subjects.heartbeats_all, cb=on)
    async with stack(s, workers=[{"capacity": 7, "model": "m1"}]):
        client = Client(nc, s)
        handles = [await client.submit(req(f"hb{i}", max_tokens=30, model="m1")) for i in range(3)]
        await until(lambda: any(b.held_items == 3 and b.running >= 1 for b in beats), 15,
                    "a heartbeat while all three run")
        for h in handles:
            await h.result(timeout=20)
    assert beats[0].capacity == 7 and beats[0].models == ["m1"] and beats[0].engine == "sim"
    assert max(b.running for b in beats) >= 1
    assert max(b.held_items for b in beats) == 3
    assert beats[-1].state == "stopped"


async def test_absent_model_waits_then_gets_retryable_error(nats_url: str, nc: NATS) -> None:
    # A model no worker serves waits model_wait_s (a rolling restart), then
    # gets the retryable model_unavailable; a worker that appears in time serves it.
    s = isolated_settings(nats_url, sim={"zero_cost": True}, orchestrator={"model_wait_s": 1.0})
    async with stack(s, workers=1) as run:
        client = Client(nc, s)
        t0 = time.monotonic()
        h = await client.submit(req("nomodel", model="gpt-17"))
        term = await h.terminal(timeout=10)
        assert isinstance(term, ErrorReply) and term.code == "model_unavailable"
        assert term.retryable and time.monotonic() - t0 >= 1.0
        late = await client.submit(req("late-model", model="m-late"))
        await start_worker(s, run, worker_id="w-late", model="m-late")
        final = await late.result(timeout=10)
        assert final.workers == ["w-late"]


async def test_mixed_models_go_to_workers_that_serve_them(nats_url: str, nc: NATS) -> None:
    s = isolated_settings(nats_url, sim={"zero_cost": True})
    async with stack(s, workers=[{"worker_id": "wa", "model": "ma"},
                                 {"worker_id": "wb", "model": "mb"}]):
        client = Client(nc, s)
        finals = await asyncio.gather(*(
            client.generate(req(f"mm{i}", model="ma" if i % 2 else "mb"), timeout=10)
            for i in range(20)))
    for i, f in enumerate(finals):
        assert f.workers == ["wa" if i % 2 else "wb"] and f.model == ("ma" if i % 2 else "mb")
