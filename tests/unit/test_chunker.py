"""ChunkStream: each engine step's tokens at once (first token alone), or, with a
minimum interval, gathered between chunks; seq without gaps."""

from __future__ import annotations

import msgspec

from cplane.schemas.messages import TokenChunk
from cplane.workers.chunker import ChunkStream
from tests.waiting import until


class Sink:
    def __init__(self) -> None:
        self.sent: list[tuple[str, TokenChunk]] = []

    async def __call__(self, subject: str, payload: bytes = b"", reply: str = "",
                       headers: dict[str, str] | None = None) -> None:
        chunk = msgspec.json.decode(payload, type=TokenChunk)
        if subject == "out":  # the stored copy: one content per seq (LLM_OUT dedups)
            assert headers == {"Nats-Msg-Id": f"{chunk.request_id}:{chunk.seq}"}
        self.sent.append((subject, chunk))


async def test_every_step_goes_out_at_once() -> None:
    sink = Sink()
    cs = ChunkStream(sink, ["out"], "r", "w")
    await cs.add([0], "<0>")
    await cs.add([1, 2], "<1><2>")  # a step the caller fell behind on: one chunk
    await cs.add([3], "<3>")
    assert [c.token_ids for _, c in sink.sent] == [[0], [1, 2], [3]]  # no flush needed
    assert [c.seq for _, c in sink.sent] == [0, 1, 2]
    assert cs.tokens_sent == 4 and cs.token_ids == [0, 1, 2, 3]
    await cs.flush()  # nothing waits
    assert len(sink.sent) == 3


async def test_min_interval_gathers_then_the_timer_flushes() -> None:
    sink = Sink()
    cs = ChunkStream(sink, ["out", "reply"], "r", "w", next_seq=5, max_tokens=100,
                     min_interval_s=0.05)
    await cs.add([1], "a")  # the first token: alone, at once, to both subjects
    await cs.add([2], "b")
    await cs.add([3], "c")
    assert [(s, c.seq, c.token_ids) for s, c in sink.sent] == [("out", 5, [1]),
                                                              ("reply", 5, [1])]
    await until(lambda: len(sink.sent) == 4, 1, "the timer's flush")
    assert [(s, c.seq, c.token_ids) for s, c in sink.sent[2:]] == [("out", 6, [2, 3]),
                                                                  ("reply", 6, [2, 3])]
    cs.close()


async def test_min_interval_still_flushes_at_max_tokens() -> None:
    sink = Sink()
    cs = ChunkStream(sink, ["out"], "r", "w", max_tokens=4, min_interval_s=10.0)
    for t in range(9):
        await cs.add([t], f"<{t}>")
    await cs.flush()
    chunks = [c for _, c in sink.sent]
    assert [c.token_ids for c in chunks] == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    assert "".join(c.text for c in chunks) == "".join(f"<{t}>" for t in range(9))
