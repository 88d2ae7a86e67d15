"""One active orchestrator at a time: a leader lease in a JetStream KV bucket.

The bucket's entries live `ttl_s` after their last write. The leader
renews its entry every `renew_s` (a compare-and-set on the revision it
wrote last); a standby tries `create` every `renew_s`, which succeeds only
once the entry is gone (expired, or deleted by a leader stepping down
gracefully). Fencing: a leader that has not renewed for `ttl_s - renew_s`
steps down by itself, before any standby can acquire the lease, so two
replicas never dispatch at the same time (see docs/replicas.md). `valid()`
is that age check at the moment of acting: the orchestrator asks it before
every plan, intake, publish retry, keep-alive and rescue, so a leader that
resumes from a stall longer than that acts on nothing it had buffered before
its next renewal tells it whether it still leads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from cplane.bus.provision import ensure_lease_bucket
from cplane.orchestrator.partitions import LEASE_KEY
from cplane.schemas.settings import Settings

log = logging.getLogger("cplane.lease")
OnChange = Callable[[bool], Awaitable[None]]


class LeaderLease:
    def __init__(self, js: JetStreamContext, settings: Settings, holder: str,
                 on_change: OnChange, key: str = LEASE_KEY, kv: KeyValue | None = None) -> None:
        self._js = js
        self.key = key  # one partition's (orchestrator/partitions.py lease_key)
        self._settings = settings
        self.holder = holder
        self.ttl_s = settings.orchestrator.lease_ttl_s
        self.renew_s = settings.orchestrator.lease_renew_s
        self._on_change = on_change
        self._kv: KeyValue | None = kv
        self._revision = 0
        self._renewed_at = 0.0  # monotonic start of the last successful write
        self.leading = False

    async def run(self, stop: asyncio.Event) -> None:
        """Acquire, renew, and step down when fenced, until `stop`; then release."""
        try:
            while not stop.is_set():
                await self._step()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.renew_s)
        finally:
            await self.release()

    async def step(self) -> None:
        """Renew while leading (stepping down when fenced or taken), else try to acquire."""
        await self._step()

    async def _step(self) -> None:
        started = time.monotonic()
        try:
            if self._kv is None:
                self._kv = await ensure_lease_bucket(self._js, self._settings)
            if self.leading:
                self._revision = await asyncio.wait_for(
                    self._kv.update(self.key, self.holder.encode(), last=self._revision),
                    self.renew_s)
                self._renewed_at = started
            else:
                self._revision = await asyncio.wait_for(
                    self._kv.create(self.key, self.holder.encode()), self.renew_s)
                self._renewed_at = started
                await self._set(True)
        except KeyWrongLastSequenceError:  # someone else holds it (or ours expired)
            if self.leading:
                log.warning("%s lost the lease %s", self.holder, self.key)
            await self._set(False)
        except Exception as exc:  # broker away, timeout: fenced once the lease may expire
            if self.leading and time.monotonic() - self._renewed_at > self.ttl_s - self.renew_s:
                log.warning("%s cannot renew its lease %s (%s): stepping down", self.holder,
                            self.key, exc)
                await self._set(False)
            else:
                log.debug("lease step failed: %s", exc)
            if isinstance(exc, BucketNotFoundError):  # the bucket vanished with the broker
                self._kv = None

    def valid(self) -> bool:
        """Leading, and the last successful renewal began less than `ttl_s - renew_s`
        ago (monotonic clock: a pause of this process counts)."""
        return self.leading and time.monotonic() - self._renewed_at < self.ttl_s - self.renew_s

    async def _set(self, leading: bool) -> None:
        if leading != self.leading:
            self.leading = leading
            log.info("%s is %s (lease %s)", self.holder,
                     "the leader" if leading else "standing by", self.key)
            await self._on_change(leading)

    async def release(self) -> None:
        """Graceful exit: step down, then delete the entry so a standby takes over at once."""
        was = self.leading
        await self._set(False)
        if was and self._kv is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._kv.delete(self.key, last=self._revision), 2.0)
