"""What leading changes on one replica: it pulls requests, and counts what the
previous leader left running.

- `begin` (the lease was gained): one `Puller` per priority on LLM_REQ, each
  kept as full as `room(level)` allows; `end` (the lease was lost) stops them.
- `inherited`: a new leader's ledger knows nothing of what its predecessor
  dispatched, yet that work runs on the workers and fills their slots. Until
  it has drained, the dispatch step takes what the workers report holding as a
  floor (`DecisionCore.step(inherited=...)`); the larger count wins per pool.
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
from cplane.orchestrator.snapshot import PoolKey
from cplane.schemas.messages import PRIORITIES
from cplane.schemas.settings import Settings
from cplane.schemas.subjects import consumer_for_priority

log = logging.getLogger("cplane.orchestrator")


class Leadership:
    """The pullers of a leading replica, and since when it leads while work a previous
    leader dispatched may still run (`since`; None: drained, or not leading)."""

    def __init__(self, settings: Settings, holder: str,
                 on_request: Callable[[Msg], Awaitable[None]], room: Callable[[int], int]
                 ) -> None:
        self._settings = settings
        self._holder = holder
        self._on_request = on_request
        self._room = room
        self._pullers: list[Puller] = []
        self.since: float | None = None

    async def begin(self, nc: NATS, js: JetStreamContext) -> None:
        """The lease was gained: pull every priority's requests."""
        self.since = time.monotonic()
        o = self._settings.orchestrator
        await ensure_request_consumers(js, self._settings)
        for level, p in enumerate(PRIORITIES):
            puller = Puller(nc, self._settings.streams.req.name, consumer_for_priority(p),
                            self._on_request, room=functools.partial(self._room, level),
                            expires_s=o.fetch_timeout_s, max_batch=o.fetch_batch)
            await puller.start()
            self._pullers.append(puller)

    async def end(self) -> None:
        """The lease was lost: take no more requests."""
        pullers, self._pullers = self._pullers, []
        for puller in pullers:
            await puller.stop()

    def poke(self) -> None:
        """Room was made: pull again now."""
        for puller in self._pullers:
            puller.poke()

    def inherited(self, fleet: FleetView, ledger: Ledger) -> dict[PoolKey, int] | None:
        """What the workers report holding, per pool, counted on top of the ledger, until
        that work has drained: every pool's workers report no more than this replica
        dispatched, at heartbeats sent after the takeover (two periods). Not always:
        heartbeats lag by up to a period and would hold back dispatch that the ledger
        knows is safe."""
        if self.since is None:
            return None
        held = {pool: fleet.pool_held(pool) for pool in free_slots(fleet, {}, 0.0)}
        settled = time.monotonic() - self.since > 2 * self._settings.worker.heartbeat_s
        if settled and all(n <= ledger.in_flight(pool) for pool, n in held.items()):
            log.info("orchestrator %s: the previous leader's work has drained", self._holder)
            self.since = None
            return None
        return held


__all__ = ["Leadership"]
