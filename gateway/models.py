"""The models the fleet serves now, from worker heartbeats (`<prefix>.hb.*`).

A worker counts while it is READY and its last heartbeat is younger than
`orchestrator.worker_timeout_s` (what the orchestrator allows). At start the
gateway asks every worker for a heartbeat at once (`<prefix>.admin.heartbeat`,
as `cplane workers` does), so `/v1/models` is right within a round trip.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas.codec import heartbeat_decoder
from schemas.messages import Heartbeat, WorkerState
from schemas.settings import Settings


class Seen(NamedTuple):
    hb: Heartbeat
    at: float  # local monotonic clock when it arrived


def live_models(seen: Mapping[str, Seen], now: float, timeout_s: float) -> dict[str, list[Seen]]:
    """Model -> the live READY workers serving it. Pure."""
    out: dict[str, list[Seen]] = {}
    for s in seen.values():
        if s.hb.state is WorkerState.READY and now - s.at <= timeout_s:
            for model in s.hb.models:
                out.setdefault(model, []).append(s)
    return out


def model_list(live: Mapping[str, list[Seen]]) -> dict[str, Any]:
    """The `/v1/models` body (OpenAI's list of model objects, plus how many workers)."""
    data = []
    for model in sorted(live):
        workers = live[model]
        started = min((s.hb.started_ms for s in workers if s.hb.started_ms), default=0.0)
        data.append({"id": model, "object": "model", "created": int(started / 1000),
                     "owned_by": "cplane", "root": model, "parent": None,
                     "workers": len(workers)})
    return {"object": "list", "data": data}


class LiveModels:
    """Keeps the latest heartbeat of every worker on the gateway's connection."""

    def __init__(self, nc: NATS, settings: Settings) -> None:
        self.nc = nc
        self.subjects = settings.subjects
        self.timeout_s = settings.orchestrator.worker_timeout_s
        self.seen: dict[str, Seen] = {}
        self.ever: set[str] = set()  # every model served since the gateway started
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.subjects.heartbeats_all, cb=self._on_hb)
        await self.nc.flush()  # subscribed before anyone answers
        await self.nc.publish(self.subjects.heartbeat_request, b"")
        await self.nc.flush()

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_hb(self, msg: Msg) -> None:
        try:
            hb = heartbeat_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if hb.state is WorkerState.STOPPED:
            self.seen.pop(hb.worker_id, None)
            return
        self.seen[hb.worker_id] = Seen(hb, time.monotonic())
        self.ever.update(hb.models)
        if len(self.seen) > 4096:  # bounded against invented worker ids: drop the stalest
            now = time.monotonic()
            for wid in [w for w, s in self.seen.items() if now - s.at > self.timeout_s]:
                del self.seen[wid]

    def live(self) -> dict[str, list[Seen]]:
        return live_models(self.seen, time.monotonic(), self.timeout_s)

    def workers(self) -> int:
        now = time.monotonic()
        return sum(1 for s in self.seen.values()
                   if s.hb.state is WorkerState.READY and now - s.at <= self.timeout_s)
