"""Python client: publish a Request, read its tokens and its Final.

    async with await Client.connect("nats://127.0.0.1:4222") as client:
        final = await client.generate(Request(request_id=new_request_id(), prompt="Hi"))
        async for chunk in client.stream(Request(request_id=new_request_id(), prompt="Hi")):
            print(chunk.text, end="")

Promises:
- The client subscribes to the request's output subjects before publishing
  and delivers chunks in `seq` order without repeats.
- It takes only messages that belong to the request: a TokenChunk on
  `<prefix>.out.<group>.<request_id>`, a Final/ErrorReply on
  `<prefix>.done.<group>.<request_id>`, each carrying that request_id.
  Anything else is dropped (logged at debug).
- Nothing is lost across a reconnect: when the connection comes back, every
  request still open replays its chunks from LLM_OUT and looks up a terminal
  stored in LLM_DONE while it was away. When the Final shows chunks it never
  saw, they are replayed from LLM_OUT too; chunks gone from there as well
  (aged out of its retention) end the iteration with StreamGap, which
  carries the complete Final: a stream never ends with a gap it did not
  report. A request quiet for 5 s reads what is stored too, then again at
  doubling intervals: a live copy can be lost without a reconnect (quiet.py).
- `generate()` and `stream()` never wait forever: without a `timeout` they
  use the client's `default_timeout_s` (300 s unless given to `Client` /
  `Client.connect`; None waits without bound). On timeout they cancel the
  request (it is no longer wanted) and raise TimeoutError.
- A request is refused before publishing (RejectedAtPublish) when its
  `reply_to` is outside `settings.limits.reply_to_prefixes` (`_INBOX.` by
  default), its group is reserved, its priority is unknown, or its id, group or
  SLO class cannot be a subject token.
- A publish no stream answers ("no responders": a cluster electing a stream
  leader after a node died, or no LLM_REQ) is sent again until `timeout`, then
  raises Unavailable, a TimeoutError: nothing was stored, retrying is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy
from nats.js.errors import APIError, NotFoundError

from cplane.bus import tracing
from cplane.bus.credentials import ConnectErrors, cannot_reach, connect_options, server_list
from cplane.client.errors import (
    Overloaded,
    RejectedAtPublish,
    RequestFailed,
    StreamGap,
    Unavailable,
    publish_error,
)
from cplane.client.quiet import QuietWatch
from cplane.client.request_publish import publish_request
from cplane.client.results import Start, StoredResult, stored_results
from cplane.schemas import trace
from cplane.schemas.codec import encode, output_decoder
from cplane.schemas.messages import ErrorReply, Final, Priority, Request, TokenChunk
from cplane.schemas.settings import Settings, load_settings
from cplane.schemas.subjects import (
    DEFAULT_SLO_CLASS,
    INTERACTIVE_GROUP,
    RESERVED_GROUPS,
    Subjects,
    pool_of,
    scoped,
    valid_token,
)

log = logging.getLogger("cplane.client")
DEFAULT_TIMEOUT_S = 300.0  # generate()/stream() without a timeout wait at most this long
_RECOVERY_ATTEMPTS = 12  # JetStream may answer 503 for a moment after a broker restart


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestHandle:
    """One submitted request: iterate it for chunks, await `result()` for its Final."""

    def __init__(self, client: Client, request: Request) -> None:
        self.client = client
        self.request = request
        self.request_id = request.request_id
        self.duplicate = False  # the server had this request_id already
        self.group = group = client.output_group(request)
        self._out_subject = client.subjects.out(group, request.request_id)
        self._done_subject = client.subjects.done(group, request.request_id)
        # Where the streams store them (readers get them republished on the two above).
        self._out_store = client.subjects.out_store(group, request.request_id)
        self._done_store = client.subjects.done_store(group, request.request_id)
        self._next_seq = 0
        self._pending: dict[int, TokenChunk] = {}
        self._chunks: asyncio.Queue[TokenChunk | None] = asyncio.Queue()
        self._terminal: asyncio.Future[Final | ErrorReply] = (
            asyncio.get_running_loop().create_future()
        )
        self._sub: Subscription | None = None
        self._replaying = False
        self.gap_from: int | None = None  # first seq lost for good (StreamGap)
        self._bg: set[asyncio.Future[None]] = set()  # keeps background steps referenced
        self.closed = False  # True once the stream has ended (or `close()`): nothing more is read
        self.traceparent = ""  # sent with the request (W3C trace context)
        self.worker_traceparent = ""  # on its terminal: the serving worker's span, same trace

    # -- input -----------------------------------------------------------------
    async def _on_msg(self, msg: Msg) -> None:
        if msg.headers and trace.HEADER in msg.headers:  # the worker's span, on its terminal
            self.worker_traceparent = msg.headers[trace.HEADER]
        self._take_msg(msg.subject, msg.data)

    def _take_msg(self, subject: str, data: bytes | None) -> bool:
        """Decode and take one message if it belongs to this request; False if dropped."""
        try:
            out = output_decoder.decode(data or b"")
        except msgspec.DecodeError as exc:
            log.debug("%s: dropped undecodable message on %s: %s", self.request_id, subject, exc)
            return False
        if not self._belongs(subject, out):
            log.debug("%s: dropped %s for %r on %s", self.request_id, type(out).__name__,
                      out.request_id, subject)
            return False
        self._take(out)
        return True

    def _belongs(self, subject: str, out: TokenChunk | Final | ErrorReply) -> bool:
        if out.request_id != self.request_id:
            return False
        if isinstance(out, TokenChunk):
            return subject == self._out_subject
        return subject == self._done_subject

    def _take(self, out: TokenChunk | Final | ErrorReply) -> None:
        if isinstance(out, TokenChunk):
            if out.seq >= self._next_seq and out.seq not in self._pending:
                self._pending[out.seq] = out
                while self._next_seq in self._pending:
                    self._chunks.put_nowait(self._pending.pop(self._next_seq))
                    self._next_seq += 1
        elif not self._terminal.done():
            self._terminal.set_result(out)
        self._maybe_close()

    def _maybe_close(self) -> None:
        if not self._terminal.done() or self.closed:
            return
        term = self._terminal.result()
        expected = term.chunks if isinstance(term, Final) else 0
        if self._next_seq >= expected:
            self._chunks.put_nowait(None)
            self.close()
        elif not self._replaying:
            self._replaying = True
            self._spawn(self._replay())

    def _spawn(self, coro: Any) -> None:
        fut = asyncio.ensure_future(coro)
        self._bg.add(fut)
        fut.add_done_callback(self._bg.discard)

    async def _replay(self) -> None:
        """The Final shows chunks never seen: read them from LLM_OUT, or end without them."""
        await asyncio.sleep(0.05)  # late live chunks usually arrive by themselves
        for attempt in range(3):
            if not self._chunks_missing():
                break
            try:
                await self._replay_stored()
            except Exception as exc:
                log.debug("%s: replay from LLM_OUT failed: %s", self.request_id, exc)
                await asyncio.sleep(0.25 * (attempt + 1))
        if self._chunks_missing():  # lost for good: end the stream, the Final has the text
            log.warning("%s: chunks from seq %d were never seen and are not in LLM_OUT",
                        self.request_id, self._next_seq)
            self.gap_from = self._next_seq
            self._next_seq = 1 << 62
        self._maybe_close()

    async def _replay_stored(self, timeout_s: float = 5.0) -> None:
        """Take every chunk LLM_OUT holds for this request now (ordered consumer, one pass).
        A tenant's connection cannot read LLM_OUT: its Final carries the whole text."""
        if self.client.tenant_view:
            return
        js, stream = self.client.js, self.client.settings.streams.out.name
        try:
            last = await js.get_last_msg(stream, self._out_store)
        except NotFoundError:
            return
        sub = await js.subscribe(self._out_store, stream=stream, ordered_consumer=True,
                                 deliver_policy=DeliverPolicy.ALL)
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    msg = await sub.next_msg(timeout_s)
                    self._take_msg(self._out_subject, msg.data)
                    if msg.metadata.sequence.stream >= (last.seq or 0):
                        break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _lookup_terminal(self) -> None:
        """Take the Final/ErrorReply stored in LLM_DONE for this request, if any."""
        streams = self.client.settings.streams
        if self.client.tenant_view:  # its own subjects only, by direct get
            for name in (streams.out.name, streams.done.name):
                reply = await self.client.nc.request(
                    f"$JS.API.DIRECT.GET.{name}.{self._done_store}", b"", timeout=5)
                if not (reply.headers or {}).get("Status"):
                    self._take_msg(self._done_subject, reply.data)
                    return
            return
        for stream in (streams.out.name, streams.done.name):  # stored, then copied for days
            try:
                stored = await self.client.js.get_last_msg(stream, self._done_store)
            except NotFoundError:
                continue
            self._take_msg(self._done_subject, stored.data)
            return

    async def recover(self) -> None:
        """After a reconnect: replay missed chunks from LLM_OUT, then look up LLM_DONE.

        Retries while JetStream is not answering yet (a broker just restarted);
        the live subscription, re-established by nats-py, covers what follows.
        """
        pause = 0.1
        for attempt in range(_RECOVERY_ATTEMPTS):
            if self.closed:
                return
            try:
                await self._replay_stored()
                await self._lookup_terminal()
                return
            except Exception as exc:
                log.debug("%s: recovery attempt %d: %s", self.request_id, attempt + 1, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
        log.warning("%s: could not recover after a reconnect; waiting on live messages",
                    self.request_id)

    def progress(self) -> int:  # QuietWatch's measure: the next seq expected
        return self._next_seq

    def settled(self) -> bool:  # the terminal is in: `_replay` takes it from there
        return self._terminal.done()

    async def look_again(self) -> bool:
        """Quiet for a while: read what is stored, in case its live copy was lost;
        True when that found output not seen live."""
        had = (self._next_seq, self._terminal.done())
        try:
            if self._pending:  # a gap behind chunks already here
                await self._replay_stored()
            await self._lookup_terminal()
        except Exception as exc:  # the next check asks again
            log.debug("%s: quiet lookup failed: %s", self.request_id, exc)
        return (self._next_seq, self._terminal.done()) != had

    def _chunks_missing(self) -> bool:
        term = self._terminal.result()
        return isinstance(term, Final) and self._next_seq < term.chunks

    def close(self) -> None:
        """Stop listening (idempotent); chunks already taken can still be iterated."""
        self.closed = True
        self.client._open.discard(self)
        if self._sub is not None:
            sub, self._sub = self._sub, None
            self._spawn(sub.unsubscribe())

    # -- output ----------------------------------------------------------------
    def ready(self) -> list[TokenChunk]:
        """The chunks already received and not yet iterated, taken now without waiting
        (a writer sends them in one write); the stream's end stays for the iterator."""
        out: list[TokenChunk] = []
        q = self._chunks
        while not q.empty():
            item = q.get_nowait()
            if item is None:  # always the last item: put back for the iterator
                q.put_nowait(None)
                break
            out.append(item)
        return out

    def __aiter__(self) -> AsyncIterator[TokenChunk]:
        return self._iter(None)

    async def _iter(self, deadline: float | None) -> AsyncIterator[TokenChunk]:
        while True:
            if deadline is None:
                chunk = await self._chunks.get()
            else:
                chunk = await asyncio.wait_for(self._chunks.get(), deadline - time.monotonic())
            if chunk is None:
                term = self._terminal.result()
                if isinstance(term, ErrorReply):
                    raise RequestFailed(term)
                if self.gap_from is not None:  # never end a stream with an unreported gap
                    raise StreamGap(term, self.gap_from)
                return
            yield chunk

    async def terminal(self, timeout: float | None = None) -> Final | ErrorReply:
        """The Final or ErrorReply, whichever ends this request (TimeoutError after `timeout`)."""
        return await asyncio.wait_for(asyncio.shield(self._terminal), timeout)

    async def result(self, timeout: float | None = None) -> Final:
        """The Final; raises RequestFailed on an ErrorReply, TimeoutError after `timeout`."""
        term = await self.terminal(timeout)
        if isinstance(term, ErrorReply):
            raise RequestFailed(term)
        return term

    async def cancel(self) -> None:
        await self.client.cancel(self.request_id, self.request.tenant)


class Client:
    """Publishes requests and reads their outputs over one NATS connection.

    Built by `Client.connect`, a reconnect triggers `recover()` by itself. A
    caller that builds it on its own connection calls `await client.recover()`
    from that connection's reconnected callback.
    """

    def __init__(self, nc: NATS, settings: Settings, *,
                 default_timeout_s: float | None = DEFAULT_TIMEOUT_S,
                 tenant_view: bool = False, quiet_lookup_s: float = 5.0) -> None:
        self.nc = nc
        # A tenant's connection (its own account: docs/security.md): the server maps its
        # subjects, and it reads its stored terminals by direct get, nothing else.
        self.tenant_view = tenant_view
        self.js = nc.jetstream()
        self.settings = settings
        self.subjects: Subjects = settings.subjects
        self.default_timeout_s = default_timeout_s
        self._open: set[RequestHandle] = set()  # handles still waiting for output
        self._bg: set[asyncio.Future[None]] = set()
        self.quiet = QuietWatch(first_s=quiet_lookup_s)  # quiet requests read the store

    @classmethod
    async def connect(
        cls,
        url: str | None = None,
        settings: Settings | None = None,
        connect_timeout_s: float = 10.0,
        default_timeout_s: float | None = DEFAULT_TIMEOUT_S,
        tenant_view: bool | None = None,
    ) -> Client:
        """Connect (reconnecting forever once connected); ConnectionError if unreachable.
        `tenant_view` None: found out (a tenant's account has no JetStream of its own)."""
        settings = settings or load_settings()
        url = url or settings.nats.url
        options = connect_options(msgspec.structs.replace(settings.nats, url=url))
        made: list[Client] = []
        errors = ConnectErrors()  # the reason, should the connect time out (authorization, TLS)

        async def quiet(exc: Exception) -> None:  # nats-py would log a traceback per retry
            log.debug("nats: %s", exc)
            await errors.record(exc)

        async def reconnected() -> None:  # nats-py awaits this in its reconnect loop: no waiting
            if made:
                made[0]._on_reconnected()

        try:
            async with asyncio.timeout(connect_timeout_s):
                nc = await nats.connect(server_list(url), max_reconnect_attempts=-1,
                                        reconnect_time_wait=0.5, error_cb=quiet,
                                        reconnected_cb=reconnected, **options)
        except TimeoutError:
            raise cannot_reach(url, errors.reason) from None
        if tenant_view is None:
            tenant_view = await _is_tenant_account(nc)
        made.append(cls(nc, settings, default_timeout_s=default_timeout_s,
                        tenant_view=tenant_view))
        return made[0]

    def _on_reconnected(self) -> None:
        log.info("reconnected; recovering %d open request(s)", len(self._open))
        fut = asyncio.ensure_future(self.recover())
        self._bg.add(fut)
        fut.add_done_callback(self._bg.discard)

    async def recover(self) -> None:
        """Every open request replays missed chunks and looks up a stored terminal."""
        await asyncio.gather(*(h.recover() for h in list(self._open)))

    async def close(self) -> None:
        self.quiet.close()
        for fut in list(self._bg):
            fut.cancel()
        await self.nc.flush()
        await self.nc.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def output_group(self, request: Request) -> str:
        """The group of its output subjects: a tenant's request published by a system
        principal (the gateway, for an API key) is scoped `<tenant>.<group>`; on a
        tenant's own connection the server maps that scope away."""
        return scoped(None if self.tenant_view else request.tenant, request.group)

    def check(self, request: Request) -> None:
        """Raise RejectedAtPublish for a request the system would refuse or misroute."""
        if self.tenant_view and (request.tenant is not None or request.reply_to is not None):
            raise RejectedAtPublish("a tenant's request names no tenant and no reply_to: "
                                    "its tenant comes from its credentials")
        if request.tenant is not None and not valid_token(request.tenant):
            raise RejectedAtPublish(f"tenant {request.tenant!r} is not a subject token")
        if not valid_token(request.request_id):
            raise RejectedAtPublish(f"request_id {request.request_id!r} is not a subject token")
        if not valid_token(request.group) or request.group in RESERVED_GROUPS:
            raise RejectedAtPublish(f"group {request.group!r} is reserved or not a subject token")
        reply_to = request.reply_to
        if reply_to is not None:
            prefixes = self.settings.limits.reply_to_prefixes
            if (not reply_to.startswith(tuple(prefixes)) or self.subjects.is_own(reply_to)
                    or not all(valid_token(t) for t in reply_to.split("."))):
                raise RejectedAtPublish(
                    f"reply_to {reply_to!r} must be a plain subject under one of {list(prefixes)}"
                )

    async def submit(
        self,
        request: Request,
        *,
        priority: Priority | str | None = None,
        slo_class: str | None = None,
        timeout: float = 5.0,
        traceparent: str | None = None,
    ) -> RequestHandle:
        """Publish `request` to `llm.req.<priority>.<slo_class>`; returns once JetStream stored it.

        Raises Overloaded when the request stream is full, RejectedAtPublish
        when the request fails `check()`, is too large or names an unknown
        priority or a bad SLO class, Unavailable when no stream answered within
        `timeout` (sent again meanwhile). A duplicate request_id gets a handle on
        the first request's outputs (with its terminal, when it is already stored).
        """
        self.check(request)
        try:
            prio = Priority(priority) if priority else (request.priority or Priority.NORMAL)
        except ValueError:
            raise RejectedAtPublish(f"priority {priority!r} is not one of "
                                    f"{[p.value for p in Priority]}") from None
        slo = slo_class or request.slo_class or DEFAULT_SLO_CLASS
        if not valid_token(slo):
            raise RejectedAtPublish(f"slo_class {slo!r} is not a subject token")
        # A model that is a partition: its pool's leader alone reads it (docs/replicas.md).
        pool = pool_of(request.model, self.settings.orchestrator.partitions)
        subject = self.subjects.request(prio, slo, None if self.tenant_view else request.tenant,
                                        pool)
        data = encode(request)
        if len(data) > self.nc.max_payload:
            raise RejectedAtPublish(
                f"request is {len(data)} bytes; the server accepts at most {self.nc.max_payload}"
            )
        handle = RequestHandle(self, request)
        self._open.add(handle)
        # Subscribe first: the SUB reaches the server before the PUB on this connection.
        handle._sub = await self.nc.subscribe(
            self.subjects.outputs_of(handle.group, request.request_id), cb=handle._on_msg
        )
        try:
            # W3C trace context: the caller's, its OpenTelemetry span's, or a new trace.
            handle.traceparent = traceparent or tracing.current() or trace.new()
            headers = {trace.HEADER: handle.traceparent}
            if not self.tenant_view:
                # LLM_REQ's duplicate window is one for every tenant: a tenant's id as
                # Nats-Msg-Id could be dropped as another's. The orchestrator dedupes
                # by (tenant, id) itself (docs/security.md).
                headers["Nats-Msg-Id"] = request.request_id
            ack = await publish_request(self.js, subject, data, headers, timeout)
        except Exception as exc:
            handle.close()
            mapped = publish_error(exc, subject)
            if mapped is exc:
                raise
            raise mapped from exc
        if ack.duplicate:
            handle.duplicate = True
            await handle._lookup_terminal()
        self.quiet.add(handle)
        return handle

    async def attach(self, request_id: str, group: str = INTERACTIVE_GROUP,
                     tenant: str | None = None) -> RequestHandle:
        """A handle on a request submitted earlier (by this process or one before it).

        It listens for what comes next and at once reads what is stored: the
        chunks in LLM_OUT and the terminal in LLM_DONE. Nothing is published.
        """
        request = Request(request_id=request_id, group=group, tenant=tenant)
        self.check(request)
        handle = RequestHandle(self, request)
        self._open.add(handle)
        handle._sub = await self.nc.subscribe(
            self.subjects.outputs_of(handle.group, request_id), cb=handle._on_msg
        )
        await handle.recover()
        self.quiet.add(handle)
        return handle

    def _timeout(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.default_timeout_s

    async def stream(
        self, request: Request, *, timeout: float | None = None, **kw: object
    ) -> AsyncIterator[TokenChunk]:
        """Submit and yield the chunks, all within `timeout` (default `default_timeout_s`)."""
        handle = await self.submit(request, **kw)  # type: ignore[arg-type]
        limit = self._timeout(timeout)
        deadline = None if limit is None else time.monotonic() + limit
        try:
            async for chunk in handle._iter(deadline):
                yield chunk
        except TimeoutError:
            await self._give_up(handle)
            raise

    async def generate(
        self, request: Request, *, timeout: float | None = None, **kw: object
    ) -> Final:
        """Submit and wait for the Final, at most `timeout` s (default `default_timeout_s`)."""
        handle = await self.submit(request, **kw)  # type: ignore[arg-type]
        try:
            return await handle.result(self._timeout(timeout))
        except TimeoutError:
            await self._give_up(handle)
            raise

    async def _give_up(self, handle: RequestHandle) -> None:
        handle.close()
        with contextlib.suppress(Exception):
            await self.cancel(handle.request_id, handle.request.tenant)

    async def cancel(self, request_id: str, tenant: str | None = None) -> None:
        """Cancel a request; `tenant`: one published for that tenant (its scope only)."""
        await self.nc.publish(self.subjects.cancel(
            request_id, None if self.tenant_view else tenant), b"")
        await self.nc.flush()

    def results(self, *, durable: str | None = None, start: Start = None, group: str = "*",
                **kw: Any) -> AsyncIterator[StoredResult]:
        """Every terminal stored in LLM_DONE, live or replayed from `start`; with
        `durable`, at least once across restarts (client/results.py)."""
        return stored_results(self.js, self.settings, durable=durable, start=start,
                              group=group, **kw)


async def _is_tenant_account(nc: NATS) -> bool:
    """True on a tenant's connection: its account has no JetStream (the system's does)."""
    try:
        await nc.jetstream().account_info()
    except APIError as exc:
        return exc.code == 503 or exc.err_code == 10039  # JetStream not enabled for account
    except Exception:  # unanswered: not a tenant's account, where the server answers at once
        return False
    return False


__all__ = ["Client", "Overloaded", "RejectedAtPublish", "RequestFailed", "RequestHandle",
           "StreamGap", "Unavailable", "new_request_id"]
