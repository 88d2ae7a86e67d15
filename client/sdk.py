"""Python client: publish a Request, read its tokens and its Final.

    async with await Client.connect("nats://127.0.0.1:4222") as client:
        final = await client.generate(Request(request_id=new_request_id(), prompt="Hi"))
        async for chunk in client.stream(Request(request_id=new_request_id(), prompt="Hi")):
            print(chunk.text, end="")

The client subscribes to the request's output subjects before publishing,
delivers chunks in `seq` order without repeats, and, when the Final shows
chunks it never saw (a reconnect, a duplicate publish), replays them from
the LLM_OUT stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from types import TracebackType

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import MaxPayloadError, NoRespondersError
from nats.js.api import DeliverPolicy
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from schemas.codec import encode, final_decoder, output_decoder
from schemas.messages import ErrorReply, Final, Priority, Request, TokenChunk
from schemas.settings import Settings, load_settings
from schemas.subjects import DEFAULT_SLO_CLASS, Subjects

log = logging.getLogger("cplane.client")
_STREAM_FULL_CODES = {10077, 10078, 10047}  # max msgs / max bytes / storage resources


class RequestFailed(Exception):
    """The request ended with an ErrorReply."""

    def __init__(self, error: ErrorReply) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error


class Overloaded(Exception):
    """The request stream refused the publish (full): try again later."""


class RejectedAtPublish(ValueError):
    """The request could not be published as given (too large, unknown priority...)."""


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestHandle:
    """One submitted request: iterate it for chunks, await `result()` for its Final."""

    def __init__(self, client: Client, request: Request) -> None:
        self.client = client
        self.request = request
        self.request_id = request.request_id
        self.duplicate = False  # the server had this request_id already
        self._next_seq = 0
        self._pending: dict[int, TokenChunk] = {}
        self._chunks: asyncio.Queue[TokenChunk | None] = asyncio.Queue()
        self._terminal: asyncio.Future[Final | ErrorReply] = (
            asyncio.get_running_loop().create_future()
        )
        self._sub: Subscription | None = None
        self._replaying = False
        self._bg: asyncio.Future[None] | None = None  # keeps a background step referenced

    # -- input -----------------------------------------------------------------
    async def _on_msg(self, msg: Msg) -> None:
        try:
            out = output_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        self._take(out)

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
        if not self._terminal.done():
            return
        term = self._terminal.result()
        expected = term.chunks if isinstance(term, Final) else 0
        if self._next_seq >= expected:
            self._chunks.put_nowait(None)
            self._unsubscribe()
        elif not self._replaying:
            self._replaying = True
            self._bg = asyncio.ensure_future(self._replay())

    async def _replay(self) -> None:
        """Fetch chunks missed on the live subscription from LLM_OUT (or give up after 2 s)."""
        await asyncio.sleep(0.05)  # late live chunks usually arrive by themselves
        subject = self.client.subjects.out(self.request.group, self.request_id)
        if self._chunks_missing():
            with contextlib.suppress(Exception):
                sub = await self.client.js.subscribe(
                    subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
                )
                try:
                    async with asyncio.timeout(2.0):
                        while self._chunks_missing():
                            self._take(output_decoder.decode((await sub.next_msg(2.0)).data))
                finally:
                    await sub.unsubscribe()
        if self._chunks_missing():  # lost for good: end the stream, the Final has the text
            self._next_seq = 1 << 62
        self._maybe_close()

    def _chunks_missing(self) -> bool:
        term = self._terminal.result()
        return isinstance(term, Final) and self._next_seq < term.chunks

    def _unsubscribe(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            self._bg = asyncio.ensure_future(sub.unsubscribe())

    # -- output ----------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[TokenChunk]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[TokenChunk]:
        while True:
            chunk = await self._chunks.get()
            if chunk is None:
                term = self._terminal.result()
                if isinstance(term, ErrorReply):
                    raise RequestFailed(term)
                return
            yield chunk

    async def terminal(self, timeout: float | None = None) -> Final | ErrorReply:
        """The Final or ErrorReply, whichever ends this request."""
        return await asyncio.wait_for(asyncio.shield(self._terminal), timeout)

    async def result(self, timeout: float | None = None) -> Final:
        """The Final; raises RequestFailed on an ErrorReply."""
        term = await self.terminal(timeout)
        if isinstance(term, ErrorReply):
            raise RequestFailed(term)
        return term

    async def cancel(self) -> None:
        await self.client.cancel(self.request_id)


class Client:
    def __init__(self, nc: NATS, settings: Settings) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.settings = settings
        self.subjects: Subjects = settings.subjects

    @classmethod
    async def connect(
        cls,
        url: str | None = None,
        settings: Settings | None = None,
        connect_timeout_s: float = 10.0,
    ) -> Client:
        """Connect (reconnecting forever once connected); ConnectionError if unreachable."""
        settings = settings or load_settings()
        url = url or settings.nats.url
        async def quiet(exc: Exception) -> None:  # nats-py would log a traceback per retry
            log.debug("nats: %s", exc)

        try:
            async with asyncio.timeout(connect_timeout_s):
                nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                                        error_cb=quiet)
        except TimeoutError:
            raise ConnectionError(f"cannot reach NATS at {url}") from None
        return cls(nc, settings)

    async def close(self) -> None:
        await self.nc.flush()
        await self.nc.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def submit(
        self,
        request: Request,
        *,
        priority: Priority | str | None = None,
        slo_class: str | None = None,
        timeout: float = 5.0,
    ) -> RequestHandle:
        """Publish `request` to `llm.req.<priority>.<slo_class>`; returns once JetStream stored it.

        Raises Overloaded when the request stream is full, RejectedAtPublish
        when the message is too large or its subject matches no stream.
        """
        prio = Priority(priority) if priority else (request.priority or Priority.NORMAL)
        slo = slo_class or request.slo_class or DEFAULT_SLO_CLASS
        subject = self.subjects.request(prio, slo)
        data = encode(request)
        if len(data) > self.nc.max_payload:
            raise RejectedAtPublish(
                f"request is {len(data)} bytes; the server accepts at most {self.nc.max_payload}"
            )
        handle = RequestHandle(self, request)
        # Subscribe first: the SUB reaches the server before the PUB on this connection.
        handle._sub = await self.nc.subscribe(
            self.subjects.outputs_of(request.group, request.request_id), cb=handle._on_msg
        )
        try:
            ack = await self.js.publish(
                subject, data, timeout=timeout, headers={"Nats-Msg-Id": request.request_id}
            )
        except Exception as exc:
            handle._unsubscribe()
            mapped = _publish_error(exc, subject)
            if mapped is exc:
                raise
            raise mapped from exc
        if ack.duplicate:
            handle.duplicate = True
            await self._load_stored_terminal(handle)
        return handle

    async def _load_stored_terminal(self, handle: RequestHandle) -> None:
        """A duplicate publish: the first one may have finished already."""
        subject = self.subjects.done(handle.request.group, handle.request_id)
        try:
            stored = await self.js.get_last_msg(self.settings.streams.done.name, subject)
        except NotFoundError:
            return
        if stored.data:
            handle._take(final_decoder.decode(stored.data))

    async def stream(self, request: Request, **kw: object) -> AsyncIterator[TokenChunk]:
        handle = await self.submit(request, **kw)  # type: ignore[arg-type]
        async for chunk in handle:
            yield chunk

    async def generate(
        self, request: Request, *, timeout: float | None = None, **kw: object
    ) -> Final:
        handle = await self.submit(request, **kw)  # type: ignore[arg-type]
        return await handle.result(timeout)

    async def cancel(self, request_id: str) -> None:
        await self.nc.publish(self.subjects.cancel(request_id), b"")
        await self.nc.flush()


def _publish_error(exc: Exception, subject: str) -> Exception:
    if isinstance(exc, APIError) and exc.err_code in _STREAM_FULL_CODES:
        return Overloaded(f"request stream is full ({exc.description}); retry later")
    if isinstance(exc, NoRespondersError | NoStreamResponseError):
        return RejectedAtPublish(
            f"no stream accepts {subject!r}: priority must be one of "
            f"{[p.value for p in Priority]} and the subject llm.req.<priority>.<slo_class>"
        )
    if isinstance(exc, MaxPayloadError):
        return RejectedAtPublish("request exceeds the server's max_payload")
    return exc
