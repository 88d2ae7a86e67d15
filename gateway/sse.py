"""Server-sent events framing, and an ASGI response that notices a client leaving.

Framing (what OpenAI clients parse): every event is one `data: <json>` line
and a blank line; the stream ends with `data: [DONE]`.

`Watched` runs the whole exchange (publish, wait, answer) as one task and
cancels it the moment the server reports `http.disconnect`, even while no
byte is being written (a request still queued, a slow first token): the
task's own cleanup then cancels the request in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger("cplane.gateway")
_encode = msgspec.json.Encoder().encode

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
SSE_TYPE = b"text/event-stream"


def event(obj: Any) -> bytes:
    """One SSE event carrying `obj` as JSON."""
    return b"data: " + _encode(obj) + b"\n\n"


def events(objs: Iterable[Any]) -> bytes:
    return b"".join(event(o) for o in objs)


def parse(raw: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, in order (tests and benchmarks read with it)."""
    out = []
    for block in raw.decode().split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln and not ln.startswith(":")]
        data = [ln[5:].removeprefix(" ") for ln in lines if ln.startswith("data:")]
        if data:
            out.append("\n".join(data))
    return out


class Out:
    """The HTTP side of one exchange: remembers whether the status went out."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.status: int | None = None  # set once the headers are sent

    @property
    def started(self) -> bool:
        return self.status is not None

    async def start(self, status: int, content_type: bytes,
                    headers: dict[str, str] | None = None) -> None:
        raw = [(b"content-type", content_type)]
        raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        self.status = status
        await self.send({"type": "http.response.start", "status": status, "headers": raw})

    async def body(self, data: bytes, more: bool = True) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    async def json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        await self.start(status, b"application/json", headers)
        await self.body(_encode(obj), more=False)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Watched(Response):
    """An ASGI response that runs `work(out)` and cancels it when the client goes away.

    `work` must answer through `out` (status, then body). A client that leaves
    cancels the task; `on_gone` is called once it has unwound.
    """

    def __init__(self, work: Callable[[Out], Awaitable[None]],
                 on_gone: Callable[[], None] | None = None) -> None:
        self.work = work
        self.on_gone = on_gone
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        out = Out(send)
        task = asyncio.ensure_future(self.work(out))
        watch = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            gone = not task.done()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if gone or task.cancelled():
            if self.on_gone:
                self.on_gone()
            return
        exc = task.exception()
        if isinstance(exc, OSError):  # the client left while we wrote
            if self.on_gone:
                self.on_gone()
        elif exc is not None:
            raise exc
