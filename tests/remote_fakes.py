"""A hostile OpenAI-compatible server, for the remote engine's tests.

`FakeServer` is one aiohttp app on 127.0.0.1 (a free port), started and stopped
on the test's event loop. It speaks what the remote engine asks of `vllm serve`:
`/health`, `/metrics` (Prometheus text), `/v1/models`, `/tokenize` and
`/v1/completions`, streamed as SSE with `token_ids` per chunk (vLLM's
`return_token_ids`) or, for a prefill, answered whole.

What a completion does is its mode: the prompt names one (`"mode:drop_mid_stream
..."`), else the server's `mode` (a test sets it). `good` is well-formed; every
other mode breaks one promise of the protocol (see MODES). `/health` follows
`health` ("ok", "slow", "500") and `/metrics` follows `metrics` ("vllm",
"garbage", "nan").

Deterministic: completion token i (counted from the first completion token,
resumed ones included) is 1000 + i with the text " t<i>"; the prompt's ids (from
/tokenize) are below 1000, so a continued request's prompt shows how many
tokens were resumed, and a request moved between two fakes reads as one. The
"random" bytes are seeded; time only paces chunks (`tick_s` for the endless
modes, `token_gap_s` between tokens).

What the server saw is kept for the tests: `bodies` (completion requests),
`disconnects` (request ids of streams whose client went away mid-answer) and
the event `client_gone`.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

# Every way /v1/completions can answer (streamed; a prefill, stream=false, too where
# the mode has a meaning there).
MODES = (
    "good",                 # N tokens, finish length/stop, a usage chunk, [DONE]
    "malformed_json",       # a token, then a `data:` line that is not JSON
    "not_sse",              # 200 with an HTML page
    "garbage_bytes",        # 200 with random bytes
    "never_ending_tokens",  # token chunks forever, past max_tokens, never a finish
    "too_many_tokens",      # one chunk with more token ids than max_tokens
    "empty_forever",        # `data: {"choices": []}` events forever: bytes, never progress
    "silent",               # headers, then nothing (a stall)
    "keepalive_forever",    # `: ping` comments forever, never data
    "drop_mid_stream",      # a few tokens, then the socket closes
    "error_500",            # HTTP 500 with an OpenAI error object
    "error_400",            # HTTP 400 with an OpenAI error object (invalid request)
    "error_400_too_long",   # HTTP 400, vLLM's "maximum context length" message
    "error_503_stall",      # HTTP 503 headers, then a body that never comes
    "error_mid_stream",     # a few tokens, then an `{"error": ...}` event
    "no_done",              # finish and usage, then EOF without [DONE]
    "wrong_finish",         # finish_reason "banana"
    "after_finish",         # a token chunk after the finish
    "token_ids_missing",    # chunks without token_ids
    "token_ids_bool",       # token_ids [true]: an int to isinstance, not to a reader
    "choices_not_list",     # "choices": {"0": ...}
    "bad_usage",            # good, but usage {"prompt_tokens": "many"}: counts are not trusted
    "huge_line",            # one 2 MB `data:` line
)
FIRST_TOKEN = 1000
HUGE_LINE_BYTES = 2 << 20


def token_text(token: int) -> str:
    return f" t{token - FIRST_TOKEN}"


def tokenize(text: str) -> list[int]:
    """The fake's tokenizer: one id per word, below FIRST_TOKEN."""
    return [1 + sum(w.encode()) % (FIRST_TOKEN - 1) for w in text.split()] or [1]


@dataclass
class Seen:
    """What the server saw of one completion request."""

    body: dict[str, Any]
    mode: str
    done: bool = False  # the handler returned (the answer went out, or the client left)


