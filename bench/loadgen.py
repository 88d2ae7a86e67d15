"""A streaming OpenAI chat load generator, the same one for every stack in bench/peers.py.

Closed loop (a fixed number in flight) or open loop (Poisson arrivals at a rate,
seeded). Each request streams (`stream: true`); TTFT is taken at the first
event carrying content, ITL between content events, E2E at `data: [DONE]`.
A request that does not end with `[DONE]` and the asked token count is an error.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from overhead import pct

Body = Callable[[int], dict[str, Any]]  # request number -> JSON body


@dataclass
class Sample:
    ttft_s: float
    e2e_s: float
    itl_s: list[float]
    tokens: int
    prompt_tokens: int = 0  # from the usage event, when the stream sends one
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens


@dataclass
class Run:
    """What one load phase measured."""

    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def rate(self) -> float:
        return len(self.samples) / self.wall_s if self.wall_s else 0.0

    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall_s if self.wall_s else 0.0

    def ttft_ms(self, q: float) -> float:
        return pct([s.ttft_s * 1000 for s in self.samples], q)

    def itl_ms(self, q: float) -> float:
        return pct([x * 1000 for s in self.samples for x in s.itl_s], q)

    def e2e_ms(self, q: float) -> float:
        return pct([s.e2e_s * 1000 for s in self.samples], q)

    def cache_hit(self) -> float | None:
        """Cached prompt tokens / prompt tokens, over requests whose usage said both."""
        told = [s for s in self.samples if s.cached_tokens is not None and s.prompt_tokens]
        if not told:
            return None
        return sum(s.cached_tokens or 0 for s in told) / sum(s.prompt_tokens for s in told)


def _content(event: dict[str, Any]) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    return str((choices[0].get("delta") or {}).get("content") or "")


async def one(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Sample:
    """One streamed chat completion; raises unless it ends with [DONE] and the tokens asked."""
    t0 = time.perf_counter()
    first = last = 0.0
    itl: list[float] = []
    events, done = 0, False
    usage: dict[str, Any] = {}
    async with http.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
        async for raw in r.content:
            if not raw.startswith(b"data: "):
                continue
            if raw.startswith(b"data: [DONE]"):
                done = True
                break
            event = json.loads(raw[6:])
            if "error" in event:
                raise RuntimeError(f"error event: {event['error']}")
            usage = event.get("usage") or usage
            if _content(event):
                now = time.perf_counter()
                if first:
                    itl.append(now - last)
                else:
                    first = now
                last = now
                events += 1
    if not done or not first:
        raise RuntimeError(f"the stream ended without [DONE] or content ({events} events)")
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    return Sample(first - t0, time.perf_counter() - t0, itl, body["max_tokens"],
                  int(usage.get("prompt_tokens") or 0), None if cached is None else int(cached))


async def _guarded(http: aiohttp.ClientSession, url: str, body: dict[str, Any],
                   run: Run) -> None:
    try:
        run.samples.append(await one(http, url, body))
    except Exception as e:
        run.errors.append(repr(e)[:200])


def session(concurrency: int) -> aiohttp.ClientSession:
    conn = aiohttp.TCPConnector(limit=concurrency + 16, force_close=False)
    return aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120))


async def closed_loop(url: str, make: Body, concurrency: int, n: int) -> Run:
    """`n` requests, `concurrency` in flight at every moment."""
    run = Run()
    counter = iter(range(n))
    async with session(concurrency) as http:
        async def lane() -> None:
            for i in counter:
                await _guarded(http, url, make(i), run)

        t0 = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        run.wall_s = time.perf_counter() - t0
    return run


async def open_loop(url: str, make: Body, rate: float, n: int, seed: int = 1) -> Run:
    """`n` requests arriving as a Poisson process of `rate` per second."""
    run = Run()
    rng = random.Random(seed)
    async with session(256) as http:
        tasks: list[asyncio.Task[None]] = []
        t0 = time.perf_counter()
        at = 0.0
        for i in range(n):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_guarded(http, url, make(i), run)))
            at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        run.wall_s = time.perf_counter() - t0
    return run
