"""Run fences: once a run that took a request over wrote its fence, LLM_OUT refuses
every chunk and terminal of the run before it, however late they arrive (the
bytes of a dead worker that a healed partition delivers after its successor began)."""

from __future__ import annotations

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from cplane.bus.outcome import StoredPublisher, terminal_msg_id
from cplane.bus.provision import ensure_streams
from cplane.bus.replay import streamed_chunks
from cplane.bus.stored_retry import StoreResult, publish_until_stored
from cplane.schemas.codec import encode
from cplane.schemas.messages import (
    Final,
    FinishReason,
    Priority,
    Request,
    TokenChunk,
    WorkItem,
)
from cplane.schemas.settings import Settings
from cplane.workers.chunker import ChunkStream
from cplane.workers.run_fence import close_run_fence, store_fence, write_run_fence
from tests.natsfix import isolated_settings
from tests.waiting import until


async def test_outputs_of_a_superseded_run_are_refused_however_late(
        nats_url: str, nc: NATS) -> None:
    s = isolated_settings(nats_url)
    js, subj = nc.jetstream(), s.subjects
    await ensure_streams(js, s)
    first = WorkItem(request=Request(request_id="rf1", prompt="x"), priority=Priority.NORMAL,
                     slo_class="standard")
    out = [subj.out_store("i", "rf1")]

    def stream(item: WorkItem, worker: str) -> ChunkStream:
        return ChunkStream(nc.publish, out, "rf1", worker, next_seq=item.next_seq,
                           store_fence=store_fence(subj, item))

    old = stream(first, "w-old")
    await old.add([1], "a")  # a first run (no fence written): stored
    await nc.flush()
    # The run taking over writes its fence, then continues after what was stored.
    seq = await write_run_fence(js, subj, first, "w-new", 5.0)
    assert seq > 0
    took_over = msgspec.structs.replace(first, fence_seq=seq, next_seq=1)
    new = stream(took_over, "w-new")
    # The old run's next chunk arrives late (a healed partition), before and after
    # the new run's: refused both times.
    await old.add([2], "b")
    await new.add([3], "c")
    await old.add([4], "d")
    await nc.flush()
    stored = await streamed_chunks(js, s, "i", "rf1")
    assert [(c.seq, c.text, c.worker_id) for c in stored] == [(0, "a", "w-old"),
                                                             (1, "c", "w-new")]
    store = StoredPublisher(nc, 5.0)
    done = subj.done_store("i", "rf1")

    async def terminal(item: WorkItem, text: str) -> StoreResult:
        final = Final(request_id="rf1", finish_reason=FinishReason.LENGTH, chunks=2, text=text)
        return await publish_until_stored(store, done, encode(final),
                                          terminal_msg_id("i", "rf1"), window_s=10.0,
                                          headers=store_fence(subj, item))

    assert await terminal(first, "abd") is StoreResult.CONFLICT  # the old run's Final
    assert await terminal(took_over, "ac") is StoreResult.STORED
    # A third run takes over: the second's outputs are refused from then on.
    assert await write_run_fence(js, subj, took_over, "w-third", 5.0) > seq
    await new.add([5], "e")
    await nc.flush()
    assert [c.seq for c in await streamed_chunks(js, s, "i", "rf1")] == [0, 1]


