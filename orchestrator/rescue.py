"""Work sent to one worker that died: moved to a live worker of its model.

When a worker's heartbeats stop (it did not say goodbye), the leader drains
the worker's own consumer (`llm.work.<role>.<worker_id>`): messages still
queued, and the ones the dead worker held, which come back after their
ack_wait. Each item is republished to its model's pool with a deterministic
Nats-Msg-Id (the same a draining worker uses, so the two never double it),
flagged `redispatched` when it may have started, and the message is acked
only after that store. Then the consumer is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from cplane.bus.outcome import StoredPublisher
from cplane.bus.provision import ensure_work_consumer
from cplane.bus.requeue import requeue
from cplane.schemas.messages import Role
from cplane.schemas.settings import Settings
from cplane.schemas.subjects import ANY_TARGET, MODEL_TARGET_PREFIX, consumer_for_work

log = logging.getLogger("cplane.orchestrator")
ORPHAN_SWEEP_S = 5.0  # how often the leader looks for own queues of unknown workers
_sweeping = asyncio.Lock()


def _always() -> bool:
    return True


def _gone(alive: Callable[[str], bool], worker_id: str) -> bool:
    return not alive(worker_id)


async def rescue_queue(js: JetStreamContext, store: StoredPublisher, settings: Settings,
                       role: Role, worker_id: str, models: list[str], *,
                       still_dead: Callable[[], bool] = _always) -> int:
    """Move every item queued for (or held by) a dead worker; returns how many moved.

    `still_dead()` is asked before each message moves and before the consumer
    is deleted: a worker that was only slow (it heartbeats again) keeps its
    queue, its consumer and what it holds, and so does a rescuer that no
    longer leads."""
    stream = settings.streams.work.name
    durable = consumer_for_work(role, worker_id)
    try:
        await js.consumer_info(stream, durable)
    except NotFoundError:
        return 0

    async def undecodable(msg: Msg, exc: Exception) -> None:
        log.warning("dropped undecodable work message %d of %s: %s",
                    msg.metadata.sequence.stream, worker_id, exc)

    # What the dead worker held comes back after its ack_wait: wait that long.
    moved = await requeue(
        js, store, settings, durable, worker_id,
        model_of=lambda item: item.request.model or (models[0] if models else ""),
        undecodable=undecodable, wait_held_s=settings.worker.ack_wait_s * 2 + 2,
        go_on=still_dead)
    if not still_dead():
        log.info("worker %s is back (or this rescuer stepped down): its queue stays", worker_id)
        return moved
    with contextlib.suppress(Exception):
        await js.delete_consumer(stream, durable)
    if moved:
        log.info("moved %d work items of dead worker %s to their pools", moved, worker_id)
    return moved


async def orphaned_queues(js: JetStreamContext, settings: Settings,
                          alive: Callable[[str], bool]) -> list[tuple[Role, str]]:
    """Own queues (`work-<role>-<worker_id>`) of workers not alive that still hold
    work: a worker that died while no orchestrator led (or before this one heard
    of it) was never rescued at its expiry. Workers that exit delete theirs.
    Also work on a dead worker's own subject that no consumer reads (routed
    to it after its consumer was deleted): its consumer is made again, so the
    rescue can move it."""
    out: list[tuple[Role, str]] = []
    roles = {r.value: r for r in Role}
    stream = settings.streams.work.name
    consumed: set[str] = set()
    for info in await js.consumers_info(stream):
        name = info.name or ""
        consumed.add(name)
        kind, _, rest = name.partition("-")
        role_name, _, target = rest.partition("-")
        if kind != "work" or role_name not in roles or not target:
            continue
        if target == ANY_TARGET or target.startswith(MODEL_TARGET_PREFIX) or alive(target):
            continue
        if (info.num_pending or 0) + (info.num_ack_pending or 0) > 0:
            out.append((roles[role_name], target))
    head = f"{settings.subjects.prefix}.work."
    held = await js.stream_info(stream, subjects_filter=f"{head}*.*")
    for subject, count in (held.state.subjects or {}).items():
        role_name, _, target = subject[len(head):].partition(".")
        if (count and role_name in roles and target and target != ANY_TARGET
                and not target.startswith(MODEL_TARGET_PREFIX) and not alive(target)
                and consumer_for_work(roles[role_name], target) not in consumed):
            log.warning("%d work messages for %s, which no consumer reads: rescuing them",
                        count, target)
            await ensure_work_consumer(js, settings, roles[role_name], target)
            out.append((roles[role_name], target))  # it holds them from its creation on
    return out


async def rescue_orphans(js: JetStreamContext, store: StoredPublisher, settings: Settings,
                         alive: Callable[[str], bool]) -> None:
    """Rescue every orphaned own queue (see `orphaned_queues`); errors wait for the
    next sweep. One sweep at a time (a rescue waits out held items' ack_wait)."""
    if _sweeping.locked():
        return
    async with _sweeping:
        await _rescue_orphans(js, store, settings, alive)


async def _rescue_orphans(js: JetStreamContext, store: StoredPublisher, settings: Settings,
                          alive: Callable[[str], bool]) -> None:
    try:
        for role, wid in await orphaned_queues(js, settings, alive):
            await rescue_queue(js, store, settings, role, wid, [],
                               still_dead=functools.partial(_gone, alive, wid))
    except Exception as exc:
        log.warning("sweep of orphaned work queues failed: %s", exc)
