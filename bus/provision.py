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
  max_ack_pending, filter, replicas) differ from the settings is updated in
  place (the server keeps its position); a change the server refuses is
  logged and the consumer kept.
- On a cluster (`streams.replicas`, bus/stream_config.py) a stream or store
  found with fewer replicas than the settings is reported (a warning naming
  it) and, with `update_streams`, raised in place; never lowered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, StreamConfig
from nats.js.errors import APIError, BadRequestError, NotFoundError, ServiceUnavailableError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from cplane.bus.stream_config import (
    CONSUMER_FIELDS,
    STORE_LIMITS,
    STREAM_FIELDS,
    ForeignStreamError,
    StreamWeakeningError,
    claims_bucket,
    consumer_differences,
    foreign_routing,
    norm_field,
    request_consumer_config,
    store_configs,
    stream_configs,
    stream_differences,
    weakening,
    work_consumer_config,
)
from cplane.schemas.messages import PRIORITIES, Role
from cplane.schemas.settings import Settings
from cplane.schemas.subjects import DEFAULT_PARTITION, consumer_for_work, partition_token

log = logging.getLogger("cplane.provision")
T = TypeVar("T")
_STREAM_EXISTS = 10058  # "stream name already in use with a different configuration"


# -- streams (I/O) ----------------------------------------------------------------
# A JetStream API request unanswered (a busy server), answered 503 (the meta group or a
# stream's Raft group electing a leader) or with no responders (JetStream not up on the
# node yet) is asked again, with a growing pause, for up to this long.
_API_PATIENCE_S = 30.0
TRANSIENT_API_ERRORS = (TimeoutError, ServiceUnavailableError, NoRespondersError)


async def asked(call: Callable[[], Awaitable[T]], what: str) -> T:
    """`call()`, asked again while its answer is transient (TRANSIENT_API_ERRORS): many
    services provisioning at once on a loaded host, or a cluster electing a leader
    (seconds). Every request asked this way is safe to repeat (a read, or a creation
    of an identical config, which the server accepts again)."""
    deadline = time.monotonic() + _API_PATIENCE_S
    pause = 0.2
    while True:
        try:
            return await call()
        except TRANSIENT_API_ERRORS as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.info("%s: %s; asking again in %.1f s", what, exc or type(exc).__name__, pause)
        await asyncio.sleep(pause)
        pause = min(pause * 2, 2.0)


async def _current(js: JetStreamContext, name: str) -> StreamConfig:
    """The stream's config; NotFoundError if none."""
    return (await asked(lambda: js.stream_info(name), f"stream_info {name}")).config


async def _create_or_current(js: JetStreamContext, cfg: StreamConfig) -> StreamConfig | None:
    """None when `cfg` was created now; else the existing stream's config, which must
    route messages only as `cfg` does (ForeignStreamError)."""
    assert cfg.name is not None
    try:
        current = await _current(js, cfg.name)
    except NotFoundError:
        try:
            await asked(lambda: js.add_stream(cfg), f"add_stream {cfg.name}")
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


async def ensure_consumer(js: JetStreamContext, stream: str, cfg: ConsumerConfig) -> None:
    """Create a durable consumer, or update one whose compared fields differ.

    The server keeps an updated consumer's position and pending acks. A
    change it refuses (an immutable field) is logged and the consumer kept.
    """
    assert cfg.durable_name is not None
    name = cfg.durable_name
    try:
        current = (await asked(lambda: js.consumer_info(stream, name),
                                f"consumer_info {name}")).config
    except NotFoundError:
        current = None
    if current is not None:
        diffs = consumer_differences(current, cfg)
        if not diffs:
            return
        log.info("updating consumer %s on %s: %s", cfg.durable_name, stream, diffs)
    try:
        await asked(lambda: js.add_consumer(stream, cfg), f"add_consumer {name}")
    except BadRequestError as exc:
        log.warning("consumer %s on %s kept as is: %s", cfg.durable_name, stream, exc)


async def ensure_request_consumers(js: JetStreamContext, settings: Settings,
                                   pool: str | None = None) -> None:
    """Each priority's request consumer of one partition (`pool`: its token), or, None,
    of every partition the settings name (unpartitioned: the default's alone, which
    reads every request subject there is)."""
    pools = ([DEFAULT_PARTITION, *map(partition_token, settings.orchestrator.partitions)]
             if pool is None else [pool])
    for one in pools:
        for p in PRIORITIES:
            cfg = request_consumer_config(settings, settings.subjects, p, one)
            await ensure_consumer(js, settings.streams.req.name, cfg)


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


class StoreMissingError(LookupError):
    """A KV bucket or object store is not there: only the orchestrator creates them."""

    def __init__(self, kind: str, bucket: str) -> None:
        super().__init__(f"{kind} {bucket} does not exist: start an orchestrator first "
                         "(it provisions every store)")
        self.bucket = bucket


async def ensure_store(js: JetStreamContext, cfg: StreamConfig, *, update: bool = False) -> None:
    """Create a store's stream if missing. An existing one keeps its data: routing not
    ours or other subjects -> ForeignStreamError, a weaker one (memory, fewer replicas,
    another retention) -> StreamWeakeningError, nothing changed; limits (STORE_LIMITS)
    set to the settings' (logged); more replicas applied with `update` (else a
    warning); anything else (a TTL: entries could vanish under their holder) kept,
    with a warning."""
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
    applied = STORE_LIMITS + (("num_replicas",) if update else ())
    limits = {f: (getattr(current, f), getattr(cfg, f)) for f in applied
              if norm_field(f, getattr(current, f)) != norm_field(f, getattr(cfg, f))}
    if limits:
        log.warning("store %s: set to the settings' (%s)", cfg.name,
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
        return await asked(lambda: js.key_value(bucket), f"key_value {bucket}")
    except NotFoundError:  # BucketNotFoundError too
        raise StoreMissingError("KV bucket", bucket) from None


async def open_object_store(js: JetStreamContext, bucket: str) -> ObjectStore:
    """An existing object store (see open_key_value)."""
    try:
        return await asked(lambda: js.object_store(bucket), f"object_store {bucket}")
    except NotFoundError:
        raise StoreMissingError("object store", bucket) from None


async def ensure_lease_bucket(js: JetStreamContext, settings: Settings) -> KeyValue:
    """The orchestrator lease's bucket (TTL `orchestrator.lease_ttl_s`), ensured and opened."""
    await ensure_store(js, store_configs(settings)["leases"],
                       update=settings.nats.update_streams)
    return await open_key_value(js, settings.subjects.leases_bucket)


async def ensure_config_bucket(js: JetStreamContext, settings: Settings) -> KeyValue:
    """The bucket of fleet-wide runtime choices (the dispatch policy; file storage, no
    TTL: a choice outlives every process and a broker restart), ensured and opened."""
    await ensure_store(js, store_configs(settings)["config"],
                       update=settings.nats.update_streams)
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
        await ensure_store(js, cfg, update=settings.nats.update_streams)


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
    "TRANSIENT_API_ERRORS",
    "ForeignStreamError",
    "Provisioner",
    "StoreMissingError",
    "StreamWeakeningError",
    "asked",
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
