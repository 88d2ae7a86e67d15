"""Worker heartbeats (`<prefix>.hb.<worker_id>`): who is alive, as each reader sees it.

Two halves, apart:

- `HeartbeatBook`: the latest heartbeat per worker and when it arrived; a
  worker unheard for `timeout` is gone, and one that says STOPPED goes at
  once. Pure state, no clock of its own: the caller passes `now`.
- `subscribe_heartbeats` / `HeartbeatWatcher`: the core subscription that
  decodes each heartbeat (undecodable ones are dropped) and hands it on; the
  watcher feeds a book and can ask every worker for a heartbeat at once
  (`<prefix>.admin.heartbeat`), so a reader that starts knows the fleet within
  a round trip instead of a heartbeat period.

Readers: the gateway's `/v1/models` (gateway/models.py), `cplane workers`
(cplane/workers_cmd.py), `cplane up` waiting for its workers (cplane/stack.py),
and the orchestrator, whose registry (orchestrator/fleet.py) keeps its
breakers and fleet views on a book of its own, fed by `subscribe_heartbeats`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import NamedTuple

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cplane.schemas.codec import heartbeat_decoder
from cplane.schemas.messages import Heartbeat, WorkerState
from cplane.schemas.subjects import Subjects

# Workers one watcher remembers before it forgets the stale ones early: a
# bound against a publisher that invents worker ids.
WATCH_BOUND = 4096


class Seen(NamedTuple):
    """A worker's latest heartbeat and when it arrived (on the book's clock)."""

    hb: Heartbeat
    at: float


class HeartbeatBook:
    """The latest heartbeat of each worker. No I/O and no clock: `timeout` and
    every `now` are in one unit of the caller's choosing (seconds of the
    monotonic clock in the gateway and the CLI, milliseconds of the wall clock
    in the orchestrator's registry), so the simulator and tests drive it too."""

    def __init__(self, timeout: float, *, keep_stopped: bool = False) -> None:
        self.timeout = timeout
        # `cplane workers` lists a stopping worker as stopped; everyone else
        # forgets it on its last heartbeat.
        self.keep_stopped = keep_stopped
        self.seen: dict[str, Seen] = {}

    def observe(self, hb: Heartbeat, now: float) -> Seen | None:
        """Record `hb`, heard at `now`; returns what was there before (None: new)."""
        if hb.state is WorkerState.STOPPED and not self.keep_stopped:
            return self.seen.pop(hb.worker_id, None)
        prev = self.seen.get(hb.worker_id)
        self.seen[hb.worker_id] = Seen(hb, now)
        return prev

    def fresh(self, seen: Seen, now: float) -> bool:
        """Heard within `timeout` of `now`."""
        return now - seen.at <= self.timeout

    def live(self, now: float) -> list[Seen]:
        """Workers heard within `timeout`, by id (the stale stay until `expire`)."""
        return [s for _, s in sorted(self.seen.items()) if now - s.at <= self.timeout]

    def grace(self, stalled: float) -> None:
        """The reader itself could not listen for `stalled` (its process was paused, its
        connection cut): that silence does not count against any worker, whose
        last heartbeat moves that much later. A worker already silent before the
        stall keeps the silence it had (it is not made routable again)."""
        for w, s in self.seen.items():
            self.seen[w] = Seen(s.hb, s.at + stalled)

    def expire(self, now: float) -> list[Heartbeat]:
        """Forget workers unheard for longer than `timeout`; their last heartbeats,
        in the order they were first heard."""
        gone = [w for w, s in self.seen.items() if now - s.at > self.timeout]
        return [self.seen.pop(w).hb for w in gone]

    def get(self, worker_id: str) -> Seen | None:
        return self.seen.get(worker_id)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self.seen

    def __len__(self) -> int:
        return len(self.seen)

    def __iter__(self) -> Iterator[Seen]:
        return iter(self.seen.values())


OnHeartbeat = Callable[[Heartbeat], Awaitable[None] | None]


async def subscribe_heartbeats(nc: NATS, subjects: Subjects,
                               on_heartbeat: OnHeartbeat) -> Subscription:
    """A core subscription to every worker's heartbeat; `on_heartbeat` gets each
    one decoded, on the connection's event loop, in arrival order (a sync
    callback, or a coroutine function that is awaited)."""
    async def on_msg(msg: Msg) -> None:
        try:
            hb = heartbeat_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        done = on_heartbeat(hb)
        if done is not None:
            await done

    return await nc.subscribe(subjects.heartbeats_all, cb=on_msg)


async def ask_heartbeats(nc: NATS, subjects: Subjects) -> None:
    """Every worker answers with a heartbeat at once (`<prefix>.admin.heartbeat`)."""
    await nc.publish(subjects.heartbeat_request, b"")
    await nc.flush()


class HeartbeatWatcher:
    """A `HeartbeatBook` on the monotonic clock (seconds), fed from one connection.

    `on_heartbeat(hb, prev)` runs after each heartbeat is recorded (`prev`:
    the worker's previous entry, None when it is new)."""

    def __init__(self, nc: NATS, subjects: Subjects, timeout_s: float, *,
                 keep_stopped: bool = False,
                 on_heartbeat: Callable[[Heartbeat, Seen | None], None] | None = None,
                 bound: int = WATCH_BOUND) -> None:
        self.nc = nc
        self.subjects = subjects
        self.book = HeartbeatBook(timeout_s, keep_stopped=keep_stopped)
        self.bound = bound
        self._on_heartbeat = on_heartbeat
        self._sub: Subscription | None = None

    async def start(self, ask: bool = True) -> None:
        """Subscribe; with `ask`, then ask every worker for a heartbeat now."""
        self._sub = await subscribe_heartbeats(self.nc, self.subjects, self._observe)
        await self.nc.flush()  # subscribed before anyone answers
        if ask:
            await ask_heartbeats(self.nc, self.subjects)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    def _observe(self, hb: Heartbeat) -> None:
        now = time.monotonic()
        prev = self.book.observe(hb, now)
        if len(self.book) > self.bound:
            self.book.expire(now)
        if self._on_heartbeat is not None:
            self._on_heartbeat(hb, prev)

    def live(self) -> list[Seen]:
        """Workers heard within the timeout, by id."""
        return self.book.live(time.monotonic())


__all__ = ["WATCH_BOUND", "HeartbeatBook", "HeartbeatWatcher", "OnHeartbeat", "Seen",
           "ask_heartbeats", "subscribe_heartbeats"]