async def test_a_run_fence_outlives_the_streams_max_age(nats_url: str, nc: NATS) -> None:
    """A run may stream for longer than LLM_OUT keeps chunks (max_age, 1 s here): its
    fence stays (`Nats-TTL: never`), so its later chunks are stored, and a dead run's
    still refused."""
    s = isolated_settings(nats_url, stream_out={"max_age_s": 1.0, "duplicate_window_s": 1.0})
    js, subj = nc.jetstream(), s.subjects
    await ensure_streams(js, s)
    first = WorkItem(request=Request(request_id="rf2", prompt="x"), priority=Priority.NORMAL,
                     slo_class="standard")
    seq = await write_run_fence(js, subj, first, "w-new", 5.0)
    took_over = msgspec.structs.replace(first, fence_seq=seq)
    subject = subj.fence_store("i", "rf2")
    out = [subj.out_store("i", "rf2")]
    new = ChunkStream(nc.publish, out, "rf2", "w-new", store_fence=store_fence(subj, took_over))
    await new.add([0], "z")
    await nc.flush()
    # Past max_age: the chunk is gone, the fence is not.
    await until(lambda: _fence_alone(js, s), 10, "LLM_OUT's max_age to pass")
    assert (await js.get_last_msg(s.streams.out.name, subject)).seq == seq
    old = ChunkStream(nc.publish, out, "rf2", "w-old", next_seq=5,
                      store_fence=store_fence(subj, first))
    # What is stored is republished at once (what is refused never is): read it there,
    # before max_age could take it from the stream on a slow machine.
    live = await nc.subscribe(subj.out("i", "rf2"))
    await new.add([1], "a")
    await old.add([2], "late")
    await new.add([3], "b")  # after the late one on the same connection
    seen = [chunk_of(await live.next_msg(10)) for _ in range(2)]
    assert [(c.seq, c.worker_id, c.text) for c in seen] == [(1, "w-new", "a"),
                                                           (2, "w-new", "b")]


async def test_a_closed_run_fence_keeps_refusing_then_ages_out(nats_url: str, nc: NATS) -> None:
    """Fences are kept forever while their run streams: once the run's terminal is
    stored it closes its fence, so a fleet that migrates requests for months does not
    keep one per takeover. The closing fence still refuses an earlier run's late
    bytes, then goes with max_age (5 s here: the refusal is checked well before), as the
    request's chunks do."""
    s = isolated_settings(nats_url, stream_out={"max_age_s": 5.0, "duplicate_window_s": 1.0})
    js, subj = nc.jetstream(), s.subjects
    await ensure_streams(js, s)
    first = WorkItem(request=Request(request_id="rf3", prompt="x"), priority=Priority.NORMAL,
                     slo_class="standard")
    assert not await close_run_fence(js, subj, first, "w", 5.0)  # no fence
    seq = await write_run_fence(js, subj, first, "w-new", 5.0)
    took_over = msgspec.structs.replace(first, fence_seq=seq)
    # A newer run took it over meanwhile: this run's fence is not closed by it.
    newer = await write_run_fence(js, subj, first, "w-third", 5.0)
    assert not await close_run_fence(js, subj, took_over, "w-new", 5.0)
    newest = msgspec.structs.replace(first, fence_seq=newer)
    assert await close_run_fence(js, subj, newest, "w-third", 5.0)
    fence = subj.fence_store("i", "rf3")
    # One fence per request, not one per takeover: each replaced the one before it.
    info = await js.stream_info(s.streams.out.name, subjects_filter=fence)
    assert info.state.subjects == {fence: 1}
    assert (await js.get_last_msg(s.streams.out.name, fence)).data == b"w-third closed"
    out = [subj.out_store("i", "rf3")]
    live = await nc.subscribe(subj.out("i", "rf3"))
    late = ChunkStream(nc.publish, out, "rf3", "w-old", store_fence=store_fence(subj, first))
    await late.add([0], "late")  # a first run's bytes: refused while the closing fence is kept
    marker = ChunkStream(nc.publish, out, "rf3", "probe")  # unfenced: stored
    await marker.add([7], "probe")
    assert chunk_of(await live.next_msg(10)).worker_id == "probe"

    async def gone() -> bool:
        info = await js.stream_info(s.streams.out.name, subjects_filter=fence)
        return not info.state.subjects

    await until(gone, 15, "LLM_OUT's max_age to take the closing fence")


def chunk_of(msg: Msg) -> TokenChunk:
    return msgspec.json.decode(msg.data, type=TokenChunk)


async def _fence_alone(js: JetStreamContext, s: Settings) -> bool:
    return (await js.stream_info(s.streams.out.name)).state.messages == 1
