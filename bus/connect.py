"""Connecting to NATS the same way in every long-lived process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import msgspec
import nats
from nats.aio.client import Client as NATS

from cplane.bus.credentials import connect_options, redact, server_list
from cplane.schemas.settings import NatsSettings

log = logging.getLogger("cplane.bus")
OnReconnect = Callable[[], Awaitable[None]]


class _ReconnectHook:
    """Runs `on_reconnect` after each reconnect, in its own task, until it succeeds.

    nats-py awaits `reconnected_cb` inside its reconnect loop; running the
    hook there would stall the connection while the hook waits on JetStream
    (which answers 503 for a moment after a broker restart). So the hook
    runs beside it and is retried with a growing pause (0.2 s up to 3 s)
    until it succeeds or the connection closes. A newer reconnect replaces a
    run still retrying.
    """

    def __init__(self, name: str, hook: OnReconnect) -> None:
        self.name = name
        self.hook = hook
        self.nc: NATS | None = None
        self.task: asyncio.Task[None] | None = None

    def kick(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.task = asyncio.create_task(self._run(), name=f"{self.name}-on-reconnect")

    async def _run(self) -> None:
        pause = 0.2
        while self.nc is None or not self.nc.is_closed:
            try:
                await self.hook()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s: after reconnect: %s (retrying in %.1f s)", self.name, exc, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 3.0)


async def connect(
    url: str, name: str, *, on_reconnect: OnReconnect | None = None,
    on_disconnect: OnReconnect | None = None, settings: NatsSettings | None = None,
    **options: object
) -> NATS:
    """Connect with settings for a long-lived service: reconnect forever, big buffers.

    `on_reconnect`, when given, is awaited after every reconnect (not after
    the first connect) in a task of its own, retried until it succeeds: the
    place to re-run `ensure_all` and re-create the service's consumers. A
    `reconnected_cb` in `options` still runs, before it. `on_disconnect` is
    awaited when the connection drops (before nats-py starts reconnecting).
    `settings`, when given, adds its credentials and TLS (bus/credentials.py:
    `connect_options`); `url` is still the server connected to.
    """
    hook = _ReconnectHook(name, on_reconnect) if on_reconnect is not None else None
    shown = redact(url)
    user_cb = options.pop("reconnected_cb", None)

    async def on_error(exc: Exception) -> None:
        log.warning("%s: nats error: %s", name, exc)

    async def disconnected() -> None:
        log.info("%s: disconnected from %s", name, shown)
        if on_disconnect is not None:
            await on_disconnect()

    async def on_reconnected() -> None:
        log.info("%s: reconnected to %s", name, shown)
        if user_cb is not None:
            await user_cb()  # type: ignore[operator]
        if hook is not None:
            hook.kick()

    async def on_closed() -> None:
        if hook is not None and hook.task is not None:
            hook.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await hook.task

    kwargs: dict[str, object] = {
        "servers": server_list(url),
        # The first listed server first (a cluster's processes spread over its nodes by
        # listing them in different orders), then the others and those it announces.
        "dont_randomize": True,
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "pending_size": 64 * 1024 * 1024,
        "error_cb": on_error,
        "disconnected_cb": disconnected,
        "reconnected_cb": on_reconnected,
        "closed_cb": on_closed,
    }
    if settings is not None:
        kwargs.update(connect_options(msgspec.structs.replace(settings, url=url)))
    kwargs.update(options)
    nc = await nats.connect(**kwargs)  # type: ignore[arg-type]
    if hook is not None:
        hook.nc = nc
    return nc


def drop_pending(nc: NATS, subject_prefix: str) -> int:
    """Forget publishes to `subject_prefix`* still buffered for a lost connection.

    nats-py keeps what was published while (or just before) the connection
    dropped and writes it out after the reconnect, before any callback runs.
    For outputs that is wrong: by then another worker may own the request (a
    broker killed -9 forgets deliveries), so the worker re-sends what it still
    owns itself, after checking. Reaches into nats-py's private buffer
    (`_pending`, one protocol command per entry), pinned by nats-py==2.16.0.
    Returns how many commands were dropped.
    """
    stale = (f"PUB {subject_prefix}".encode(), f"HPUB {subject_prefix}".encode())
    pending: list[bytes] = nc._pending
    kept = [cmd for cmd in pending if not cmd.startswith(stale)]
    dropped = len(pending) - len(kept)
    if dropped:
        nc._pending = kept
        nc._pending_data_size = sum(len(cmd) for cmd in kept)
    return dropped


async def revive_reader(nc: NATS) -> bool:
    """Reconnect a connection whose read loop has ended while it counts as connected
    (see `round_trip`); True when it had to."""
    reader = getattr(nc, "_reading_task", None)
    if not nc.is_connected or (reader is not None and not reader.done()):
        return False
    log.warning("the connection's read loop has ended: reconnecting")
    await nc._process_op_err(ConnectionResetError("read loop ended"))
    return True


async def round_trip(nc: NATS, timeout_s: float, api_prefix: str = "$JS.API") -> bool:
    """True once the server has answered a request sent after everything this
    connection published before it (a JetStream API INFO: one small request, in
    order behind the publishes); False when no answer came within `timeout_s`.

    Not nats-py's `flush(timeout)`: in 2.16 its PING is written ahead of the
    publishes still buffered, and a timed-out flush leaves its cancelled future
    queued, so the late PONG raises in the read loop, which stops reading for
    good without reconnecting (the process still publishes: a zombie that
    heartbeats). A dead read loop is reported as False and the connection is
    made to reconnect (`_reading_task`, `_process_op_err`: pinned by nats-py==2.16.0).
    """
    if not nc.is_connected or await revive_reader(nc):
        return False
    try:
        await nc.request(f"{api_prefix}.INFO", b"", timeout=timeout_s)
        return True
    except Exception:  # a timeout, no responders (JetStream not up yet), a closed connection
        return False
