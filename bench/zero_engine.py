"""A near-zero-cost OpenAI-compatible engine server, for routers that front HTTP engines
(bench/peers.py puts vLLM's router in front of two of them).

`POST /v1/chat/completions` streams `max_tokens` words, one SSE event each, one
per turn of the event loop (a step boundary, as the other stacks' near-zero engines
have) (then a finish event, a usage event when
`stream_options.include_usage`, and `data: [DONE]`); non-streamed, one JSON
answer. `GET /v1/models` and `GET /health` answer what routers probe.

    python bench/zero_engine.py --port 8001 [--model zero]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import orjson
import uvloop
from aiohttp import web

WORDS = " the quick brown fox jumps over the lazy dog".split(" ")[1:]


def _event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class Engine:
    def __init__(self, model: str) -> None:
        self.model = model

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "owned_by": "bench"}]})

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = orjson.loads(await request.read())
        n = int(body.get("max_tokens") or 16)
        prompt = " ".join(str(m.get("content", "")) for m in body.get("messages") or [])
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n,
                 "total_tokens": len(prompt.split()) + n}
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.model}
        words = [" " + WORDS[i % len(WORDS)] for i in range(n)]
        if not body.get("stream"):
            return web.json_response({**base, "object": "chat.completion", "usage": usage,
                                      "choices": [{"index": 0, "finish_reason": "length",
                                                   "message": {"role": "assistant",
                                                               "content": "".join(words)}}]})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream",
                                           "cache-control": "no-cache"})
        await resp.prepare(request)
        chunk = {**base, "object": "chat.completion.chunk"}
        for i, word in enumerate(words):
            delta = {"content": word, **({"role": "assistant"} if i == 0 else {})}
            await resp.write(_event({**chunk, "choices": [
                {"index": 0, "delta": delta, "finish_reason": None}]}))
            await asyncio.sleep(0)  # the next step
        await resp.write(_event({**chunk, "choices": [
            {"index": 0, "delta": {}, "finish_reason": "length"}]}))
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(_event({**chunk, "choices": [], "usage": usage}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", default="zero")
    a = ap.parse_args()
    eng = Engine(a.model)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", eng.chat)
    app.router.add_get("/v1/models", eng.models)
    app.router.add_get("/health", eng.health)
    uvloop.install()
    web.run_app(app, host=a.host, port=a.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
