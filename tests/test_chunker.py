"""ChunkStream: first token at once, then by count or age, seq without gaps."""

from __future__ import annotations

import asyncio

import msgspec

from schemas.messages import TokenChunk
from workers.chunker import ChunkStream


class Sink:
    def __init__(self) -> None:
        self.sent: list[tuple[str, TokenChunk]] = []

    async def __call__(self, subject: str, data: bytes) -> None:
        self.sent.append((subject, msgspec.json.decode(data, type=TokenChunk)))


async def test_first_token_alone_then_by_count() -> None:
    sink = Sink()
    cs = ChunkStream(sink, ["out"], "r", "w", max_tokens=4, max_age_s=10.0)
    for t in range(9):
        await cs.add([t], f"<{t}>")
    await cs.flush()
    chunks = [c for _, c in sink.sent]
    assert [c.token_ids for c in chunks] == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    assert [c.seq for c in chunks] == [0, 1, 2]
    assert "".join(c.text for c in chunks) == "".join(f"<{t}>" for t in range(9))
    assert cs.tokens_sent == 9 and cs.token_ids == list(range(9))


async def test_age_flush_by_timer() -> None:
    sink = Sink()
    cs = ChunkStream(sink, ["out", "reply"], "r", "w", next_seq=5, max_tokens=100,
                     max_age_s=0.02)
    await cs.add([1], "a")
    await cs.add([2], "b")
    assert len(sink.sent) == 2  # the first chunk, to both subjects
    await asyncio.sleep(0.06)
    assert [(s, c.seq, c.token_ids) for s, c in sink.sent] == [
        ("out", 5, [1]), ("reply", 5, [1]), ("out", 6, [2]), ("reply", 6, [2])
    ]
    cs.close()
