"""Streaming benchmark: what the token path adds to the engine's own step time.

One private nats-server; an orchestrator, one worker with the sim engine at its
default cost (decode steps ~6.5 ms) and the client, all on one uvloop in this
process (so the figures include their competing for it: pessimistic). The
engine is the live SimEngine, with each token's emission time noted (a
subclass that only records). For every token the client gets:

  added latency = arrival at the client - the engine step that produced it

and per request the client's inter-token latency (per chunk, as `vllm bench
serve` counts ITL) against the engine's step interval, and messages per token.

    python bench/streaming.py [--requests 64] [--concurrency 16] [--max-tokens 64]
                              [--chunk-interval-ms 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import nats
import uvloop
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cplane.bus.server import EmbeddedNats  # noqa: E402
from cplane.client.sdk import Client  # noqa: E402
from cplane.orchestrator.service import Orchestrator  # noqa: E402
from cplane.schemas.messages import FinishReason, Request  # noqa: E402
from cplane.schemas.settings import Settings, load_settings  # noqa: E402
from cplane.workers.engines.base import Delta  # noqa: E402
from cplane.workers.engines.sim import SimEngine  # noqa: E402
from cplane.workers.runtime import Worker  # noqa: E402

PROMPT = "the quick brown fox jumps over the lazy dog " * 8


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


class StampedSim(SimEngine):
    """The sim engine, noting when each token of each request was emitted."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.emitted: dict[str, list[float]] = {}

    def _delta(self, q: Any, ids: list[int], text: str,  # type: ignore[override]
               reason: FinishReason | None) -> Delta:
        self.emitted.setdefault(q.request_id, []).append(time.monotonic())
        return super()._delta(q, ids, text, reason)


async def one(client: Client, rid: str, max_tokens: int) -> list[tuple[float, int]]:
    handle = await client.submit(Request(request_id=rid, prompt=PROMPT, max_tokens=max_tokens,
                                         ignore_eos=True, temperature=0.0))
    got = [(time.monotonic(), len(c.token_ids)) async for c in handle]
    await handle.result(timeout=60)
    return got


async def run(args: argparse.Namespace) -> dict[str, Any]:
    server = EmbeddedNats().start()
    try:
        s: Settings = load_settings(None, nats={"url": server.url},
                                    worker={"worker_id": "w0", "capacity": args.concurrency,
                                            "chunk_interval_ms": args.chunk_interval_ms},
                                    orchestrator={"policy": "fifo"})
        engine = StampedSim(s.sim)
        await engine.start()
        stop = asyncio.Event()
        ready_o, ready_w = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(Orchestrator(s).run(stop, ready_o)),
                 asyncio.create_task(Worker(s, engine).run(stop, ready_w))]
        await asyncio.wait_for(asyncio.gather(ready_o.wait(), ready_w.wait()), 30)
        client = Client(await nats.connect(server.url), s)
        sem = asyncio.Semaphore(args.concurrency)

        async def limited(i: int) -> tuple[str, list[tuple[float, int]]]:
            async with sem:
                rid = f"st{i}"
                return rid, await one(client, rid, args.max_tokens)

        await asyncio.gather(*(limited(-1 - i) for i in range(4)))  # warm up
        t0 = time.perf_counter()
        results = await asyncio.wait_for(
            asyncio.gather(*(limited(i) for i in range(args.requests))), args.timeout_s)
        wall = time.perf_counter() - t0
        await client.close()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await engine.shutdown()
    finally:
        server.stop()
    added: list[float] = []
    itl: list[float] = []
    steps: list[float] = []
    chunks = tokens = 0
    for rid, got in results:
        emitted = engine.emitted[rid]
        i = 0
        for at, n in got:
            for k in range(n):
                added.append((at - emitted[i + k]) * 1000)
            i += n
        chunks += len(got)
        tokens += i
        itl += [(b[0] - a[0]) * 1000 for a, b in itertools.pairwise(got)]
        steps += [(b - a) * 1000 for a, b in itertools.pairwise(emitted)]
    return {
        "settings": {"requests": args.requests, "concurrency": args.concurrency,
                     "max_tokens": args.max_tokens, "chunk_interval_ms": args.chunk_interval_ms,
                     "engine": "sim, default cost", "decode_a_ms": s.sim.decode_a_ms},
        "wall_s": wall, "tokens": tokens, "chunks": chunks,
        "messages_per_token": chunks / tokens if tokens else float("nan"),
        "added_ms": {"p50": pct(added, 50), "p90": pct(added, 90), "p99": pct(added, 99)},
        "itl_ms": {"p50": pct(itl, 50), "p99": pct(itl, 99)},
        "engine_step_ms": {"p50": pct(steps, 50), "p99": pct(steps, 99)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--chunk-interval-ms", type=float, default=0.0)
    ap.add_argument("--timeout-s", type=float, default=300.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = uvloop.run(run(args))
    t = Table(title="cplane streaming: " + ", ".join(f"{k}={v}"
                                                     for k, v in out["settings"].items()))
    for col in ("", "p50 ms", "p90 ms", "p99 ms"):
        t.add_column(col, justify="right")
    a, i, e = out["added_ms"], out["itl_ms"], out["engine_step_ms"]
    t.add_row("added (client arrival - engine emit)", f"{a['p50']:.2f}", f"{a['p90']:.2f}",
              f"{a['p99']:.2f}")
    t.add_row("client ITL (per chunk)", f"{i['p50']:.2f}", "", f"{i['p99']:.2f}")
    t.add_row("engine step interval", f"{e['p50']:.2f}", "", f"{e['p99']:.2f}")
    Console().print(t)
    print(f"{out['tokens']} tokens in {out['chunks']} chunks: "
          f"{out['messages_per_token']:.3f} messages per token; {out['wall_s']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
