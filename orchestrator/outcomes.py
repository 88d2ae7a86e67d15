"""The orchestrator's own outcomes on the wire: rejections, dead letters, early terminals.

Each publish goes to JetStream (LLM_DONE / LLM_DLQ) with a Nats-Msg-Id, so a
repeat after a redelivery is stored once; the request message is acked only
after the store (nak with a delay when the store failed: it comes back).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from cplane.bus.outcome import StoredPublisher, error_reply, publish_again
from cplane.bus.replay import stored_terminal
from cplane.orchestrator.intake import Rejection, sniff_group, sniff_id
from cplane.schemas.codec import encode
from cplane.schemas.messages import DeadLetter, ErrorCode, ErrorReply, Final, Request
from cplane.schemas.settings import Settings
from cplane.schemas.subjects import INVALID_GROUP, scoped, tenant_of, valid_token

log = logging.getLogger("cplane.orchestrator")
_RETRY_DELAY_S = 1.0


class Recheck(enum.Enum):
    NOT_FOUND = 0  # no trace of an earlier run: dispatch it (flagged redispatched)
    FINISHED = 1  # a terminal is stored
    RUNNING = 2  # chunks were streamed: a worker has (or had) it; its work migrates


async def recheck(js: JetStreamContext, settings: Settings, req: Request) -> Recheck:
    """What became of an earlier delivery of this request. Errors count as NOT_FOUND."""
    with contextlib.suppress(Exception):
        if await stored_terminal(js, settings, req.group, req.request_id) is not None:
            return Recheck.FINISHED
        if await streamed(js, settings, req.group, req.request_id):
            return Recheck.RUNNING
    return Recheck.NOT_FOUND


async def streamed(js: JetStreamContext, settings: Settings, group: str, request_id: str
                   ) -> bool:
    """Chunks of this id are stored (a live or migrating request). Errors count as no."""
    with contextlib.suppress(Exception):
        await js.get_last_msg(settings.streams.out.name,
                              settings.subjects.out_store(group, request_id))
        return True
    return False


class Outcomes:
    def __init__(self, nc: NATS, store: StoredPublisher, settings: Settings) -> None:
        self.nc = nc
        self.store = store
        self.settings = settings
        self.subjects = settings.subjects

    @staticmethod
    def error(request_id: str, code: ErrorCode, message: str, retryable: bool = False,
              retry_after_ms: float | None = None) -> ErrorReply:
        return error_reply(request_id, code, message, retryable, retry_after_ms)

    async def terminal(self, req: Request, msg: Final | ErrorReply) -> bool:
        """Store a terminal for a held request (and send it to its reply_to). True when stored."""
        try:
            await self.store.publish_terminal(self.nc, self.subjects, req.group, msg, req.reply_to)
            return True
        except Exception as exc:
            log.warning("terminal of %s not stored: %s", req.request_id, exc)
            return False

    async def _settle(self, msg: Msg, publish: Callable[[], object]) -> bool:
        """Publish, then ack; nak when it failed (redelivered). True when published."""
        try:
            await publish()  # type: ignore[misc]
        except Exception as exc:
            log.warning("could not store an outcome (redelivered later): %s", exc)
            with contextlib.suppress(Exception):
                await msg.nak(delay=_RETRY_DELAY_S)
            return False
        with contextlib.suppress(Exception):
            await msg.ack()  # ack, not term: it leaves the WorkQueue stream for sure
        return True

    async def _in_store(self, group: str, request_id: str) -> bool:
        """The store has a trace of this id: chunks streamed, or a terminal. Asked only
        for the rare copies that would end a request (rejections, dead letters), so
        "known" does not rest on this replica's memory (empty after a takeover)."""
        found = await recheck(self.nc.jetstream(), self.settings,
                              Request(request_id=request_id, group=group))
        return found is not Recheck.NOT_FOUND

    async def reject(self, msg: Msg, seq: int, rej: Rejection, known: Callable[[str, str], bool]
                     ) -> None:
        """ErrorReply on the request's done subject, or on `llm.done.invalid.seq<N>` when
        the body names no usable id, or an id that belongs to a live or finished request,
        in this replica's memory or in the store (a bad copy must not become another
        request's terminal). An id whose terminal is stored gets that terminal again."""
        rid, group = rej.request_id, rej.group
        if rid and await self._answer_again(msg, rid, group, rej.reply_to):
            return
        if not rid or known(rid, group) or await streamed(
                self.nc.jetstream(), self.settings, group, rid):
            rid, group = f"seq{seq}", scoped(tenant_of(group), INVALID_GROUP)
        err = error_reply(rid, rej.code, rej.message, rej.retryable, rej.retry_after_ms)
        reply_to = rej.reply_to if rid == rej.request_id else None
        log.info("rejected %s: %s", rid, rej.message)

        async def publish() -> None:
            await self.store.publish_terminal(self.nc, self.subjects, group, err, reply_to)

        await self._settle(msg, publish)

    async def _answer_again(self, msg: Msg, rid: str, group: str, reply_to: str | None
                            ) -> bool:
        """An id whose terminal is stored, published again and refused on its way (the
        request stream full while it was forwarded to its partition): its stored
        terminal goes again on its live subject, never a rejection its publisher
        would not hear. False when none is stored (a live request's id)."""
        term = None
        with contextlib.suppress(Exception):
            term = await stored_terminal(self.nc.jetstream(), self.settings, group, rid)
        if term is None:
            return False

        async def publish() -> None:
            await publish_again(self.nc, self.subjects, group, rid, reply_to, term)

        log.info("%s published again after its answer: the stored terminal goes again", rid)
        await self._settle(msg, publish)
        return True

    async def dead_letter_request(self, msg: Msg, seq: int, deliveries: int,
                                  known: Callable[[str, str], bool], *, own: bool = False
                                  ) -> bool:
        """A request delivered too often: evidence to LLM_DLQ, ErrorReply dead_letter, ack
        (True once stored). `own`: this very message is the one the ledger holds under
        its id, so that id being known names no other request."""
        s = self.settings
        rid = sniff_id(msg.data) or ""
        group = scoped(self.subjects.tenant_of_request(msg.subject), sniff_group(msg.data))
        usable = bool(rid) and valid_token(rid) and (own or not known(rid, group))
        letter = DeadLetter(
            stream=s.streams.req.name, seq=seq, subject=msg.subject,
            reason=f"delivered {deliveries} times without an outcome", deliveries=deliveries,
            request_id=rid, data=msg.data[: s.limits.max_dead_letter_bytes],
            ts_ms=time.time() * 1000)
        err_id, group = (rid, group) if usable else (
            f"seq{seq}", scoped(tenant_of(group), INVALID_GROUP))
        err: ErrorReply | None = error_reply(
            err_id, ErrorCode.DEAD_LETTER,
            f"request taken out of {s.streams.req.name} after {deliveries} deliveries; "
            "see the dead-letter subject")
        if usable and await self._in_store(group, rid):  # it finished (or runs) after all:
            err = None  # no terminal of ours for it
        log.warning("dead letter: %s seq %d (%s)", s.streams.req.name, seq, rid or "no id")

        async def publish() -> None:
            await self.store.publish(self.subjects.dead_letter(s.streams.req.name, seq),
                                     encode(letter), f"dlq:{s.streams.req.name}:{seq}")
            if err is not None:
                await self.store.publish_terminal(self.nc, self.subjects, group, err)

        return await self._settle(msg, publish)
