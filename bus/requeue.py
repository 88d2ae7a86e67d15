"""Moving the work queued on one worker's own consumer to its models' pools.

Used by a worker that drains or turns unhealthy (its own queue) and by the
leader for a worker that died. Each item is republished to the pool of its
model with a Nats-Msg-Id fixed by the move (`<rid>:<role>:<attempt>:<next_seq>
:moved-<worker>`), so the worker's own move and the leader's never double an
item; the message is acked only after its items are stored.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from cplane.bus.outcome import StoredPublisher
from cplane.schemas.codec import encode, work_decoder
from cplane.schemas.messages import WorkBatch, WorkItem
from cplane.schemas.settings import Settings
from cplane.schemas.subjects import Subjects, model_target

Undecodable = Callable[[Msg, Exception], Awaitable[None]]


async def requeue(js: JetStreamContext, store: StoredPublisher, settings: Settings,
                  durable: str, worker_id: str, *, model_of: Callable[[WorkItem], str],
                  undecodable: Undecodable, wait_held_s: float = 0.0,
                  go_on: Callable[[], bool] | None = None) -> int:
    """Move what `durable` holds; returns how many items moved.

    `wait_held_s` > 0: also wait (up to that long) for messages delivered to
    the worker and never acked (a dead worker's), which come back after their
    ack_wait; they may have started, so they are flagged `redispatched`.
    `go_on()` False stops the move before the next message (fetched ones not
    moved go back to the consumer, unacked).
    """
    stream = settings.streams.work.name
    psub = await js.pull_subscribe_bind(durable, stream=stream)
    deadline = time.monotonic() + wait_held_s
    moved = 0
    try:
        while go_on is None or go_on():
            try:
                msgs = await psub.fetch(64, timeout=0.3)
            except (TimeoutError, nats.errors.TimeoutError):
                if time.monotonic() >= deadline:
                    break
                info = await js.consumer_info(stream, durable)
                if not info.num_pending and not info.num_ack_pending:
                    break
                continue
            for msg in msgs:
                if go_on is not None and not go_on():
                    with contextlib.suppress(Exception):
                        await msg.nak()
                    continue
                try:
                    batch = work_decoder.decode(msg.data)
                except msgspec.DecodeError as exc:
                    await undecodable(msg, exc)
                    await msg.ack()
                    continue
                started = msg.metadata.num_delivered > 1
                for item in batch.items:
                    item = msgspec.structs.replace(
                        item, redispatched=item.redispatched or started)
                    rid = Subjects.scoped_id(item.request.group, item.request.request_id)
                    msg_id = (f"{rid}:{item.role.value}:{item.attempt}:{item.next_seq}"
                              f":moved-{worker_id}")
                    subject = settings.subjects.work(item.role, model_target(model_of(item)))
                    await store.publish(subject, encode(WorkBatch(items=[item])), msg_id)
                await msg.ack()
                moved += len(batch.items)
    finally:
        with contextlib.suppress(Exception):
            await psub.unsubscribe()
    return moved
