"""Idempotent creation of the streams, durable consumers, KV buckets and object store.

The orchestrator calls `ensure_all` at start-up and after a reconnect: it alone
creates the stores (`llm_leases`, `llm_claims`, `llm_config`, `llm_batches`,
`llm_batch_files`), each bounded (`streams.<store>.max_bytes`); everyone else
opens them (`open_key_value`, `open_object_store`). Workers also ensure the
streams, so a stream the broker lost is re-created by whoever comes back first.

Promises:
- A missing stream, consumer or store is created from the settings.
- A stream or store that routes messages as cplane never configures it (a
  RePublish, sources, a mirror or a subject transform not ours) raises
  `ForeignStreamError`: a client that made a store first cannot plant one.
- An existing stream is never silently weakened. When its configuration
  differs from the settings it is left as it is and a warning names every
  differing field, unless `settings.nats.update_streams` is set; even then a
  change that weakens it (fewer replicas, memory instead of file storage, a
  different retention, discard old instead of new, subjects removed) raises
  `StreamWeakeningError` naming the fields, and nothing is changed. So a
  worker started without the cluster config cannot turn R3 streams into R1.
- A durable consumer whose mutable fields (ack_wait, max_deliver,
  max_ack_pending, filter) differ from the settings is updated in place (the
  server keeps its position); a change the server refuses is logged and the
  consumer kept.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RePublish,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamSource,
)
from nats.js.errors import APIError, BadRequestError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from cplane.schemas.messages import PRIORITIES, Priority, Role
from cplane.schemas.settings import Settings, StoreSettings, StreamSettings
from cplane.schemas.subjects import (
    ANY_TARGET,
    MODEL_TARGET_PREFIX,
    Subjects,
    consumer_for_priority,
    consumer_for_work,
)

log = logging.getLogger("cplane.provision")
_STREAM_EXISTS = 10058  # "stream name already in use with a different configuration"

# Stream fields the settings decide; everything else on an existing stream is kept.
STREAM_FIELDS = (
    "subjects", "retention", "storage", "discard", "max_msgs", "max_bytes", "max_age",
    "max_msg_size", "duplicate_window", "num_replicas", "allow_direct",
)
# How a stream routes messages beyond its subjects: set only as cplane configures it.
ROUTING_FIELDS = ("republish", "sources", "mirror", "subject_transform")
# Consumer fields compared with the settings; the first four the server updates in place.
CONSUMER_FIELDS = ("ack_wait", "max_deliver", "max_ack_pending", "filter_subject",
                   "filter_subjects", "ack_policy")


class StreamWeakeningError(RuntimeError):
    """The settings would weaken an existing stream; it was left unchanged."""

    def __init__(self, stream: str, fields: dict[str, tuple[object, object]]) -> None:
        detail = ", ".join(f"{k}: {cur!r} -> {new!r}" for k, (cur, new) in fields.items())
        super().__init__(
            f"refusing to weaken stream {stream} ({detail}); change it by hand if you mean it"
        )
        self.stream = stream
        self.fields = fields


# -- stream configurations (pure) -----------------------------------------------
def _stream_config(
    s: StreamSettings, subjects: list[str], retention: RetentionPolicy, discard_new: bool,
    republish: RePublish | None = None, sources: list[StreamSource] | None = None,
    allow_direct: bool = False,
) -> StreamConfig:
    return StreamConfig(
        name=s.name,
        subjects=subjects,
        retention=retention,
        storage=StorageType.MEMORY if s.storage == "memory" else StorageType.FILE,
        max_bytes=s.max_bytes,
        max_msgs=s.max_msgs,
        max_age=s.max_age_s or None,
        max_msg_size=s.max_msg_size,
        duplicate_window=s.duplicate_window_s,
        num_replicas=s.replicas,
        discard=DiscardPolicy.NEW if discard_new else DiscardPolicy.OLD,
        republish=republish,
        sources=sources,
        allow_direct=allow_direct,
    )


def stream_configs(settings: Settings) -> list[StreamConfig]:
    """The six streams: LLM_REQ, LLM_WORK, LLM_OUT, LLM_DONE, LLM_CANCEL, LLM_DLQ."""
    subj, st, limits = settings.subjects, settings.streams, RetentionPolicy.LIMITS
    return [
        # One subject pattern per priority: a publish to an unknown priority
        # matches no stream and the publisher gets an error.
        _stream_config(st.req, [s for p in PRIORITIES
                                for s in (subj.requests_of(p), subj.tenant_requests_of(p))],
                       RetentionPolicy.WORK_QUEUE, True),
        _stream_config(st.work, [subj.work_all], RetentionPolicy.WORK_QUEUE, True),
        # Outputs, chunks and terminals of a request in one stream, so readers get them
        # in the order the worker published them: stored first, then republished
        # (llm.s.out -> llm.out, llm.s.done -> llm.done). Direct gets: a tenant's own.
        _stream_config(st.out, [subj.out_store_all, subj.done_store_all], limits, False,
                       RePublish(src=f"{subj.prefix}.s.*.>",
                                 dest=f"{subj.prefix}.{{{{wildcard(1)}}}}.>"),
                       allow_direct=True),
        # Terminals kept for days: copied by the server from LLM_OUT. Direct gets:
        # the orchestrator asks for many ids' terminals in one request (bus/replay.py).
        _stream_config(st.done, [], limits, False, sources=[
            StreamSource(name=st.out.name, filter_subject=subj.done_store_all)],
            allow_direct=True),
        _stream_config(st.cancel, [subj.cancel_all], limits, False),
        _stream_config(st.dlq, [subj.dead_letters_all], limits, False),
    ]


def _norm(field: str, value: object) -> object:
    """One spelling per meaning: the server reports no age limit as 0, enums as strings."""
    if field == "subjects":
        return tuple(sorted(value or ()))  # type: ignore[call-overload]
    if field == "max_age":
        return float(value or 0)  # type: ignore[arg-type]
    if field in ("retention", "storage", "discard"):
        return getattr(value, "value", value)
    if field == "num_replicas":
        return value or 1
    if field == "allow_direct":
        return bool(value)
    if field == "republish" and value is not None:
        return (value.src, value.dest, bool(value.headers_only))  # type: ignore[attr-defined]
    if field == "sources":
        return tuple(sorted(map(repr, map(_source, value or ()))))  # type: ignore[call-overload]
    if field == "mirror":
        return _source(value)  # type: ignore[arg-type]
    if field == "subject_transform" and value is not None:
        return (value.src, value.dest)  # type: ignore[attr-defined]
    return value


def _source(s: StreamSource | None) -> object:
    if s is None:
        return None
    ext = s.external.api if s.external is not None else ""
    return (s.name, s.filter_subject or "", ext,
            tuple((t.src, t.dest) for t in s.subject_transforms or ()))


def stream_differences(
    current: StreamConfig, wanted: StreamConfig, fields: tuple[str, ...] = STREAM_FIELDS
) -> dict[str, tuple[object, object]]:
    """Field -> (current, wanted) for every settings-owned field (of `fields`) that differs."""
    diffs: dict[str, tuple[object, object]] = {}
    for field in fields:
        cur = _norm(field, getattr(current, field))
        new = _norm(field, getattr(wanted, field))
        if cur != new:
            diffs[field] = (cur, new)
    return diffs


def weakening(current: StreamConfig, wanted: StreamConfig) -> dict[str, tuple[object, object]]:
    """The differences that would make `current` less safe if `wanted` were applied.

    Fewer replicas, memory instead of file, another retention, discard old
    instead of new (a full stream would drop accepted messages), or subjects
    removed (their publishers would be refused). Limits (age, size, count)
    are operator choices and not counted here.
    """
    diffs = stream_differences(current, wanted)
    weak: dict[str, tuple[object, object]] = {}
    for field, (cur, new) in diffs.items():
        if field == "num_replicas":
            is_weaker = int(new) < int(cur)  # type: ignore[call-overload]
        elif field == "storage":
            is_weaker = cur == StorageType.FILE.value and new == StorageType.MEMORY.value
        elif field == "retention":
            is_weaker = True
        elif field == "discard":
            is_weaker = cur == DiscardPolicy.NEW.value
        elif field == "subjects":
            is_weaker = not set(cur).issubset(set(new))  # type: ignore[call-overload]
        else:
            is_weaker = False
        if is_weaker:
            weak[field] = (cur, new)
    return weak


class ForeignStreamError(RuntimeError):
    """An existing stream routes messages as cplane never configures it (see
    foreign_routing; a store's subjects too): nothing is changed, the caller stops."""

    def __init__(self, stream: str, fields: dict[str, tuple[object, object]]) -> None:
        detail = ", ".join(f"{k}: {cur!r}, ours {new!r}" for k, (cur, new) in fields.items())
        super().__init__(
            f"refusing to start: stream {stream} routes messages as cplane did not configure "
            f"({detail}); delete it (nats stream rm {stream}) and start the orchestrator again")
        self.stream = stream
        self.fields = fields


def foreign_routing(current: StreamConfig, wanted: StreamConfig
                    ) -> dict[str, tuple[object, object]]:
    """Routing of `current` that `wanted` (ours) does not configure: a RePublish, sources,
    a mirror or a subject transform could send stored messages to any subject
    (`llm.admin.*`) or pull in other streams. LLM_OUT's RePublish and LLM_DONE's
    source are ours, so they pass."""
    return stream_differences(current, wanted, ROUTING_FIELDS)


# -- streams (I/O) ----------------------------------------------------------------
_API_TRIES = 3  # a JetStream API request unanswered within its timeout is asked again


async def _current(js: JetStreamContext, name: str) -> StreamConfig:
    """The stream's config; NotFoundError if none. A busy server (many services
    provisioning at once on a loaded host) may answer after the request's
    timeout: reading is safe to repeat, so ask again before giving up."""
    for attempt in range(_API_TRIES):
        try:
            return (await js.stream_info(name)).config
        except TimeoutError:
            if attempt + 1 == _API_TRIES:
                raise
            log.info("stream_info %s unanswered; asking again", name)
    raise AssertionError("unreachable")


async def _create_or_current(js: JetStreamContext, cfg: StreamConfig) -> StreamConfig | None:
    """None when `cfg` was created now; else the existing stream's config, which must
    route messages only as `cfg` does (ForeignStreamError)."""
    assert cfg.name is not None
    try:
        current = await _current(js, cfg.name)
    except NotFoundError:
        try:
            await js.add_stream(cfg)
            log.info("created stream %s", cfg.name)
            return None
        except APIError as exc:
            # Created by another process meanwhile: "already exists", or, when
            # both creations overlap, the server may count the storage twice
            # and refuse ours with "insufficient storage" (seen with four
            # processes starting together). Either way: if it exists, use it.
            try:
                current = await _current(js, cfg.name)
            except NotFoundError:
                raise exc from None
            if not (isinstance(exc, BadRequestError) and exc.err_code == _STREAM_EXISTS):
                log.info("stream %s created by another process (%s)", cfg.name, exc)
    foreign = foreign_routing(current, cfg)
    if foreign:
        raise ForeignStreamError(cfg.name, foreign)
    return current


async def ensure_stream(js: JetStreamContext, cfg: StreamConfig, *, update: bool = False) -> None:
    """Create `cfg` if missing; else compare, warn, and update only if allowed and not weaker."""
    assert cfg.name is not None
    current = await _create_or_current(js, cfg)
    if current is None:
        return
    diffs = stream_differences(current, cfg)
    if not diffs:
        return
    detail = ", ".join(f"{k}: {cur!r} -> {new!r}" for k, (cur, new) in diffs.items())
    if not update:
        log.warning("stream %s differs from the settings and is kept as it is (%s); set "
                    "nats.update_streams to apply safe changes", cfg.name, detail)
        return
    weak = weakening(current, cfg)
    if weak:
        raise StreamWeakeningError(cfg.name, weak)
    if "subjects" in diffs:
        log.warning("stream %s: subjects change %s -> %s", cfg.name, *diffs["subjects"])
    merged = dataclasses.replace(current, **{f: getattr(cfg, f) for f in diffs})
    log.warning("updating stream %s (%s)", cfg.name, detail)
    await js.update_stream(merged)


async def ensure_streams(js: JetStreamContext, settings: Settings) -> None:
    """Ensure all six streams (see the module's promises)."""
    for cfg in stream_configs(settings):
        await ensure_stream(js, cfg, update=settings.nats.update_streams)


# -- consumers --------------------------------------------------------------------
def consumer_differences(
    current: ConsumerConfig, wanted: ConsumerConfig
) -> dict[str, tuple[object, object]]:
    diffs: dict[str, tuple[object, object]] = {}
    for field in CONSUMER_FIELDS:
        cur, new = getattr(current, field), getattr(wanted, field)
        cur, new = getattr(cur, "value", cur), getattr(new, "value", new)
        if new is not None and cur != new:
            diffs[field] = (cur, new)
    return diffs


async def ensure_consumer(js: JetStreamContext, stream: str, cfg: ConsumerConfig) -> None:
    """Create a durable consumer, or update one whose compared fields differ.

    The server keeps an updated consumer's position and pending acks. A
    change it refuses (an immutable field) is logged and the consumer kept.
    """
    assert cfg.durable_name is not None
    try:
        current = (await js.consumer_info(stream, cfg.durable_name)).config
    except NotFoundError:
        current = None
    if current is not None:
        diffs = consumer_differences(current, cfg)
        if not diffs:
            return
        log.info("updating consumer %s on %s: %s", cfg.durable_name, stream, diffs)
    try:
        await js.add_consumer(stream, cfg)
    except BadRequestError as exc:
        log.warning("consumer %s on %s kept as is: %s", cfg.durable_name, stream, exc)


def request_consumer_config(settings: Settings, subjects: Subjects, p: Priority) -> ConsumerConfig:
    o = settings.orchestrator
    return ConsumerConfig(
        durable_name=consumer_for_priority(p),
        filter_subjects=[subjects.requests_of(p), subjects.tenant_requests_of(p)],
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=o.ack_wait_s,
        max_deliver=-1,  # the orchestrator dead-letters at o.max_deliveries itself
        max_ack_pending=max(o.hold_per_priority * 4, 1024),
        max_waiting=512,
    )


async def ensure_request_consumers(js: JetStreamContext, settings: Settings) -> None:
    for p in PRIORITIES:
        cfg = request_consumer_config(settings, settings.subjects, p)
        await ensure_consumer(js, settings.streams.req.name, cfg)


def work_consumer_config(settings: Settings, role: Role, target: str) -> ConsumerConfig:
    w = settings.worker
    return ConsumerConfig(
        durable_name=consumer_for_work(role, target),
        filter_subject=settings.subjects.work(role, target),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=w.ack_wait_s,
        max_deliver=-1,  # the worker ends a work item after max_migrations itself
        max_ack_pending=100_000,
        max_waiting=512,
        # A dead worker's own consumer goes away after an hour idle; pools stay.
        inactive_threshold=None if target == ANY_TARGET or target.startswith(
            MODEL_TARGET_PREFIX) else 3600.0,
    )


async def ensure_work_consumer(
    js: JetStreamContext, settings: Settings, role: Role, target: str
) -> str:
    cfg = work_consumer_config(settings, role, target)
    await ensure_consumer(js, settings.streams.work.name, cfg)
    assert cfg.durable_name is not None
    return cfg.durable_name


async def delete_work_consumer(
    js: JetStreamContext, settings: Settings, role: Role, target: str
) -> None:
    try:
        await js.delete_consumer(settings.streams.work.name, consumer_for_work(role, target))
    except NotFoundError:
        pass


# -- KV buckets and object stores -------------------------------------------------------
CONFIG_HISTORY = 5  # past choices kept per key (`nats kv history`): who switched what, when
# Set to the settings on an existing store (its data kept): the bounds on what it may hold.
STORE_LIMITS = ("max_bytes", "max_msg_size", "max_msgs", "max_msgs_per_subject", "discard")


class StoreMissingError(LookupError):
    """A KV bucket or object store is not there: only the orchestrator creates them."""

    def __init__(self, kind: str, bucket: str) -> None:
        super().__init__(f"{kind} {bucket} does not exist: start an orchestrator first "
                         "(it provisions every store)")
        self.bucket = bucket


def claims_bucket(settings: Settings) -> str:
    """KV bucket of the workers' per-request claims (bus/claims.py)."""
    return f"{settings.subjects.prefix}_claims"


def _kv_config(bucket: str, lim: StoreSettings, *, replicas: int, history: int = 1,
               ttl_s: float | None = None) -> StreamConfig:
    """A bucket's stream as nats-py's create_key_value makes it, with our limits."""
    return StreamConfig(
        name=f"KV_{bucket}", subjects=[f"$KV.{bucket}.>"], retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE, num_replicas=replicas, discard=DiscardPolicy.NEW,
        max_bytes=lim.max_bytes, max_msg_size=lim.max_value_size, max_msgs=-1,
        max_msgs_per_subject=history, max_age=ttl_s, max_consumers=-1,
        duplicate_window=min(120.0, ttl_s or 120.0),
        allow_rollup_hdrs=True, allow_msg_ttl=True, deny_delete=True)


def _object_config(bucket: str, lim: StoreSettings, *, replicas: int,
                   ttl_s: float | None = None) -> StreamConfig:
    """An object store's stream as nats-py's create_object_store makes it, with our limits."""
    return StreamConfig(
        name=f"OBJ_{bucket}", subjects=[f"$O.{bucket}.C.>", f"$O.{bucket}.M.>"],
        retention=RetentionPolicy.LIMITS, storage=StorageType.FILE, num_replicas=replicas,
        discard=DiscardPolicy.NEW, max_bytes=lim.max_bytes, max_msg_size=lim.max_value_size,
        max_msgs=-1, max_age=ttl_s, max_consumers=-1, duplicate_window=120.0,
        allow_rollup_hdrs=True, allow_direct=True)


def store_configs(settings: Settings) -> dict[str, StreamConfig]:
    """The five stores' streams, keyed as their limits in `streams`. Batch jobs and
    files live as long as LLM_DONE keeps terminals (a job outlives no result it
    points to); config keeps 5 past values; leases and claims expire by TTL."""
    subj, st = settings.subjects, settings.streams
    done_ttl = st.done.max_age_s or None
    return {
        "leases": _kv_config(subj.leases_bucket, st.leases, replicas=st.req.replicas,
                             ttl_s=settings.orchestrator.lease_ttl_s),
        "claims": _kv_config(claims_bucket(settings), st.claims, replicas=st.work.replicas,
                             ttl_s=settings.worker.claim_ttl_s),
        "config": _kv_config(subj.config_bucket, st.config, replicas=st.req.replicas,
                             history=CONFIG_HISTORY),
        "batch_jobs": _kv_config(subj.batch_jobs_bucket, st.batch_jobs,
                                 replicas=st.done.replicas, ttl_s=done_ttl),
        "batch_files": _object_config(subj.batch_files_bucket, st.batch_files,
                                      replicas=st.done.replicas, ttl_s=done_ttl),
    }


async def ensure_store(js: JetStreamContext, cfg: StreamConfig) -> None:
    """Create a store's stream if missing. An existing one keeps its data: routing not
    ours or other subjects -> ForeignStreamError, a weaker one (memory, fewer replicas,
    another retention) -> StreamWeakeningError, nothing changed; limits (STORE_LIMITS)
    set to the settings' (logged); anything else (a TTL: entries could vanish under
    their holder) kept, with a warning."""
    assert cfg.name is not None
    current = await _create_or_current(js, cfg)
    if current is None:
        return
    diffs = stream_differences(current, cfg)
    if "subjects" in diffs:
        raise ForeignStreamError(cfg.name, {"subjects": diffs["subjects"]})
    weak = weakening(current, cfg)
    if weak:
        raise StreamWeakeningError(cfg.name, weak)
    limits = {f: (getattr(current, f), getattr(cfg, f)) for f in STORE_LIMITS
              if _norm(f, getattr(current, f)) != _norm(f, getattr(cfg, f))}
    if limits:
        log.warning("store %s: limits set to the settings' (%s)", cfg.name,
                    ", ".join(f"{k}: {cur!r} -> {new!r}" for k, (cur, new) in limits.items()))
        await js.update_stream(dataclasses.replace(current, **{f: getattr(cfg, f)
                                                                for f in limits}))
    rest = {k: v for k, v in diffs.items() if k not in limits}
    if rest:
        log.warning("store %s differs from the settings and is kept as it is (%s)", cfg.name,
                    ", ".join(f"{k}: {cur!r} -> {new!r}" for k, (cur, new) in rest.items()))


async def open_key_value(js: JetStreamContext, bucket: str) -> KeyValue:
    """An existing bucket: every component but the orchestrator opens, never creates.
    StoreMissingError (naming it) when there is none."""
    try:
        return await js.key_value(bucket)
    except NotFoundError:  # BucketNotFoundError too
        raise StoreMissingError("KV bucket", bucket) from None


async def open_object_store(js: JetStreamContext, bucket: str) -> ObjectStore:
    """An existing object store (see open_key_value)."""
    try:
        return await js.object_store(bucket)
    except NotFoundError:
        raise StoreMissingError("object store", bucket) from None


async def ensure_lease_bucket(js: JetStreamContext, settings: Settings) -> KeyValue:
    """The orchestrator lease's bucket (TTL `orchestrator.lease_ttl_s`), ensured and opened."""
    await ensure_store(js, store_configs(settings)["leases"])
    return await open_key_value(js, settings.subjects.leases_bucket)


async def ensure_config_bucket(js: JetStreamContext, settings: Settings) -> KeyValue:
    """The bucket of fleet-wide runtime choices (the dispatch policy; file storage, no
    TTL: a choice outlives every process and a broker restart), ensured and opened."""
    await ensure_store(js, store_configs(settings)["config"])
    return await open_key_value(js, settings.subjects.config_bucket)


async def open_batch_stores(js: JetStreamContext, settings: Settings
                            ) -> tuple[KeyValue, ObjectStore]:
    """The KV bucket of batch job records and the object store of their files, opened
    (the orchestrator provisions them: StoreMissingError before one has run)."""
    subj = settings.subjects
    return (await open_key_value(js, subj.batch_jobs_bucket),
            await open_object_store(js, subj.batch_files_bucket))


# -- everything ---------------------------------------------------------------------
async def ensure_all(js: JetStreamContext, settings: Settings) -> None:
    """Every stream, the request consumers and every KV bucket and object store: the
    orchestrator's start-up and its reconnects. Only the orchestrator calls it: the
    others open the stores (`open_key_value`, `open_object_store`), never create them.

    Call it again when a publish answers NoStreamResponseError (the broker
    lost a stream): it re-creates what is missing and leaves the rest alone.
    Raises ForeignStreamError / StreamWeakeningError (nothing changed) on a
    stream or store that someone else made otherwise than cplane would.
    Work consumers belong to each worker (`ensure_work_consumer`).
    """
    await ensure_streams(js, settings)
    await ensure_request_consumers(js, settings)
    for cfg in store_configs(settings).values():
        await ensure_store(js, cfg)


class Provisioner:
    """Single-flight `ensure_all` (plus a service's own `extra` step) for reconnect hooks.

    Concurrent callers (a reconnect and a burst of NoStreamResponseErrors)
    share one run; a call after a run has finished starts a new one.
    """

    def __init__(self, js: JetStreamContext, settings: Settings,
                 extra: Callable[[], Awaitable[None]] | None = None) -> None:
        self._js = js
        self._settings = settings
        self._extra = extra
        self._running: asyncio.Future[None] | None = None
        self.runs = 0  # completed runs, for tests and status

    async def ensure(self) -> None:
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._run())
        await asyncio.shield(self._running)

    async def _run(self) -> None:
        await ensure_all(self._js, self._settings)
        if self._extra is not None:
            await self._extra()
        self.runs += 1


__all__ = [
    "CONSUMER_FIELDS",
    "STREAM_FIELDS",
    "ForeignStreamError",
    "Provisioner",
    "StoreMissingError",
    "StreamWeakeningError",
    "claims_bucket",
    "delete_work_consumer",
    "ensure_all",
    "ensure_config_bucket",
    "ensure_consumer",
    "ensure_lease_bucket",
    "ensure_request_consumers",
    "ensure_store",
    "ensure_stream",
    "ensure_streams",
    "ensure_work_consumer",
    "foreign_routing",
    "open_batch_stores",
    "open_key_value",
    "open_object_store",
    "request_consumer_config",
    "store_configs",
    "stream_configs",
    "stream_differences",
    "weakening",
    "work_consumer_config",
]
