"""Streaming consumers: every terminal (Final / ErrorReply) as it is stored, or replayed.

    async for r in client.results(durable="billing", start=timedelta(hours=1)):
        record(r.group, r.terminal)     # acked when the loop asks for the next one

Terminals are read from LLM_DONE (`<prefix>.s.done.<group>.<request_id>`,
kept `streams.done.max_age_s`, 7 days), so a consumer sees only what is
stored, in store order, and can start in the past.

- With `durable=NAME`: a durable pull consumer keeps the position on the
  server. Delivery is at least once: a result is acked when the loop asks
  for the next one (`auto_ack`, so a body that raises leaves it unacked) or
  by `await r.ack()`; an unacked one comes again after `ack_wait_s`, also to
  another process using the same name (they share the work). `start`
  applies when the durable is created (a datetime, or a timedelta meaning
  that long ago; none: from now on); an existing one goes on from where it
  stands. `delete_durable()` removes it.
- Without: an ordered consumer from `start` (none: from now on), nothing to
  ack; it ends with the caller.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from cplane.schemas.codec import final_decoder
from cplane.schemas.messages import ErrorReply, Final
from cplane.schemas.settings import Settings

Start = datetime.datetime | datetime.timedelta | None


@dataclass(slots=True)
class StoredResult:
    """One stored terminal and where it came from."""

    terminal: Final | ErrorReply
    group: str  # "i" interactive, else a batch job id
    request_id: str
    stream_seq: int  # its sequence in LLM_DONE
    stored_ms: float  # when LLM_DONE stored it
    _msg: Msg | None = field(default=None, repr=False)
    _acked: bool = field(default=False, repr=False)

    async def ack(self) -> None:
        """Done with it (idempotent; a no-op without a durable)."""
        if self._msg is not None and not self._acked:
            self._acked = True
            await self._msg.ack()


def _deliver(start: Start) -> tuple[DeliverPolicy, datetime.datetime | None]:
    if start is None:
        return DeliverPolicy.NEW, None
    if isinstance(start, datetime.timedelta):
        start = datetime.datetime.now(datetime.UTC) - start
    return DeliverPolicy.BY_START_TIME, start


def _result(msg: Msg, durable: bool) -> StoredResult | None:
    try:
        term = final_decoder.decode(msg.data)
    except msgspec.DecodeError:
        return None
    meta = msg.metadata
    return StoredResult(terminal=term, group=msg.subject.rsplit(".", 2)[-2],
                        request_id=term.request_id, stream_seq=meta.sequence.stream,
                        stored_ms=meta.timestamp.timestamp() * 1000,
                        _msg=msg if durable else None)


async def stored_results(js: JetStreamContext, settings: Settings, *,
                         durable: str | None = None, start: Start = None, group: str = "*",
                         batch: int = 256, ack_wait_s: float = 30.0,
                         auto_ack: bool = True) -> AsyncIterator[StoredResult]:
    """Terminals of `group` (`*`: all) from LLM_DONE; see the module's promises."""
    stream = settings.streams.done.name
    subject = settings.subjects.done_store_of(group)
    policy, start_time = _deliver(start)
    if durable is None:
        sub = await js.subscribe(subject, stream=stream, ordered_consumer=True,
                                 deliver_policy=policy,
                                 config=ConsumerConfig(opt_start_time=start_time))
        try:
            async for msg in sub.messages:
                r = _result(msg, False)
                if r is not None:
                    yield r
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return
    cfg = ConsumerConfig(durable_name=durable, filter_subject=subject, deliver_policy=policy,
                         opt_start_time=start_time, ack_policy=AckPolicy.EXPLICIT,
                         ack_wait=ack_wait_s, max_deliver=-1, max_ack_pending=batch * 4)
    psub = await js.pull_subscribe(subject, durable=durable, stream=stream, config=cfg)
    try:
        while True:
            try:
                msgs = await psub.fetch(batch, timeout=1.0)
            except TimeoutError:
                continue
            for msg in msgs:
                r = _result(msg, True)
                if r is None:  # not a terminal: nothing to process, ever
                    await msg.term()
                    continue
                yield r
                if auto_ack:
                    await r.ack()
    finally:
        with contextlib.suppress(Exception):
            await psub.unsubscribe()


async def delete_durable(js: JetStreamContext, settings: Settings, durable: str) -> bool:
    """Remove a results consumer (its position is lost); False if there was none."""
    try:
        return await js.delete_consumer(settings.streams.done.name, durable)
    except NotFoundError:
        return False


__all__ = ["Start", "StoredResult", "delete_durable", "stored_results"]
