"""The batched in-flight signal (bus/fins.py) against a real nats-server."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cplane.bus.fins import MAX_IDS, FinSignals, read_fin
from cplane.schemas.codec import encode
from cplane.schemas.messages import Fin, Finished
from tests.waiting import until


async def _collect(nc: NATS, subject: str) -> tuple[list[list[str]], asyncio.Event]:
    got: list[list[str]] = []
    seen = asyncio.Event()

    async def on(msg: Msg) -> None:
        got.append([f.request_id for f in read_fin(msg.data)])
        seen.set()

    await nc.subscribe(subject, cb=on)
    await nc.flush()
    return got, seen


async def test_one_message_per_loop_turn_and_none_stranded(nc: NATS) -> None:
    got, seen = await _collect(nc, "fintest.fin.*")
    fins = FinSignals(nc)
    for i in range(5):  # one loop turn: one message naming all five
        fins.add("fintest.fin.w1", f"r{i}")
    await asyncio.wait_for(seen.wait(), 5)
    assert got == [[f"r{i}" for i in range(5)]]

    seen.clear()  # a lone one leaves at once, on its own
    fins.add("fintest.fin.w1", "alone")
    await asyncio.wait_for(seen.wait(), 5)
    assert got[-1] == ["alone"]

    # Ids added while a round is publishing go out in the next round, not never.
    want = {f"x{i}" for i in range(MAX_IDS + 10)} | {"late"}
    for rid in sorted(want - {"late"}):
        fins.add("fintest.fin.w2", rid)
    await asyncio.sleep(0)  # one loop turn, no wait: the round starts (the case under test)
    fins.add("fintest.fin.w2", "late")
    await until(lambda: want <= {r for batch in got for r in batch}, 2, "every id, 'late' too")
    assert max(len(b) for b in got) <= MAX_IDS


def test_a_signal_carries_each_terminal_ttft_and_bad_bytes_name_nothing() -> None:
    body = encode(Fin(done=[Finished("a", 12.5), Finished("b")]))
    assert body == b'{"done":[["a",12.5],["b",-1.0]]}'
    assert read_fin(body) == [Finished("a", 12.5), Finished("b", -1.0)]
    assert read_fin(b"a b c") == []
    assert read_fin(b'{"done":[[1,2]]}') == []
