"""The remote engine: an OpenAI-compatible server (`vllm serve`, SGLang...) by address.

Work items go to the server's `/v1/completions` as streams. With `api="vllm"`
prompts travel as token ids and come back with them (`return_token_ids`), so
a request that moves (a worker's death, a prefill's hand-off) continues on
another instance from the stored tokens exactly as on an in-process engine:
the ids are made by a local tokenizer when one is configured (the same
`hf_prompt_ids` the orchestrator hashes with), else by the server's
`/tokenize`, and only when needed (a text prompt that starts fresh is sent as
text; its ids come back in the first chunk). `api="openai"` speaks text to any
server: a request that must continue mid-way cannot, and ends with a clear
engine_error.

PD: a prefill item is one non-streaming completion of one token with
`kv_transfer_params: {"do_remote_decode": true}` (vLLM's disaggregated-serving
protocol); the decode item sends back what it answered.

Cancel closes the stream; vLLM aborts a request whose client went away. The
server's `/health` and `/metrics` are probed every `probe_s`: load for
heartbeats, and `problem()` (why the server cannot serve now) for the
instance's health. Faults (down, slow, 5xx, a broken or lying stream) raise
ServerFault, retried elsewhere by the worker; a request the server refuses as
invalid (HTTP 400) raises EngineInputError.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from cplane.schemas.blocks import hf_prompt_ids, load_tokenizer
from cplane.schemas.messages import ErrorCode, FinishReason
from cplane.workers.engines.base import (
    CONNECTOR_KEY,
    Delta,
    EngineInputError,
    EngineRequest,
    EngineStats,
    KvDelta,
)
from cplane.workers.engines.detok import resume_echo
from cplane.workers.engines.kv_zmq import KvTranslator, ZmqKvEvents
from cplane.workers.engines.remote.server import ServerClient, ServerFault, ServerRefused
from cplane.workers.engines.remote.server_stats import ServerLoad, parse

log = logging.getLogger("cplane.remote")

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH,
           "abort": FinishReason.ABORT}
INLINE_TOKENIZE_CHARS = 8192


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteSettings:
    url: str
    model_name: str
    api: str = "vllm"  # "vllm" (token ids) | "openai" (text only)
    tokenizer: str = ""  # local tokenizer matching the server's; "" = /tokenize
    api_key: str = ""
    kv_events: str = ""  # the server's ZMQ KV-event endpoint, e.g. tcp://host:5557
    pool: int = 64  # connections kept for this server (the requests held here)
    connect_timeout_s: float = 3.0
    # No byte from the server for this long mid-request (prefill included): a fault.
    stall_timeout_s: float = 120.0
    probe_s: float = 1.0  # /health and /metrics
    probe_timeout_s: float = 2.0
    start_timeout_s: float = 60.0  # wait this long for /health at start
    load_window_s: float = 10.0


class RemoteEngine:
    """Engine protocol over one OpenAI-compatible server."""

    name = "openai"

    def __init__(self, settings: RemoteSettings) -> None:
        if settings.api not in ("vllm", "openai"):
            raise ValueError(f"api must be vllm or openai, not {settings.api!r}")
        self.settings = settings
        self.models = [settings.model_name]
        self.client = ServerClient(settings.url, api_key=settings.api_key, pool=settings.pool,
                                   connect_timeout_s=settings.connect_timeout_s,
                                   stall_timeout_s=settings.stall_timeout_s,
                                   probe_timeout_s=settings.probe_timeout_s)
        self._tokenizer: Any = None
        self._load = ServerLoad(settings.load_window_s)
        self._problem: str | None = "not started"
        self._probe_task: asyncio.Task[None] | None = None
        # request_id -> [cancelled, the open response]
        self._active: dict[str, list[Any]] = {}
        self._kv = KvTranslator()
        self._kv_reader: ZmqKvEvents | None = None
        self.block_tokens = 16  # from the server's events once they come

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Wait for the server to be healthy and to serve the model; start probing."""
        s = self.settings
        await self.client.open()
        if s.tokenizer and self._tokenizer is None:  # start() is retried until it succeeds
            self._tokenizer = await asyncio.to_thread(load_tokenizer, s.tokenizer)
        deadline = time.monotonic() + s.start_timeout_s
        while (why := await self.client.health()) is not None:
            if time.monotonic() > deadline:
                await self.client.close()
                raise ServerFault(f"{s.url} not healthy after {s.start_timeout_s:.0f} s: {why}")
            await asyncio.sleep(min(s.probe_s, 1.0))
        served = await self._served_models()
        if served is not None and s.model_name not in served:
            await self.client.close()
            raise ValueError(f"{s.url} serves {', '.join(served) or 'no model'}, "
                             f"not {s.model_name!r}")
        self._problem = None
        await self._probe()
        self._probe_task = asyncio.create_task(self._probe_loop(), name=f"probe-{s.url}")
        if s.kv_events:
            self._kv_reader = ZmqKvEvents(s.kv_events, self._kv)
            self._kv_reader.start()

    async def _served_models(self) -> list[str] | None:
        try:
            listing = await self.client.get_json("/v1/models")
            return [str(m.get("id")) for m in listing.get("data", []) if isinstance(m, dict)]
        except (ServerFault, AttributeError, TypeError):
            return None  # not every server lists its models: requests will tell

    async def shutdown(self) -> None:
        task, self._probe_task = self._probe_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        reader, self._kv_reader = self._kv_reader, None
        if reader is not None:
            await reader.stop()
        for rid in list(self._active):
            await self.abort(rid)
        await self.client.close()

    # -- health and load -------------------------------------------------------------
    def problem(self) -> str | None:
        """Why the server cannot serve now (its last probe), None when it can."""
        return self._problem

    async def _probe(self) -> None:
        self._problem = await self.client.health()
        if self._problem is not None:
            return
        with contextlib.suppress(ServerFault):
            text = await self.client.get_text("/metrics")
            scrape = parse(text, time.monotonic(), self.settings.model_name)
            self._load.add(scrape)
            if scrape.block_size > 0:  # what its KV events hash over (precise routing)
                self.block_tokens = scrape.block_size

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.probe_s)
            try:
                await self._probe()
            except Exception as exc:  # never let the probe die
                self._problem = f"probe failed: {exc}"

    def stats(self) -> EngineStats:
        return self._load.stats(held=len(self._active))

    def pool_stats(self) -> tuple[int, int]:
        """(connections opened, requests sent) to the server since start."""
        return self.client.opened, self.client.sent

    def kv_events(self) -> KvDelta | None:
        return self._kv.drain()

    def kv_blocks(self) -> list[int]:
        return self._kv.blocks()

    # -- requests --------------------------------------------------------------------
    async def abort(self, request_id: str) -> None:
        """Close the request's stream (the server aborts it); generate() ends CANCELLED."""
        entry = self._active.get(request_id)
        if entry is None:
            return
        entry[0] = True
        if entry[1] is not None:
            entry[1].close()

    async def generate(self, req: EngineRequest) -> AsyncIterator[Delta]:
        rid = req.request_id
        if rid in self._active:
            raise EngineInputError(f"request {rid} is already running")
        if self._problem is not None:
            raise ServerFault(f"{self.settings.url}: {self._problem}")
        entry: list[Any] = [False, None]
        self._active[rid] = entry
        try:
            async for delta in self._generate(req, entry):
                yield delta
        finally:
            self._active.pop(rid, None)

    async def _generate(self, req: EngineRequest, entry: list[Any]) -> AsyncIterator[Delta]:
        prompt, prompt_ids = await self._prompt(req)
        resumed = list(req.resume_token_ids)
        max_tokens = 1 if req.prefill_only else req.max_tokens - len(resumed)
        if max_tokens <= 0 or entry[0]:
            yield Delta(token_ids=[], prompt_tokens=len(prompt_ids or ()), cached_prompt_tokens=0,
                        finish_reason=FinishReason.CANCELLED if entry[0] else FinishReason.LENGTH)
            return
        body = self._body(req, prompt, max_tokens)
        try:
            if req.prefill_only:
                yield await self._prefill(req, body, prompt_ids)
                return
            echo = (resume_echo(self._tokenizer, [*prompt_ids, *resumed], len(prompt_ids))
                    if resumed and prompt_ids and self._tokenizer is not None else None)
            async for delta in self._stream(req, body, entry, max_tokens, prompt_ids):
                if echo is not None and delta.text:
                    delta.text, echo = delta.text.removeprefix(echo), None
                yield delta
        except ServerRefused as exc:
            code = (ErrorCode.PROMPT_TOO_LONG if "maximum" in str(exc) and "length" in str(exc)
                    else ErrorCode.INVALID_REQUEST)
            raise EngineInputError(f"{self.settings.url} refused it: {exc}", code=code) from exc

    async def _prompt(self, req: EngineRequest) -> tuple[Any, list[int] | None]:
        """(the `prompt` field to send, the prompt's ids when known)."""
        given = [x is not None for x in (req.prompt, req.prompt_token_ids, req.messages)]
        if sum(given) != 1:
            raise EngineInputError("give exactly one of prompt, prompt_token_ids, messages")
        if req.messages is not None and not req.messages:
            raise EngineInputError("messages is empty")
        needs_ids = bool(req.resume_token_ids) or req.messages is not None
        if req.prompt_token_ids is not None:
            ids = list(req.prompt_token_ids)
        elif self._tokenizer is not None:
            ids = await self._local_ids(req)
        elif self.settings.api == "vllm" and needs_ids:
            ids = await self._server_ids(req)
        elif needs_ids:
            raise EngineInputError(
                f"{self.settings.url} (api openai) gives no token ids: a chat prompt or a "
                "request continued mid-way cannot run there", code=ErrorCode.ENGINE_ERROR)
        else:
            return req.prompt, None
        if not ids:
            raise EngineInputError("empty prompt")
        if 0 < req.max_prompt_tokens < len(ids):
            raise EngineInputError(f"prompt has {len(ids)} tokens, more than "
                                   f"{req.max_prompt_tokens}", code=ErrorCode.PROMPT_TOO_LONG)
        return [*ids, *req.resume_token_ids], ids

    async def _local_ids(self, req: EngineRequest) -> list[int]:
        chars = len(req.prompt or "") + sum(len(m.content) for m in req.messages or [])
        try:
            if chars <= INLINE_TOKENIZE_CHARS:
                return hf_prompt_ids(self._tokenizer, req.prompt, req.messages)
            return await asyncio.to_thread(hf_prompt_ids, self._tokenizer, req.prompt,
                                           req.messages)
        except ValueError as exc:
            raise EngineInputError(str(exc)) from exc

    async def _server_ids(self, req: EngineRequest) -> list[int]:
        body: dict[str, Any] = {"model": self.settings.model_name}
        if req.messages is not None:
            body["messages"] = [{"role": m.role, "content": m.content} for m in req.messages]
            body["add_generation_prompt"] = True
        else:
            body["prompt"] = req.prompt
        try:
            answer = await self.client.post("/tokenize", body)
        except ServerRefused as exc:
            raise EngineInputError(f"{self.settings.url} refused it: {exc}") from exc
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise ServerFault(f"{self.settings.url}/tokenize answered no token list")
        return tokens

    def _body(self, req: EngineRequest, prompt: Any, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.settings.model_name, "prompt": prompt,
                                "max_tokens": max_tokens, "temperature": req.temperature,
                                "top_p": req.top_p}
        if req.stop:
            body["stop"] = list(req.stop)
        if req.seed is not None:
            body["seed"] = req.seed
        if self.settings.api == "vllm":
            body["return_token_ids"] = True
            if req.top_k > 0:
                body["top_k"] = req.top_k
            if req.ignore_eos:
                body["ignore_eos"] = True
            if req.prefill_only:
                body["kv_transfer_params"] = {"do_remote_decode": True}
            elif req.kv_transfer_params and "do_remote_prefill" in req.kv_transfer_params:
                body["kv_transfer_params"] = dict(req.kv_transfer_params)
        return body

    async def _prefill(self, req: EngineRequest, body: dict[str, Any],
                       prompt_ids: list[int] | None) -> Delta:
        answer = await self.client.post("/v1/completions", body)
        try:
            choice = answer["choices"][0]
            ids = [int(t) for t in choice.get("token_ids") or []]
            reason = choice.get("finish_reason") or "length"
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise ServerFault(f"{self.settings.url}: malformed completion") from exc
        if len(ids) > 1:
            raise ServerFault(f"{self.settings.url}: {len(ids)} tokens for a 1-token prefill")
        if reason not in (*_FINISH, "repetition"):
            raise ServerFault(f"{self.settings.url}: finish_reason {str(reason)[:40]!r}")
        # Checked as the stream's are (a bad usage or kv_transfer_params raised
        # AttributeError / ValueError here, not ServerFault).
        usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
        kv = answer.get("kv_transfer_params")
        if kv is not None and not isinstance(kv, dict):
            raise ServerFault(f"{self.settings.url}: malformed kv_transfer_params")
        told = usage.get("prompt_tokens")
        prompt_tokens = (told if type(told) is int and told > 0 else None) or len(prompt_ids or ())
        return Delta(token_ids=ids, text=str(choice.get("text") or ""),
                     finish_reason=_FINISH.get(reason, FinishReason.STOP),
                     prompt_tokens=prompt_tokens,
                     cached_prompt_tokens=min(_cached(usage), prompt_tokens),
                     kv_transfer_params=kv or {CONNECTOR_KEY: "remote"})

    async def _stream(self, req: EngineRequest, body: dict[str, Any], entry: list[Any],
                      max_tokens: int, prompt_ids: list[int] | None) -> AsyncIterator[Delta]:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        url = self.settings.url
        read = _StreamRead(url, req.request_id, max_tokens, self.settings.api == "vllm",
                           len(prompt_ids) if prompt_ids is not None else None)
        watch: _Watchdog | None = None
        try:
            async with self.client.stream("/v1/completions", body) as (resp, chunks):
                entry[1] = resp
                if entry[0]:
                    resp.close()
                watch = _Watchdog(resp, self.settings.stall_timeout_s)
                async for batch in chunks:
                    delta = read.take(batch)
                    if delta is not None:
                        watch.hold()
                        yield delta
                    read.check()
                    if delta is not None or read.final is not None:
                        watch.progress()
        except ServerFault as exc:
            if not entry[0]:
                if watch is not None and watch.fired:  # the watchdog closed it
                    raise ServerFault(f"{url}: no output for {req.request_id} in "
                                      f"{self.settings.stall_timeout_s:g} s") from exc
                raise
            read.final = None  # our own close: the request was cancelled
        finally:
            entry[1] = None
            if watch is not None:
                watch.cancel()
        yield _last(read.final, entry[0], read.usage, read.prompt_len, prompt_ids,
                    f"{url}: {req.request_id}")


