"""Store one message in JetStream even across a broker restart, without storing it twice.

A publish that gets no answer (a timeout, a dropped connection, a stream
that vanished with the broker's store) may or may not be stored. Publishing
the same bytes again under the same `Nats-Msg-Id` is safe while the first
try is inside the stream's duplicate window: JetStream keeps one copy and
acks the repeat as a duplicate. So `publish_until_stored` repeats an
unanswered publish for at most half that window (the rest is margin for a
try still in flight), and then gives up: past it a repeat could be stored a
second time. Used by the worker (terminals) and the orchestrator (work).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable

from nats.errors import Error as NatsError
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

from cplane.bus.outcome import StoredPublisher

OnRetry = Callable[[Exception], Awaitable[None]]
_WRONG_LAST_SEQUENCE = 10071  # JetStream: the expected last sequence is not the stored one


class StoreResult(enum.Enum):
    STORED = "stored"  # JetStream acked it
    # JetStream acked it as a repeat of a message with the same Nats-Msg-Id stored
    # within the window: this try's own earlier copy, or another writer's.
    DUPLICATE = "duplicate"
    REFUSED = "refused"  # the stream refused it (limits, a bad subject...): not stored
    # Refused because an expected last (subject) sequence header did not hold: a
    # newer message was stored there first (a run fence, workers/run_fence.py).
    CONFLICT = "conflict"
    GAVE_UP = "gave_up"  # unanswered until half the window, or still_valid() said no
    # still_valid() said no before the first try (the caller lost the message while
    # it waited to write it, e.g. paused past its lease): nothing was published.
    NOT_SENT = "not_sent"

    @property
    def stored(self) -> bool:
        """A message with this Nats-Msg-Id is stored."""
        return self is StoreResult.STORED or self is StoreResult.DUPLICATE


def _always() -> bool:
    return True


async def publish_until_stored(
    store: StoredPublisher,
    subject: str,
    data: bytes,
    msg_id: str,
    *,
    window_s: float,
    still_valid: Callable[[], bool] = _always,
    on_retry: OnRetry | None = None,
    headers: dict[str, str] | None = None,
    retry_s: float = 0.5,
) -> StoreResult:
    """Publish `data` until JetStream answers; never raises for a missing answer.

    Every try sends the same bytes with `msg_id`. A refusal (an APIError
    other than 503 "temporarily unavailable") ends it at once. Otherwise it
    tries again every `retry_s` until `window_s / 2` have passed since the
    call, or `still_valid()` turns False (the caller no longer owns the
    message: lost leadership, closed connection); False before the first try is
    NOT_SENT: nothing went out. `on_retry(exc)` runs after
    each failed try, before the next one (wait for the connection, re-create a
    stream, count the retry); what it raises propagates.
    """
    deadline = time.monotonic() + window_s / 2
    if not still_valid():  # checked again at the write: a pause may have come since
        return StoreResult.NOT_SENT
    while True:
        try:
            ack = await store.publish(subject, data, msg_id, headers)
            return StoreResult.DUPLICATE if ack.get("duplicate") else StoreResult.STORED
        except (NoStreamResponseError, ServiceUnavailableError) as exc:  # not stored, yet
            error: Exception = exc
        except APIError as exc:
            if exc.err_code == _WRONG_LAST_SEQUENCE:
                return StoreResult.CONFLICT
            return StoreResult.REFUSED
        except (TimeoutError, NatsError) as exc:  # no answer: maybe stored
            error = exc
        if not still_valid() or time.monotonic() > deadline:
            return StoreResult.GAVE_UP
        await asyncio.sleep(retry_s)
        if on_retry is not None:
            await on_retry(error)
        if not still_valid() or time.monotonic() > deadline:
            return StoreResult.GAVE_UP


__all__ = ["OnRetry", "StoreResult", "publish_until_stored"]
