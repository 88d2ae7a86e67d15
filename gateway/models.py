"""The models the fleet serves now, from worker heartbeats (`<prefix>.hb.*`).

A worker counts while it is READY and its last heartbeat is younger than
`orchestrator.worker_timeout_s` (what the orchestrator allows). At start the
gateway asks every worker for a heartbeat at once (`<prefix>.admin.heartbeat`,
as `cplane workers` does), so `/v1/models` is right within a round trip.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from nats.aio.client import Client as NATS

from cplane.bus.heartbeats import HeartbeatWatcher, Seen
from cplane.schemas.messages import Heartbeat, WorkerState
from cplane.schemas.settings import Settings


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
    """The latest heartbeat of every worker on the gateway's connection
    (bus/heartbeats.py), read as the models served now."""

    def __init__(self, nc: NATS, settings: Settings) -> None:
        self.timeout_s = settings.orchestrator.worker_timeout_s
        self.ever: set[str] = set()  # every model served since the gateway started
        self.watcher = HeartbeatWatcher(nc, settings.subjects, self.timeout_s,
                                        on_heartbeat=self._heard)

    @property
    def seen(self) -> Mapping[str, Seen]:
        return self.watcher.book.seen

    async def start(self) -> None:
        await self.watcher.start(ask=True)

    async def stop(self) -> None:
        await self.watcher.stop()

    def _heard(self, hb: Heartbeat, prev: Seen | None) -> None:
        if hb.state is not WorkerState.STOPPED:
            self.ever.update(hb.models)

    def live(self) -> dict[str, list[Seen]]:
        return live_models(self.seen, time.monotonic(), self.timeout_s)

    def workers(self) -> int:
        """READY workers heard within the timeout."""
        return sum(1 for s in self.watcher.live() if s.hb.state is WorkerState.READY)


__all__ = ["LiveModels", "Seen", "live_models", "model_list"]