class _StreamRead:
    """One streamed completion, checked as it arrives: what each read of the socket
    brought becomes one delta (a worker that fell behind catches up in one step, not
    one per token); the finish is kept until the stream proves whole."""

    __slots__ = ("fault", "final", "got", "max_tokens", "prompt_len", "rid", "url", "usage",
                 "with_ids")

    def __init__(self, url: str, rid: str, max_tokens: int, with_ids: bool,
                 prompt_len: int | None) -> None:
        self.url, self.rid, self.max_tokens, self.with_ids = url, rid, max_tokens, with_ids
        self.prompt_len = prompt_len
        self.got = 0
        self.final: Delta | None = None
        self.fault: ServerFault | None = None
        self.usage: dict[str, Any] = {}

    def take(self, batch: list[dict[str, Any]]) -> Delta | None:
        """The output of `batch` before any finish (None: nothing). A fault met after
        good output in the same batch is raised by the next `check()`: what came
        before it is delivered first, as if the reads had been one token each."""
        ids: list[int] = []
        text: list[str] = []
        try:
            for chunk in batch:
                self._one(chunk, ids, text)
        except ServerFault as exc:
            if not ids and not any(text):
                raise
            self.fault = exc
        return Delta(token_ids=ids, text="".join(text)) if ids or any(text) else None

    def check(self) -> None:
        if self.fault is not None:
            raise self.fault

    def _one(self, chunk: dict[str, Any], ids: list[int], text: list[str]) -> None:
        self.usage = _usage(chunk) or self.usage
        if (choice := _first_choice(chunk, self.url)) is None:
            return
        if self.final is not None:
            raise ServerFault(f"{self.url}: output after the finish of {self.rid}")
        delta, plen = _choice_delta(choice, self.with_ids, self.url)
        self.prompt_len = self.prompt_len if self.prompt_len is not None else plen
        if self.got + len(delta.token_ids) > self.max_tokens:
            raise ServerFault(f"{self.url}: {self.got + len(delta.token_ids)} tokens for "
                              f"max_tokens {self.max_tokens}")
        self.got += len(delta.token_ids)
        if delta.finish_reason is not None:
            self.final = delta  # kept until the stream proves whole
        else:
            ids += delta.token_ids
            text.append(delta.text)


