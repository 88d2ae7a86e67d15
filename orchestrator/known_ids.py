"""Request ids as idempotency keys: an id whose terminal is stored is answered with
it, never run again, whichever replica sees it and however late.

New requests are looked up in LLM_DONE and LLM_OUT before they are held, in
batches: one direct get (`multi_last`) per stream, concurrently, for everything
that arrived since the last one left, up to `IN_FLIGHT` lookups out at once, so
the cost is a round trip of latency and close to nothing per request at
saturation. A request with a stored terminal is acked
and never run; the terminal is sent again on its live subject (and reply_to),
not stored a second time, when this copy was published after it was stored
(an id published again): a copy published before it (a duplicate, a
redelivery) had its readers subscribed when the stored one went out, and
they get it once. An unanswered lookup (a stream without direct gets, a
broker restarting) holds the requests as new: availability first.

On a cluster any replica of LLM_DONE answers a direct get, and one that is
behind (resumed after a pause, restarted, catching up) answers "none" for a
terminal it has not copied yet: an id published again would run again. So
while a replica is behind (the stream's cluster info, read at most once a
second), every id the batch did not find is asked of the stream's leader
(`stored_terminal`: a plain get, answered by the leader) before it is held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cplane.bus.outcome import send_again
from cplane.bus.replay import stored_terminal, stored_terminals
from cplane.bus.stream_config import replicas_of
from cplane.orchestrator.intake import scoped_key
from cplane.orchestrator.ledger import Entry
from cplane.schemas.codec import final_decoder
from cplane.schemas.messages import PRIORITIES, ErrorReply, Final, WorkItem
from cplane.schemas.settings import Settings

log = logging.getLogger("cplane.orchestrator")
BATCH = 256  # ids per lookup
IN_FLIGHT = 4  # lookups out at once (a new one need not wait for the last)
LOOKUP_TIMEOUT_S = 2.0

Hold = Callable[[Entry[WorkItem]], Awaitable[None]]


class KnownIds:
    def __init__(self, nc: NATS, settings: Settings, hold: Hold,
                 answered: Callable[[str], object]) -> None:
        self._nc = nc
        self._settings = settings
        self._hold = hold  # a request with no stored terminal goes on (HELD)
        self._answered = answered  # a request answered from the store (remember its id)
        self._queue: list[Entry[WorkItem]] = []
        self._waiting = [0] * len(PRIORITIES)  # per level, queued or being looked up
        self._tasks: set[asyncio.Task[None]] = set()
        self.answered_from_store = 0
        self.looked_up = 0  # ids asked of the streams (a fresh id is not: Request.fresh_id)
        self._replicated = replicas_of(settings, settings.streams.done) > 1
        self._behind: tuple[float, bool] = (-1.0, True)  # (when read, a replica behind)

    def waiting(self, level: int) -> int:
        """Requests of `level` pulled and not yet held (the puller's room counts them)."""
        return self._waiting[level]

    def check(self, entry: Entry[WorkItem]) -> None:
        """Look `entry` up with the next batch, then hold it or answer it."""
        self._queue.append(entry)
        self._waiting[entry.level] += 1
        if len(self._tasks) < IN_FLIGHT:
            task = asyncio.get_running_loop().create_task(self._run(), name="known-ids")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        await asyncio.sleep(0)  # what arrives in this loop turn goes in the same lookup
        while self._queue:
            batch, self._queue = self._queue[:BATCH], self._queue[BATCH:]
            t0 = time.monotonic()
            found = await self._lookup(batch)
            took = time.monotonic() - t0
            if took > 0.05:
                log.info("stored-terminal lookup of %d ids took %.0f ms", len(batch),
                         took * 1000)
            confirmed = await self._confirm_absent(batch, found)
            for e in batch:
                self._waiting[e.level] -= 1
                data = found.get((e.item.request.group, e.request_id))
                term = (_decoded(data) if data is not None
                        else confirmed.get((e.item.request.group, e.request_id)))
                if term is None:
                    await self._hold(e)
                else:
                    await self._answer(e.item, term, e.msg)
                    self._answered(scoped_key(e.item.request))

    async def _lookup(self, batch: list[Entry[WorkItem]]) -> dict[tuple[str, str], bytes]:
        """The batch's stored terminals, asked of LLM_DONE and LLM_OUT at once (one
        direct get each). LLM_OUT too: on a cluster, LLM_DONE's copy of LLM_OUT was
        seen to skip terminals stored around a leader's kill -9 (the cluster chaos
        run's done_missing), and an id published again then ran again; LLM_OUT holds
        every terminal for its max_age. An unanswered lookup holds the ids as new."""
        keys = [(e.item.request.group, e.request_id) for e in batch]
        self.looked_up += len(keys)
        names = (self._settings.streams.out.name, self._settings.streams.done.name)
        answers = await asyncio.gather(*(
            stored_terminals(self._nc, self._settings, keys, LOOKUP_TIMEOUT_S, name)
            for name in names), return_exceptions=True)
        found: dict[tuple[str, str], bytes] = {}
        for name, got in zip(names, answers, strict=True):
            if isinstance(got, BaseException):
                log.info("stored-terminal lookup of %d ids in %s failed (%s)", len(batch),
                         name, got)
            else:
                found.update(got)  # LLM_DONE's last: the same terminal when both have it
        return found

    async def _replicas_behind(self) -> bool:
        """A replica of LLM_DONE is behind its leader (read at most once a second;
        unknown counts as behind)."""
        at, behind = self._behind
        now = time.monotonic()
        if now - at < 1.0:
            return behind
        try:
            info = await self._nc.jetstream().stream_info(self._settings.streams.done.name)
            peers = info.cluster.replicas if info.cluster is not None else None
            behind = any(not p.current or p.offline or (p.lag or 0) > 0 for p in peers or ())
        except Exception:
            behind = True
        self._behind = (now, behind)
        return behind

    async def _confirm_absent(self, batch: list[Entry[WorkItem]],
                              found: dict[tuple[str, str], bytes]
                              ) -> dict[tuple[str, str], Final | ErrorReply]:
        """On a cluster with a replica behind: the ids the batch did not find, asked of
        the leader (concurrently); (group, request id) -> the terminal it has."""
        missing = [e for e in batch if (e.item.request.group, e.request_id) not in found]
        if not (self._replicated and missing and await self._replicas_behind()):
            return {}
        js = self._nc.jetstream()

        async def ask(e: Entry[WorkItem]) -> Final | ErrorReply | None:
            with contextlib.suppress(Exception):  # unanswered: held as new (see above)
                return await stored_terminal(js, self._settings, e.item.request.group,
                                             e.request_id)
            return None

        terms = await asyncio.gather(*(ask(e) for e in missing))
        return {(e.item.request.group, e.request_id): t
                for e, t in zip(missing, terms, strict=True) if t is not None}

    async def answer_again(self, item: WorkItem, msg: Msg) -> bool:
        """An id this replica remembers, published again: True (and the message acked)
        when its terminal is stored and was sent again; False when none is."""
        req = item.request
        term = None
        with contextlib.suppress(Exception):
            term = await stored_terminal(self._nc.jetstream(), self._settings, req.group,
                                         req.request_id)
        if term is None:
            return False
        await self._answer(item, term, msg)
        return True

    async def _answer(self, item: WorkItem, term: Final | ErrorReply, msg: Msg) -> None:
        """Ack; the stored terminal again (live subject, reply_to) to a copy published
        after it was stored."""
        self.answered_from_store += 1
        with contextlib.suppress(Exception):
            if await send_again(self._nc, self._settings.subjects, item, term):
                log.info("%s published again after its answer: the stored terminal goes "
                         "again", item.request.request_id)
        with contextlib.suppress(Exception):
            await msg.ack()


def _decoded(data: bytes) -> Final | ErrorReply | None:
    try:
        return final_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


__all__ = ["KnownIds"]
