"""Which partitions this replica leads, whichever lease runs: the one leader lease
(lease.py) or one lease per partition (partition_leases.py, docs/replicas.md).
The service asks it before every intake, plan, publish retry and rescue."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from nats.js import JetStreamContext

from cplane.orchestrator.lease import LeaderLease
from cplane.orchestrator.ledger import Entry
from cplane.orchestrator.partition_leases import PartitionLeases
from cplane.orchestrator.partitions import PartitionMap
from cplane.schemas.settings import Settings
from cplane.schemas.subjects import DEFAULT_PARTITION


class Leads:
    def __init__(self, partitions: PartitionMap) -> None:
        self.partitions = partitions
        self.lease: LeaderLease | None = None  # unpartitioned
        self.partition_leases: PartitionLeases | None = None

    def start(self, js: JetStreamContext, settings: Settings, holder: str,
              on_change: Callable[[str, bool], Awaitable[None]], stop: asyncio.Event
              ) -> Coroutine[Any, Any, None]:
        """The lease(s) to run until `stop`: one per partition when partitions are set.
        `on_change(pool, leading)`: unpartitioned, the pool is the default partition."""
        if self.partitions.enabled:
            self.partition_leases = PartitionLeases(js, settings, holder, self.partitions,
                                                    on_change)
            return self.partition_leases.run(stop)
        self.lease = LeaderLease(js, settings, holder,
                                 on_change=lambda leading: on_change(DEFAULT_PARTITION, leading))
        return self.lease.run(stop)

    @property
    def leading(self) -> bool:
        """Leads (some partition), by a lease renewed recently enough to act on
        (LeaderLease.valid)."""
        if self.partition_leases is not None:
            return self.partition_leases.any_valid()
        return self.lease is not None and self.lease.valid()

    def leads(self, pool: str) -> bool:
        """Leads partition `pool` (its token; unpartitioned: the one, default) now."""
        if self.partition_leases is not None:
            return self.partition_leases.valid(pool)
        return self.leading

    @property
    def fleet(self) -> bool:
        """Runs the fleet-wide duties (rescue, orphan sweep): leads the default partition."""
        return self.leads(DEFAULT_PARTITION)

    def entries(self, entries: Iterable[Entry[Any]]) -> bool:
        """Leads the partition of every one of `entries` (a batch is of one model)."""
        return all(self.leads(self.partitions.of_model(e.pending.model)) for e in entries)

    def stale(self) -> bool:
        """Some partition's lease is too old to act on (this process stalled)."""
        return self.partition_leases is not None and self.partition_leases.stale()


__all__ = ["Leads"]