class _Watchdog:
    """Closes a stream that brings no output for `stall_s` (the response's close ends
    its read, as a cancel's does).

    Fix: the session's sock_read timeout only measures bytes, so a server that
    sends SSE comments (`: ping`), or events without a choice, forever held the
    request (and its slot) forever. Output (a token, text, the finish) is what
    counts here; time the consumer holds a delta (a worker waiting out a NATS
    outage before it publishes) is not the server's. One timer per `stall_s`,
    moved on lazily: a chunk only notes the time."""

    __slots__ = ("_handle", "_held", "_last", "_loop", "_resp", "_stall_s", "fired")

    def __init__(self, resp: Any, stall_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._resp = resp
        self._stall_s = stall_s
        self._last = self._loop.time()
        self._held = False
        self.fired = False
        self._handle = self._loop.call_at(self._last + stall_s, self._check)

    def progress(self) -> None:
        """Output came (or the consumer gave control back): the wait starts again."""
        self._held = False
        self._last = self._loop.time()

    def hold(self) -> None:
        """The consumer has a delta: no stall is counted until `progress()`."""
        self._held = True

    def _check(self) -> None:
        now = self._loop.time()
        due = (now if self._held else self._last) + self._stall_s
        if now < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        self.fired = True
        self._resp.close()

    def cancel(self) -> None:
        self._handle.cancel()


def _last(final: Delta | None, cancelled: bool, usage: dict[str, Any], prompt_len: int | None,
          prompt_ids: list[int] | None, where: str) -> Delta:
    """The stream's last delta with its counts; ServerFault if the stream never finished."""
    if final is None:
        if not cancelled:
            raise ServerFault(f"{where}: the stream ended without a finish")
        final = Delta(token_ids=[], finish_reason=FinishReason.CANCELLED)
    elif cancelled and final.finish_reason is FinishReason.ABORT:
        final.finish_reason = FinishReason.CANCELLED
    # A server's usage is not trusted to be well-formed (a bad count raised
    # ValueError or TypeError here, not ServerFault): the ids it sent count instead.
    told = usage.get("prompt_tokens")
    final.prompt_tokens = (told if type(told) is int and told > 0 else None) or prompt_len or 0
    if prompt_ids is not None and final.prompt_tokens > len(prompt_ids):
        final.prompt_tokens = len(prompt_ids)  # the server counts resumed tokens too
    final.cached_prompt_tokens = min(_cached(usage), final.prompt_tokens)
    return final


def _usage(chunk: dict[str, Any]) -> dict[str, Any] | None:
    usage = chunk.get("usage")
    return usage if isinstance(usage, dict) and usage else None


def _first_choice(chunk: dict[str, Any], url: str) -> Any:
    """The chunk's first choice, None when it has none (a usage chunk); ServerFault
    when `choices` is not a list (indexing a dict raised KeyError, not a fault)."""
    choices = chunk.get("choices") or []
    if not isinstance(choices, list):
        raise ServerFault(f"{url}: malformed choices")
    if not choices:
        return None
    if not isinstance(choices[0], dict):
        raise ServerFault(f"{url}: malformed choice")
    return choices[0]


def _choice_delta(c: Any, with_ids: bool, url: str) -> tuple[Delta, int | None]:
    """One streamed choice as a Delta (finish_reason set on the last), and the prompt's
    length when this chunk tells it; ServerFault for anything malformed."""
    if not isinstance(c, dict):
        raise ServerFault(f"{url}: malformed choice")
    delta = Delta(token_ids=_ids(c.get("token_ids"), url) if with_ids else [],
                  text=str(c.get("text") or ""))
    reason = c.get("finish_reason")
    if reason is not None:
        if reason not in (*_FINISH, "repetition"):
            raise ServerFault(f"{url}: finish_reason {str(reason)[:40]!r}")
        delta.finish_reason = _FINISH.get(reason, FinishReason.STOP)
    prompt = c.get("prompt_token_ids")
    return delta, len(prompt) if isinstance(prompt, list) else None


def _ids(value: Any, url: str) -> list[int]:
    if value is None:
        raise ServerFault(f"{url}: a chunk without token_ids (does it support return_token_ids?"
                          " use api openai)")
    # `type(t) is int`: JSON true/false are ints to isinstance, and would go out in
    # token chunks that no reader decodes; ids are never negative.
    if not isinstance(value, list) or not all(type(t) is int and t >= 0 for t in value):
        raise ServerFault(f"{url}: malformed token_ids")
    return value


def _cached(usage: dict[str, Any]) -> int:
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if type(cached) is int and cached > 0 else 0


__all__ = ["RemoteEngine", "RemoteSettings"]
