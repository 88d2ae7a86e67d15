"""The SDK: order, repeats, replay from LLM_OUT, foreign messages, refusals, timeouts, recovery."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from nats.aio.client import Client as NATS

from cplane.bus.provision import ensure_streams
from cplane.client.sdk import Client, RejectedAtPublish, RequestHandle, StreamGap, Unavailable
from cplane.schemas.messages import Final, FinishReason, Request, TokenChunk
from tests.natsfix import PublishCount, isolated_settings
from tests.waiting import until


def chunk(seq: int) -> TokenChunk:
    return TokenChunk(request_id="r1", seq=seq, token_ids=[seq], text=f"<{seq}>")


async def test_chunks_in_order_without_repeats(nats_url: str, nc: NATS) -> None:
    client = Client(nc, isolated_settings(nats_url))
    h = RequestHandle(client, Request(request_id="r1", prompt="x"))
    for seq in (1, 0, 0, 2, 1, 3):  # out of order and repeated (a hand-over)
        h._take(chunk(seq))
    h._take(Final(request_id="r1", finish_reason=FinishReason.LENGTH, chunks=4))
    assert [c.seq async for c in h] == [0, 1, 2, 3]
    assert (await h.result()).chunks == 4


async def test_missed_chunks_are_replayed_from_the_out_stream(nats_url: str, nc: NATS) -> None:
    s = isolated_settings(nats_url)
    await ensure_streams(nc.jetstream(), s)
    client = Client(nc, s)
    # chunks 0..2 went out before this handle listened; LLM_OUT captured them
    for seq in range(3):
        await nc.publish(s.subjects.out_store("i", "r1"), msgspec.json.encode(chunk(seq)))
    await nc.flush()
    h = RequestHandle(client, Request(request_id="r1", prompt="x"))
    h._take(chunk(3))
    h._take(Final(request_id="r1", finish_reason=FinishReason.LENGTH, chunks=4))
    assert [c.seq async for c in h] == [0, 1, 2, 3]


async def test_chunks_lost_for_good_end_the_stream_with_a_reported_gap(
        nats_url: str, nc: NATS) -> None:
    """Chunks 1..2 neither seen live nor in LLM_OUT (aged out): the iteration ends with
    StreamGap carrying the whole Final, never silently short."""
    s = isolated_settings(nats_url)
    await ensure_streams(nc.jetstream(), s)
    h = RequestHandle(Client(nc, s), Request(request_id="r1", prompt="x"))
    h._take(chunk(0))
    final = Final(request_id="r1", finish_reason=FinishReason.LENGTH, chunks=3, text="<0><1><2>")
    h._take(final)
    seen = []
    with pytest.raises(StreamGap) as gap:
        async for c in h:
            seen.append(c.seq)
    assert seen == [0] and gap.value.missing == range(1, 3) and gap.value.final == final
    assert (await h.result()) == final  # the answer itself is whole


async def test_messages_of_other_requests_or_subjects_are_dropped(nats_url: str, nc: NATS) -> None:
    """Only a chunk on llm.out.<g>.<id> and a terminal on llm.done.<g>.<id>, with that id, count."""
    s = isolated_settings(nats_url)
    client = Client(nc, s)
    subj = s.subjects
    h = RequestHandle(client, Request(request_id="r1", prompt="x"))
    client._open.add(h)
    h._sub = await nc.subscribe(subj.outputs_of("i", "r1"), cb=h._on_msg)
    forged = TokenChunk(request_id="r1", seq=0, token_ids=[9], text="forged")
    bogus = [
        (subj.out("i", "r1"), TokenChunk(request_id="r2", seq=0, token_ids=[9], text="other")),
        (subj.done("i", "r1"), forged),  # a chunk on the done subject
        (f"{subj.prefix}.req.i.r1", forged),  # neither out nor done
        (subj.out("i", "r1"), Final(request_id="r1", finish_reason=FinishReason.STOP)),
        (subj.done("i", "r1"), Final(request_id="r2", finish_reason=FinishReason.STOP)),
    ]
    for subject, msg in bogus:
        await nc.publish(subject, msgspec.json.encode(msg))
    await nc.publish(subj.out("i", "r1"), b"\xff not json")
    await nc.publish(subj.out("i", "r1"), msgspec.json.encode(chunk(0)))
    await nc.publish(subj.done("i", "r1"), msgspec.json.encode(
        Final(request_id="r1", finish_reason=FinishReason.LENGTH, chunks=1, text="<0>")))
    chunks = [c async for c in h]  # ends at the real Final; bogus ones came first
    assert [(c.seq, c.text) for c in chunks] == [(0, "<0>")]
    assert (await h.result(timeout=5)).finish_reason == FinishReason.LENGTH
    assert h.closed


@pytest.mark.parametrize("field,value", [
    ("reply_to", "llm.done.i.victim"),
    ("reply_to", "my.inbox"),
    ("reply_to", "_INBOX.>"),
    ("group", "invalid"),
    ("group", "any"),
    ("group", "a.b"),
    ("request_id", "x.>"),
])
async def test_refused_before_publishing(nats_url: str, nc: NATS, field: str, value: str) -> None:
    s = isolated_settings(nats_url)
    await ensure_streams(nc.jetstream(), s)
    client = Client(nc, s)
    req = msgspec.structs.replace(Request(request_id="r1", prompt="x"), **{field: value})
    with pytest.raises(RejectedAtPublish):
        await client.submit(req)
    assert (await nc.jetstream().stream_info(s.streams.req.name)).state.messages == 0
    assert not client._open
    ok = Request(request_id="r2", prompt="x", reply_to="_INBOX.mine.1")
    await client.submit(ok)  # an _INBOX reply_to is fine
    assert (await nc.jetstream().stream_info(s.streams.req.name)).state.messages == 1


async def test_a_publish_no_stream_answers_is_sent_again_until_one_does(
    nats_url: str, nc: NATS
) -> None:
    """No responders (what a cluster answers while it elects a stream's leader) is
    not a bad request: the publish goes again until LLM_REQ answers or the timeout
    ends it with Unavailable, a TimeoutError."""
    s = isolated_settings(nats_url)
    client = Client(nc, s)
    tries = PublishCount(client.js)
    with pytest.raises(Unavailable, match="no stream took"):
        await client.submit(Request(request_id="r0", prompt="x"), timeout=0.5)
    assert tries.n > 2 and not client._open
    before = tries.n
    pending = asyncio.ensure_future(client.submit(Request(request_id="r1", prompt="x"),
                                                  timeout=30))
    await until(lambda: tries.n - before >= 2, 10, "a publish sent again after no responders")
    await ensure_streams(nc.jetstream(), s)
    handle = await pending
    assert handle.request.request_id == "r1"
    assert (await nc.jetstream().stream_info(s.streams.req.name)).state.messages == 1


async def test_generate_times_out_by_default_and_cancels(nats_url: str, nc: NATS) -> None:
    """No orchestrator runs: generate() gives up after the client's default and cancels."""
    s = isolated_settings(nats_url)
    await ensure_streams(nc.jetstream(), s)
    client = Client(nc, s, default_timeout_s=0.3)
    cancels = await nc.subscribe(s.subjects.cancel("r-late"))
    with pytest.raises(TimeoutError):
        await client.generate(Request(request_id="r-late", prompt="x"))
    await cancels.next_msg(timeout=5)  # the abandoned request was cancelled
    assert not client._open


async def test_recover_reads_chunks_and_terminal_stored_while_away(
    nats_url: str, nc: NATS
) -> None:
    """What a reconnect calls: chunks from LLM_OUT and the terminal from LLM_DONE."""
    s = isolated_settings(nats_url)
    js = nc.jetstream()
    await ensure_streams(js, s)
    client = Client(nc, s)
    h = RequestHandle(client, Request(request_id="r1", prompt="x"))
    client._open.add(h)
    for seq in range(3):  # published while the handle heard nothing
        await js.publish(s.subjects.out_store("i", "r1"), msgspec.json.encode(chunk(seq)))
    await js.publish(s.subjects.out_store("i", "r9"), msgspec.json.encode(chunk(3)))  # another id
    await js.publish(s.subjects.done_store("i", "r1"), msgspec.json.encode(
        Final(request_id="r1", finish_reason=FinishReason.LENGTH, chunks=3)))
    await client.recover()
    assert (await h.result(timeout=5)).chunks == 3
    assert [c.seq async for c in h] == [0, 1, 2]
    assert not client._open


async def test_a_quiet_request_reads_outputs_whose_live_copy_was_lost(
    nats_url: str, nc: NATS
) -> None:
    """LLM_OUT republishes once: chunks 0..1 and the Final stored while nobody listened
    (a node that died before republishing, a publish repeated after a lost ack) never
    reach the subscription. The quiet handle replays the gap and reads the Final."""
    s = isolated_settings(nats_url)
    js = nc.jetstream()
    await ensure_streams(js, s)
    for seq in range(2):  # stored, republished to nobody
        await js.publish(s.subjects.out_store("i", "r1"), msgspec.json.encode(chunk(seq)))
    client = Client(nc, s, quiet_lookup_s=0.2)
    h = await client.submit(Request(request_id="r1", prompt="x"))  # no orchestrator runs
    await js.publish(s.subjects.out_store("i", "r1"), msgspec.json.encode(chunk(2)))  # seen live
    chunks = aiter(h)
    seen = [(await asyncio.wait_for(anext(chunks), 10)).seq for _ in range(3)]
    assert seen == [0, 1, 2] and not h.settled()  # the gap was filled before any terminal
    sub, h._sub = h._sub, None  # the terminal's live copy is lost
    assert sub is not None
    await sub.unsubscribe()
    await js.publish(s.subjects.done_store("i", "r1"), msgspec.json.encode(
        Final(request_id="r1", finish_reason=FinishReason.LENGTH, chunks=3)))
    assert (await h.result(timeout=10)).chunks == 3
    assert [c async for c in chunks] == []  # the stream ends at the Final, whole
    assert client.quiet.looked_up >= 1 and client.quiet.recovered >= 1 and not client._open
    await client.close()
