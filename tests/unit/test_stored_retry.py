"""publish_until_stored: the same bytes and Nats-Msg-Id until stored, refused or given up."""

from __future__ import annotations

from typing import Any, cast

from nats.errors import ConnectionClosedError
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

from cplane.bus.outcome import StoredPublisher
from cplane.bus.stored_retry import StoreResult, publish_until_stored


class FakeStore:
    """Answers each publish with the next of `answers` (an exception, or an ack)."""

    def __init__(self, *answers: Exception | None) -> None:
        self.answers = list(answers)
        self.sent: list[tuple[str, bytes, str | None]] = []

    async def publish(self, subject: str, data: bytes, msg_id: str | None = None,
                      headers: dict[str, str] | None = None) -> dict[str, Any]:
        self.sent.append((subject, data, msg_id))
        answer = self.answers.pop(0) if self.answers else None
        if answer is not None:
            raise answer
        return {"seq": len(self.sent)}


async def publish(store: FakeStore, **kw: Any) -> StoreResult:
    return await publish_until_stored(cast(StoredPublisher, store), "s", b"d", "id",
                                      retry_s=0.0, **{"window_s": 10.0, **kw})


async def test_unanswered_tries_repeat_the_same_id_until_stored() -> None:
    store = FakeStore(TimeoutError(), NoStreamResponseError(), ServiceUnavailableError(), None)
    seen: list[Exception] = []

    async def on_retry(exc: Exception) -> None:
        seen.append(exc)

    assert await publish(store, on_retry=on_retry) is StoreResult.STORED
    assert store.sent == [("s", b"d", "id")] * 4
    assert [type(e) for e in seen] == [TimeoutError, NoStreamResponseError,
                                       ServiceUnavailableError]


async def test_a_refusal_ends_it_at_once() -> None:
    store = FakeStore(APIError(code=400, description="maximum messages exceeded"))
    assert await publish(store) is StoreResult.REFUSED and len(store.sent) == 1


async def test_gives_up_when_no_longer_valid_or_past_half_the_window() -> None:
    store = FakeStore(*[ConnectionClosedError()] * 3)
    valid = iter([True, False])  # valid at the first write, lost after it failed
    assert await publish(store, still_valid=lambda: next(valid)) is StoreResult.GAVE_UP
    assert len(store.sent) == 1
    # Lost before the first write (a pause between the decision and the write): no try.
    store = FakeStore()
    assert await publish(store, still_valid=lambda: False) is StoreResult.NOT_SENT
    assert not store.sent and not StoreResult.NOT_SENT.stored
    store = FakeStore(*[TimeoutError()] * 1000)
    assert await publish(store, window_s=0.0) is StoreResult.GAVE_UP
    assert len(store.sent) == 1
