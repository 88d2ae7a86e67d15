"""QuietWatch: a quiet handle is looked up at doubling intervals; a progressing,
settled or closed one is not."""

from __future__ import annotations

import asyncio

from cplane.client.quiet import QuietWatch


class Handle:
    def __init__(self, moving: bool = False) -> None:
        self.closed = False
        self.moving = moving
        self.steps = 0
        self.looks: list[float] = []
        self.done = asyncio.Event()
        self.want = 4  # looks until `done`

    def progress(self) -> int:
        if self.moving:
            self.steps += 1
        return self.steps

    def settled(self) -> bool:
        return False

    async def look_again(self) -> bool:
        self.looks.append(asyncio.get_running_loop().time())
        if len(self.looks) == self.want:
            self.done.set()
        return len(self.looks) == 1  # found something the first time only


async def test_quiet_handles_are_looked_up_at_doubling_intervals() -> None:
    watch = QuietWatch(first_s=0.04, max_s=1.0)
    quiet, moving, closed = Handle(), Handle(moving=True), Handle()
    t0 = asyncio.get_running_loop().time()
    for h in (quiet, moving, closed):
        watch.add(h)
    closed.closed = True
    await asyncio.wait_for(quiet.done.wait(), 10)
    assert quiet.looks[0] - t0 >= 0.04
    gaps = [b - a for a, b in zip(quiet.looks, quiet.looks[1:], strict=False)]
    assert all(g >= 0.04 * 2 ** (i + 1) - 1e-3 for i, g in enumerate(gaps)), gaps
    assert moving.looks == [] and closed.looks == []
    assert watch.looked_up == 4
    assert watch.recovered == 1  # the first look found something, the later ones nothing
    watch.close()


async def test_lookups_per_tick_are_bounded_and_the_rest_follow() -> None:
    watch = QuietWatch(first_s=0.04, max_s=10.0, per_tick=2)
    handles = [Handle() for _ in range(5)]
    for h in handles:
        h.want = 1
        watch.add(h)
    await asyncio.wait_for(asyncio.gather(*(h.done.wait() for h in handles)), 10)
    firsts = sorted(h.looks[0] for h in handles)
    assert firsts[2] > firsts[1] and firsts[4] > firsts[3]  # not all in one tick
    watch.close()
