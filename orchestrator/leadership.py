"""What leading changes on one replica: it pulls requests, and counts what the
previous leader left running. Per partition (orchestrator/partitions.py): an
unpartitioned fleet has one, the default.

- `begin(pool)` (that partition's lease was gained): one `Puller` per priority on
  the partition's request consumers, each kept as full as `room(level)` allows;
  `end(pool)` (the lease was lost) stops them.
- `inherited`: a new leader's ledger knows nothing of what its predecessor
  dispatched, yet that work runs on the workers and fills their slots. Until
  it has drained, the dispatch step takes what the workers report holding as a
  floor (`DecisionCore.step(inherited=...)`); the larger count wins per pool.
  Only the pools of the partitions taken over count: another partition's
  workers hold work this replica never dispatched, and always will.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from cplane.bus.provision import ensure_request_consumers
from cplane.bus.puller import Puller
from cplane.orchestrator.dispatch import free_slots
from cplane.orchestrator.fleet import FleetView
from cplane.orchestrator.ledger import Ledger
from cplane.orchestrator.partitions import PartitionMap, describe
from cplane.orchestrator.snapshot import PoolKey
from cplane.schemas.messages import PRIORITIES
from cplane.schemas.settings import Settings
from cplane.schemas.subjects import DEFAULT_PARTITION, consumer_for_priority

log = logging.getLogger("cplane.orchestrator")


class Leadership:
    """The pullers of each partition this replica leads, and since when it leads one
    while work a previous leader dispatched may still run (`since`, by pool token;
    absent: drained, or not leading)."""

    def __init__(self, settings: Settings, holder: str,
                 on_request: Callable[[Msg], Awaitable[None]], room: Callable[[int], int],
                 partitions: PartitionMap | None = None) -> None:
        self._settings = settings
        self._holder = holder
        self._on_request = on_request
        self._room = room
        self._partitions = partitions or PartitionMap({})
        self._pullers: dict[str, list[Puller]] = {}
        self.since: dict[str, float] = {}

    async def begin(self, nc: NATS, js: JetStreamContext, pool: str = DEFAULT_PARTITION) -> None:
        """A partition's lease was gained: pull every priority's requests of it."""
        self.since[pool] = time.monotonic()
        o = self._settings.orchestrator
        await ensure_request_consumers(js, self._settings, pool)
        pullers = self._pullers.setdefault(pool, [])
        for level, p in enumerate(PRIORITIES):
            puller = Puller(nc, self._settings.streams.req.name, consumer_for_priority(p, pool),
                            self._on_request, room=functools.partial(self._room, level),
                            expires_s=o.fetch_timeout_s, max_batch=o.fetch_batch)
            await puller.start()
            pullers.append(puller)

    async def end(self, pool: str = DEFAULT_PARTITION) -> None:
        """A partition's lease was lost: take no more of its requests."""
        self.since.pop(pool, None)
        for puller in self._pullers.pop(pool, []):
            await puller.stop()

    def poke(self) -> None:
        """Room was made: pull again now."""
        for pullers in self._pullers.values():
            for puller in pullers:
                puller.poke()

    def inherited(self, fleet: FleetView, ledger: Ledger) -> dict[PoolKey, int] | None:
        """What the workers report holding, per pool of a partition taken over, counted on
        top of the ledger, until that work has drained: every such pool's workers
        report no more than this replica dispatched, at heartbeats sent after the
        takeover (two periods). Not always: heartbeats lag by up to a period and would
        hold back dispatch that the ledger knows is safe."""
        if not self.since:
            return None
        settle_s = 2 * self._settings.worker.heartbeat_s
        now = time.monotonic()
        of_model = self._partitions.of_model
        pools = list(free_slots(fleet, {}, 0.0))
        # Every pool is named (the core counts only the pools named here): 0 on top of
        # the ledger for the pools of partitions drained or led by others.
        held: dict[PoolKey, int] = dict.fromkeys(pools, 0)
        inheriting = False
        for part, since in list(self.since.items()):
            mine = {pool: fleet.pool_held(pool) for pool in pools if of_model(pool[1]) == part}
            if now - since > settle_s and all(n <= ledger.in_flight(pool)
                                              for pool, n in mine.items()):
                log.info("orchestrator %s: the previous leader's work has drained (partition "
                         "%s)", self._holder, describe(part))
                del self.since[part]
                continue
            held.update(mine)
            inheriting = True
        return held if inheriting else None


__all__ = ["Leadership"]
