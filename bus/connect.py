"""Connecting to NATS the same way in every long-lived process."""

from __future__ import annotations

import logging

import nats
from nats.aio.client import Client as NATS

log = logging.getLogger("cplane.bus")


async def connect(url: str, name: str, **options: object) -> NATS:
    """Connect with settings for a long-lived service: reconnect forever, big buffers."""

    async def on_error(exc: Exception) -> None:
        log.warning("%s: nats error: %s", name, exc)

    async def on_disconnect() -> None:
        log.info("%s: disconnected from %s", name, url)

    async def on_reconnect() -> None:
        log.info("%s: reconnected to %s", name, url)

    kwargs: dict[str, object] = {
        "servers": [url],
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "pending_size": 64 * 1024 * 1024,
        "error_cb": on_error,
        "disconnected_cb": on_disconnect,
        "reconnected_cb": on_reconnect,
    }
    kwargs.update(options)
    return await nats.connect(**kwargs)  # type: ignore[arg-type]
