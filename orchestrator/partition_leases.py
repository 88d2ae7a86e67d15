"""Partitioned leadership, the I/O part: one `LeaderLease` per partition, the replica's
announcement, and the balancing step (orchestrator/partitions.py `plan_leases`).

Every `lease_renew_s`: announce this replica (`replica.<id>`, TTL'd like the
leases), renew the leases it holds (each fenced on its own, as lease.py says:
a lease not renewed for `ttl - renew` is not acted on, and steps down), read the
live replicas and every other lease's holder, then acquire and release as the
plan says. Three times in between it reads them again and acquires only (a
free partition is taken within a quarter period of its lapse). Leadership
changes (`on_change(pool, leading)`) run as tasks, in order per partition, so
a partition stepping down (which waits for its work publishes) never delays
the renewal of the others; a partition is not acquired again while its
step-down still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue

from cplane.bus.kv_keys import live_entries
from cplane.bus.provision import ensure_lease_bucket
from cplane.orchestrator.lease import LeaderLease
from cplane.orchestrator.partitions import (
    REPLICA_PREFIX,
    PartitionMap,
    describe,
    lease_key,
    plan_leases,
    replica_key,
)
from cplane.schemas.settings import Settings
from cplane.schemas.subjects import DEFAULT_PARTITION

log = logging.getLogger("cplane.lease")
_PROBES = 4  # looks for free partitions per renewal period
OnPartition = Callable[[str, bool], Awaitable[None]]


class PartitionLeases:
    def __init__(self, js: JetStreamContext, settings: Settings, holder: str,
                 partitions: PartitionMap, on_change: OnPartition) -> None:
        self._js = js
        self._settings = settings
        self.holder = holder
        self.pools = partitions.pools
        self._on_change = on_change
        self.renew_s = settings.orchestrator.lease_renew_s
        self._kv: KeyValue | None = None
        self.leases: dict[str, LeaderLease] = {}
        self._changes: dict[str, asyncio.Task[None]] = {}
        # Released on purpose (a handover, the exit): the key goes only once the step-down
        # (its work publishes finished, its held requests naked) is done, as lease.py's.
        self._graceful: set[str] = set()
        self._releases: dict[str, asyncio.Task[None]] = {}
        self._free_before: set[str] = set()
        self.replicas: set[str] = set()  # live at the last renewal (this one included)

    def valid(self, pool: str) -> bool:
        lease = self.leases.get(pool)
        return lease is not None and lease.valid()

    def any_valid(self) -> bool:
        return any(lease.valid() for lease in self.leases.values())

    def stale(self) -> bool:
        """A lease still held but too old to act on (a stall): what it holds must wait."""
        return any(lease.leading and not lease.valid() for lease in self.leases.values())

    async def run(self, stop: asyncio.Event) -> None:
        """Balance, renew and fence until `stop`; then release every lease held. Between
        two renewals, free partitions are looked for `_PROBES` times, so a dead
        leader's partition is taken within a fraction of `renew_s` of its lapse."""
        last_renewal = -self.renew_s
        try:
            while not stop.is_set():
                renew = time.monotonic() - last_renewal >= self.renew_s * 0.99
                if renew:
                    last_renewal = time.monotonic()
                try:
                    await self._step(renew)
                except Exception as exc:  # broker away: each lease fences itself
                    log.debug("partition lease step failed: %s", exc)
                    if isinstance(exc, BucketNotFoundError):  # gone with the broker
                        self._kv = None
                left = self.renew_s / _PROBES - (time.monotonic() - last_renewal) % (
                    self.renew_s / _PROBES)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.02, left))
        finally:
            await self.release_all()

    def _lease(self, kv: KeyValue, pool: str) -> LeaderLease:
        lease = self.leases.get(pool)
        if lease is None:
            async def changed(leading: bool, pool: str = pool) -> None:
                self._change(pool, leading)
                if not leading and pool in self._graceful:
                    await asyncio.gather(self._changes[pool], return_exceptions=True)

            lease = LeaderLease(self._js, self._settings, self.holder, changed,
                                key=lease_key(pool), kv=kv)
            self.leases[pool] = lease
        return lease

    def _change(self, pool: str, leading: bool) -> None:
        before = self._changes.get(pool)

        async def apply() -> None:
            if before is not None:
                await asyncio.gather(before, return_exceptions=True)
            try:
                await self._on_change(pool, leading)
            except Exception:
                log.exception("partition %s: leadership change failed", describe(pool))

        self._changes[pool] = asyncio.create_task(apply(), name=f"lead-{describe(pool)}")

    def _changing(self, pool: str) -> bool:
        return any(t is not None and not t.done()
                   for t in (self._changes.get(pool), self._releases.get(pool)))

    async def _release(self, pool: str) -> None:
        """Step down, then delete the key (a task: the renewals of the others go on)."""
        self._graceful.add(pool)
        try:
            await self.leases[pool].release()
        finally:
            self._graceful.discard(pool)

    async def _step(self, renew: bool) -> None:
        """`renew`: announce, renew, then plan (acquire and release); else (a probe)
        plan acquisitions only, on a fresh view of the replicas and holders."""
        if self._kv is None:
            self._kv = await ensure_lease_bucket(self._js, self._settings)
        kv = self._kv
        timeout = self.renew_s
        if renew:
            # The announcement first: it then lapses just before a dead replica's leases,
            # so the survivors' plan no longer counts it when they find them free.
            await asyncio.wait_for(kv.put(replica_key(self.holder), b"1"), timeout)
            # Renewals next: what follows may be slow, and a renewal is what fences.
            for pool in self.pools:
                lease = self.leases.get(pool)
                if lease is not None and lease.leading:
                    await lease.step()
        self.replicas = await self._live(kv) | {self.holder}
        holders = await self._holders(kv)
        plan = plan_leases(self.holder, self.pools, self.replicas, holders, self._free_before)
        if renew:  # "free at the last renewal too": a renewal period apart
            self._free_before = {p for p, h in holders.items() if h is None}
            for pool in plan.release:
                if self._changing(pool):
                    continue
                log.info("%s hands partition %s to its share's replica", self.holder,
                         describe(pool))
                self._releases[pool] = asyncio.create_task(self._release(pool),
                                                           name=f"release-{describe(pool)}")
        for pool in plan.acquire:
            if not self._changing(pool):
                await self._lease(kv, pool).step()

    async def _holders(self, kv: KeyValue) -> dict[str, str | None]:
        """Each partition's lease holder now (None: free)."""
        holders: dict[str, str | None] = {}
        for pool in self.pools:
            lease = self.leases.get(pool)
            if lease is not None and lease.leading:
                holders[pool] = self.holder
                continue
            try:
                entry = await asyncio.wait_for(kv.get(lease_key(pool)), self.renew_s)
                holders[pool] = entry.value.decode() if entry.value else None
            except (KeyNotFoundError, KeyDeletedError):  # expired or deleted: free
                holders[pool] = None
        return holders

    async def _live(self, kv: KeyValue) -> set[str]:
        # Not kv.keys(): it can list nothing under load (bus/kv_keys.py).
        entries = await asyncio.wait_for(live_entries(
            self._js, kv, self._settings.subjects.leases_bucket, REPLICA_PREFIX), self.renew_s)
        return {k[len(REPLICA_PREFIX):] for k in entries}

    async def release_all(self) -> None:
        """Graceful exit: every lease released (its partition's standby takes over at
        its next renewal), the announcement deleted, the step-downs awaited."""
        await asyncio.gather(*self._releases.values(), return_exceptions=True)
        self._graceful.update(self.leases)
        for lease in self.leases.values():
            await lease.release()
        if self._kv is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._kv.delete(replica_key(self.holder)), 2.0)
        await asyncio.gather(*self._changes.values(), return_exceptions=True)


__all__ = ["DEFAULT_PARTITION", "PartitionLeases"]
