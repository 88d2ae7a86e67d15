"""Who runs a request right now, for the runs that might overlap another one.

Most work runs once and claims nothing. A run that might repeat one still
going elsewhere claims its request first: an item redelivered or flagged
`redispatched`, one that waited unusually long in LLM_WORK (after a broker
killed -9 forgets deliveries, the same message is handed out again as if new),
and every run that was streaming while this worker's connection dropped.
A claim is a key in the KV bucket `<prefix>_claims` (the orchestrator provisions
it; a worker only opens it, at start or at its first claim) whose entries live
`ttl_s` after their last write (the bucket's TTL when shorter than the
setting); the holder renews every `ttl_s / 3`. When the holder dies its claim
expires and the next claimant continues after the chunks it streamed.
`valid_until` (monotonic) is when the oldest claim held may lapse: the
worker's fence (workers/fence.py) stops publishing before it until its claims
are checked again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from cplane.bus.provision import (
    TRANSIENT_API_ERRORS,
    StoreMissingError,
    claims_bucket,
    open_key_value,
)
from cplane.schemas.settings import Settings

log = logging.getLogger("cplane.claims")
OnLost = Callable[[str], Awaitable[None]]


def claim_key(request_id: str) -> str:
    """A KV key for any request id (ids may hold characters keys cannot)."""
    return "r" + hashlib.blake2b(request_id.encode(), digest_size=16).hexdigest()


class Claims:
    def __init__(self, js: JetStreamContext, settings: Settings, holder: str,
                 on_lost: OnLost | None = None) -> None:
        self._js = js
        self._bucket = claims_bucket(settings)
        self._ttl_s = settings.worker.claim_ttl_s
        self.holder = holder
        self._on_lost = on_lost
        self._kv: KeyValue | None = None
        self._held: dict[str, int] = {}  # request id -> revision we wrote last
        self._task: asyncio.Task[None] | None = None
        self._oldest_write = float("inf")  # monotonic start of the oldest held claim's write

    @property
    def valid_until(self) -> float:
        """Every held claim is ours until then at least (inf: none held)."""
        return self._oldest_write + self._ttl_s if self._held else float("inf")

    async def _bucket_kv(self) -> KeyValue:
        """The bucket, opened once (StoreMissingError until an orchestrator made it)."""
        if self._kv is None:
            kv = await open_key_value(self._js, self._bucket)
            ttl = (await kv.status()).ttl or 0.0
            if 0 < ttl < self._ttl_s:  # entries lapse sooner: the fence must count on that
                log.warning("claims bucket %s expires entries after %g s, not worker."
                            "claim_ttl_s = %g s: using %g s", self._bucket, ttl, self._ttl_s, ttl)
                self._ttl_s = ttl
            self._kv = kv
        return self._kv

    async def start(self) -> None:
        try:
            await self._bucket_kv()
        except (StoreMissingError, *TRANSIENT_API_ERRORS) as exc:
            # a worker may start before the orchestrator, or while a cluster elects
            log.info("%s; opened at the first claim", exc or type(exc).__name__)
        self._task = asyncio.create_task(self._renew_loop(), name="claims-renew")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for rid in list(self._held):
            await self.release(rid)

    async def acquire(self, request_id: str) -> bool:
        """True when this holder now holds the claim (it may have held it already)."""
        if request_id in self._held:
            return True
        key = claim_key(request_id)
        start = time.monotonic()
        try:
            kv = await self._bucket_kv()
            self._held[request_id] = await kv.create(key, self.holder.encode())
            self._wrote(start)
            return True
        except KeyWrongLastSequenceError:
            return await self._reclaim(kv, request_id, start)
        except BucketNotFoundError:
            self._kv = None  # the bucket went with a lost store: opened again next time
            raise

    async def confirm(self, request_id: str) -> bool:
        """Hold the claim for sure, now: a held one is written again (it may have
        lapsed while this process was paused: then it is lost), else acquired."""
        rev = self._held.get(request_id)
        if rev is None:
            return await self.acquire(request_id)
        start = time.monotonic()
        return await self._rewrite(await self._bucket_kv(), request_id, rev, start)

    async def _rewrite(self, kv: KeyValue, request_id: str, rev: int, start: float) -> bool:
        """Write our claim again over revision `rev`; False (not held) when it changed."""
        try:
            self._held[request_id] = await kv.update(claim_key(request_id),
                                                     self.holder.encode(), last=rev)
        except KeyWrongLastSequenceError:
            self._held.pop(request_id, None)
            return False
        self._wrote(start)
        return True

    async def _reclaim(self, kv: KeyValue, request_id: str, start: float) -> bool:
        """A write refused over a revision we never saw: read the entry back. Still ours
        (from before a reconnect or a pause, or our last write landed and its answer
        was lost) it is written again, so it holds a full ttl from now (the fence counts
        on it); gone (expired just now) or another holder's: False."""
        try:
            entry = await kv.get(claim_key(request_id))
        except KeyNotFoundError:
            return False
        if entry.value != self.holder.encode() or entry.revision is None:
            return False
        return await self._rewrite(kv, request_id, entry.revision, start)

    async def _still_ours(self, request_id: str, start: float) -> bool | None:
        """A renewal refused over a revision we never saw (a cluster node killed
        mid-write): `_reclaim`, with None when the broker did not answer."""
        assert self._kv is not None
        try:
            return await self._reclaim(self._kv, request_id, start)
        except Exception as exc:  # broker away
            log.debug("claim of %s not read back: %s", request_id, exc)
            return None

    async def release(self, request_id: str) -> None:
        rev = self._held.pop(request_id, None)
        if rev is None or self._kv is None:
            return
        with contextlib.suppress(Exception):
            await self._kv.delete(claim_key(request_id), last=rev)

    def _wrote(self, start: float) -> None:
        if len(self._held) == 1 or start < self._oldest_write:
            self._oldest_write = start

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._ttl_s / 3)
            start, renewed = time.monotonic(), True
            for rid, rev in list(self._held.items()):
                try:
                    assert self._kv is not None
                    self._held[rid] = await self._kv.update(
                        claim_key(rid), self.holder.encode(), last=rev)
                except KeyWrongLastSequenceError:  # expired and taken, or our own write
                    ours = await self._still_ours(rid, start)
                    if ours:
                        continue
                    if ours is None:  # could not tell: the next round asks again
                        renewed = False
                        continue
                    self._held.pop(rid, None)
                    log.warning("claim on %s lost", rid)
                    if self._on_lost is not None:
                        await self._on_lost(rid)
                except Exception as exc:  # broker away: try again next round
                    log.debug("claim renewal of %s failed: %s", rid, exc)
                    renewed = False
            if renewed:  # claims acquired meanwhile were written after `start` too
                self._oldest_write = start