@dataclass(eq=False)
class FakeServer:
    """An OpenAI-compatible server that misbehaves on request (see the module docstring)."""

    mode: str = "good"
    model: str = "fake"
    health: str = "ok"  # ok | slow | 500
    metrics: str = "vllm"  # vllm | garbage | nan
    tokens: int | None = None  # good: stop after this many (finish "stop"); None: max_tokens
    drop_after: int = 3  # drop_mid_stream / error_mid_stream: tokens sent first
    tick_s: float = 0.005  # between chunks of the endless modes
    token_gap_s: float = 0.0  # between token chunks of every mode (decode time)
    slow_s: float = 5.0  # health "slow": how long /health takes
    port: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    client_gone: asyncio.Event = field(default_factory=asyncio.Event)
    health_calls: int = 0
    _runner: web.AppRunner | None = None
    _closing: asyncio.Event = field(default_factory=asyncio.Event)
    _next_id: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeServer:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/v1/completions", self._completions)
        # handler_cancellation: a client that goes away cancels its handler, so a stream
        # that sends nothing (silent) still sees it leave.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0,
                                     access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def stop(self) -> None:
        """Close the port; endless answers end (not counted as disconnects)."""
        self._closing.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> FakeServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- probes --------------------------------------------------------------------------
    async def _health(self, _request: web.Request) -> web.StreamResponse:
        self.health_calls += 1
        if self.health == "500":
            return web.json_response({"error": {"message": "engine dead"}}, status=500)
        if self.health == "slow":
            await self._wait_closing(self.slow_s)
        return web.Response(text="")

    async def _metrics(self, _request: web.Request) -> web.StreamResponse:
        if self.metrics == "garbage":
            return web.Response(text="<html>not { prometheus } at all\x00\n", status=200)
        m = f'{{model_name="{self.model}"}}'
        nan = self.metrics == "nan"
        text = (
            "# HELP vllm:num_requests_running Requests running.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{m} {'+Inf' if nan else 2}\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{m} 1\n"
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f"vllm:kv_cache_usage_perc{m} {'NaN' if nan else 0.25}\n"
            "# TYPE vllm:prefix_cache_queries_total counter\n"
            f"vllm:prefix_cache_queries_total{m} {100 * self.health_calls}\n"
            "# TYPE vllm:prefix_cache_hits_total counter\n"
            f"vllm:prefix_cache_hits_total{m} {40 * self.health_calls}\n")
        return web.Response(text=text, content_type="text/plain")

    async def _models(self, _request: web.Request) -> web.StreamResponse:
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "owned_by": "fake"}]})

    async def _tokenize(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if "messages" in body:
            text = " ".join(str(m.get("content", "")) for m in body["messages"])
        else:
            text = str(body.get("prompt", ""))
        ids = tokenize(text)
        return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": 4096})

    # -- completions -----------------------------------------------------------------------
    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        prompt = body.get("prompt")
        mode = self.mode
        if isinstance(prompt, str) and prompt.startswith("mode:"):
            mode = prompt.split()[0][len("mode:"):]
        seen = Seen(body, mode)
        self.seen.append(seen)
        self._next_id += 1
        rid = f"cmpl-{self._next_id}"
        try:
            if mode in _ERRORS:
                status, err = _ERRORS[mode]
                return web.json_response(err, status=status)
            if body.get("stream"):
                return await self._stream(request, body, mode, rid)
            return await self._whole(request, body, mode, rid)
        except asyncio.CancelledError:
            self._gone(rid)
            raise
        except ConnectionResetError:  # a write after the client left (aiohttp answers nothing)
            self._gone(rid)
            return web.Response()
        finally:
            seen.done = True

    def _gone(self, rid: str) -> None:
        if not self._closing.is_set():  # the client went away, not our own shutdown
            self.disconnects.append(rid)
            self.client_gone.set()

    async def _whole(self, request: web.Request, body: dict[str, Any], mode: str, rid: str
                     ) -> web.StreamResponse:
        """A non-streaming completion (a prefill)."""
        prompt_ids, resumed = _prompt_ids(body.get("prompt"))
        if mode == "silent":
            await self._closing.wait()
        if mode in ("not_sse", "malformed_json"):
            return web.Response(text="<html>oops</html>", content_type="text/html")
        if mode in ("never_ending_tokens", "keepalive_forever"):  # a body that never ends
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            await resp.write(b'{"choices": [')
            while not self._closing.is_set():
                await resp.write(b" ")
                await self._wait_closing(self.tick_s)
            return resp
        n = int(body.get("max_tokens", 1))
        ids = [FIRST_TOKEN + resumed + i for i in range(n)]
        if mode == "too_many_tokens":
            ids += [FIRST_TOKEN + resumed + n]
        return web.json_response({
            "id": rid, "object": "text_completion", "model": self.model,
            "choices": [{"index": 0, "text": "".join(token_text(t) for t in ids),
                         "token_ids": ids, "finish_reason": "length"}],
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(ids),
                      "total_tokens": len(prompt_ids) + len(ids)},
            "kv_transfer_params": {"remote_engine_id": "fake", "remote_request_id": rid},
        })

    async def _stream(self, request: web.Request, body: dict[str, Any], mode: str, rid: str
                      ) -> web.StreamResponse:
        content_type = {"not_sse": "text/html", "garbage_bytes": "application/octet-stream"}
        resp = web.StreamResponse(status=503 if mode == "error_503_stall" else 200, headers={
            "Content-Type": content_type.get(mode, "text/event-stream"),
            "Cache-Control": "no-cache"})
        await resp.prepare(request)
        send = _Sender(resp, rid, self.model, body, self.token_gap_s)
        if mode in ("silent", "error_503_stall"):
            await self._closing.wait()
        elif mode in _ENDLESS:
            while not self._closing.is_set():
                await _ENDLESS[mode](send)
                await self._wait_closing(self.tick_s)
        elif mode in _BROKEN:
            first, tail = _BROKEN[mode]
            await send.tokens(self.drop_after if first is None else first)
            if tail is None:  # drop_mid_stream: the socket closes under the stream
                assert request.transport is not None
                request.transport.close()
                return resp
            await resp.write(tail)
        else:
            await self._good(send, mode)
        await resp.write_eof()
        return resp

    async def _good(self, send: _Sender, mode: str) -> None:
        """good and its near misses (one promise broken at the end)."""
        want = send.max_tokens if self.tokens is None else min(self.tokens, send.max_tokens)
        if mode == "too_many_tokens":  # all of them, and one more, in one chunk
            await send.tokens(send.max_tokens + 1, finish="length", per_chunk=send.max_tokens + 1)
        else:
            await send.tokens(want - 1, ids=mode != "token_ids_missing")
            finish = "length" if want == send.max_tokens else "stop"
            await send.tokens(1, finish="banana" if mode == "wrong_finish" else finish,
                              ids=mode != "token_ids_missing")
        if mode == "after_finish":
            await send.tokens(1)
        await send.usage(bad=mode == "bad_usage")
        if mode != "no_done":
            await send.done()

    async def _wait_closing(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except TimeoutError:
            pass


class _Sender:
    """Writes the SSE events of one streamed completion."""

    def __init__(self, resp: web.StreamResponse, rid: str, model: str,
                 body: dict[str, Any], gap_s: float = 0.0) -> None:
        self.resp = resp
        self.gap_s = gap_s
        self.rid = rid
        self.model = model
        self.prompt_ids, self.resumed = _prompt_ids(body.get("prompt"))
        self.max_tokens = int(body.get("max_tokens", 16))
        self.sent = 0
        self.first = True

    async def data(self, obj: dict[str, Any]) -> None:
        await self.resp.write(_event(obj))

    async def tokens(self, n: int, finish: str | None = None, ids: bool = True,
                     per_chunk: int = 1) -> None:
        """`n` tokens, `per_chunk` a chunk (`finish` on the last), or one empty
        finishing chunk when n == 0 and `finish` is set."""
        chunks = [list(range(i, min(i + per_chunk, n))) for i in range(0, n, per_chunk)]
        for i, part in enumerate(chunks or ([[]] if finish else [])):
            token = [FIRST_TOKEN + self.resumed + self.sent + k for k in range(len(part))]
            choice: dict[str, Any] = {
                "index": 0, "text": "".join(token_text(t) for t in token), "logprobs": None,
                "finish_reason": finish if i == max(len(chunks), 1) - 1 else None}
            if ids:
                choice["token_ids"] = token
            if self.first and ids:
                choice["prompt_token_ids"] = self.prompt_ids
            if self.gap_s and not self.first:
                await asyncio.sleep(self.gap_s)  # decode time: the thing simulated
            self.first = False
            self.sent += len(token)
            await self.data({"id": self.rid, "object": "text_completion", "created": 0,
                             "model": self.model, "choices": [choice]})

    async def usage(self, bad: bool = False) -> None:
        p = len(self.prompt_ids)
        await self.data({"id": self.rid, "object": "text_completion", "created": 0,
                         "model": self.model, "choices": [], "usage": {
                             "prompt_tokens": "many" if bad else p,
                             "completion_tokens": self.sent, "total_tokens": p + self.sent,
                             "prompt_tokens_details": {"cached_tokens": -3 if bad else 0}}})

    async def done(self) -> None:
        await self.resp.write(b"data: [DONE]\n\n")


def _prompt_ids(prompt: Any) -> tuple[list[int], int]:
    """(the prompt's ids, how many of its last ids are resumed completion tokens)."""
    if isinstance(prompt, list):
        ids = [int(t) for t in prompt]
        resumed = 0
        while resumed < len(ids) and ids[-1 - resumed] >= FIRST_TOKEN:
            resumed += 1
        return ids[:len(ids) - resumed], resumed
    return tokenize(str(prompt or "")), 0


def _event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


# Endless modes: what goes out every tick_s until the client leaves.
_ENDLESS: dict[str, Callable[[_Sender], Awaitable[None]]] = {
    "keepalive_forever": lambda send: send.resp.write(b": ping\n\n"),
    "empty_forever": lambda send: send.data({"id": send.rid, "choices": []}),
    "never_ending_tokens": lambda send: send.tokens(1),
}
# Broken modes: (tokens sent first, None = drop_after; then these bytes and EOF, or
# None: the socket closes).
_BROKEN: dict[str, tuple[int | None, bytes | None]] = {
    "not_sse": (0, b"<html><body><h1>502 Bad Gateway</h1></body></html>\n"),
    "garbage_bytes": (0, random.Random(7).randbytes(4096)),
    "choices_not_list": (0, _event({"choices": {"0": {"text": " t0", "token_ids": [1000]}}})),
    "token_ids_bool": (0, _event({"choices": [{"index": 0, "text": " t0", "token_ids": [True],
                                               "finish_reason": None}]})),
    "malformed_json": (1, b'data: {"choices": [{"text": "oops", \n\n'),
    "huge_line": (1, b'data: {"pad": "' + b"x" * HUGE_LINE_BYTES + b'"}\n\n'),
    "error_mid_stream": (None, _event({"error": {"message": "CUDA error: out of memory",
                                                 "type": "InternalServerError", "code": 500}})),
    "drop_mid_stream": (None, None),
}
_ERRORS: dict[str, tuple[int, dict[str, Any]]] = {
    "error_500": (500, {"error": {"message": "Internal Server Error: engine crashed",
                                  "type": "InternalServerError", "code": 500}}),
    "error_400": (400, {"error": {"message": "temperature must be non-negative",
                                  "type": "BadRequestError", "param": "temperature",
                                  "code": 400}}),
    # vLLM's own shape (top level, "object": "error") and its context-length message.
    "error_400_too_long": (400, {
        "object": "error", "type": "BadRequestError", "param": None, "code": 400,
        "message": "This model's maximum context length is 4096 tokens. However, you "
                   "requested 5000 tokens (4990 in the messages, 10 in the completion)."}),
}


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


__all__ = ["FIRST_TOKEN", "MODES", "FakeServer", "Seen", "free_port", "token_text", "tokenize"]
