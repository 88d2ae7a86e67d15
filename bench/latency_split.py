"""Where first-token latency goes under load: the client's view split by the Final's timings.

Against a running stack (e.g. `CPLANE__SIM__ZERO_COST=true cplane up`), sends
Poisson arrivals at each rate for a few seconds (README's raw JSON, one
`Nats-Msg-Id` each) and prints, p50 / p99 in ms:
- client: publish -> first chunk received;
- queue: stored in LLM_REQ -> dispatched (the orchestrator, `Final.timings.queue_ms`);
- server TTFT: stored in LLM_REQ -> first token published by the worker
  (`Final.timings.ttft_ms`); the client figure minus this one is the publish
  and the output's way back (stored in LLM_OUT, republished, read).

    python bench/latency_split.py nats://127.0.0.1:4222 --rates 1000 2500 4000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import time

import nats
import uvloop
from nats.aio.msg import Msg
from overhead import pct, send_open_loop

from cplane.schemas.codec import final_decoder
from cplane.schemas.messages import Final

FRESH = False  # --fresh-ids: the publisher says it minted each id (Request.fresh_id)


def _body(rid: str) -> bytes:
    return json.dumps({"request_id": rid, "prompt": "hello world", "max_tokens": 3,
                       "fresh_id": FRESH}).encode()


async def one_rate(url: str, rate: float, seconds: float) -> str:
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=4000)
    sent: dict[str, float] = {}
    first: dict[str, float] = {}
    timings: list[tuple[float, float]] = []
    n = int(rate * seconds)
    done = asyncio.Event()
    finished = 0

    async def on_out(msg: Msg) -> None:
        first.setdefault(msg.subject.rpartition(".")[2], time.perf_counter())

    async def on_done(msg: Msg) -> None:
        nonlocal finished
        finished += 1
        term = final_decoder.decode(msg.data)
        if isinstance(term, Final):
            timings.append((term.timings.queue_ms, term.timings.ttft_ms))
        if finished >= n:
            done.set()

    await nc.subscribe("llm.out.i.>", cb=on_out)
    await nc.subscribe("llm.done.i.>", cb=on_done)
    await nc.flush()
    tag = f"ls{int(time.time() * 1000) % 10**7}-{int(rate)}-"
    await send_open_loop(js, rate, n, _body, sent, tag=tag, rng=random.Random(1))
    await asyncio.wait_for(done.wait(), 120)
    await nc.close()
    client = [(first[r] - t) * 1000 for r, t in sent.items() if r in first]
    queue = [q for q, _ in timings]
    server = [s for _, s in timings]
    return (f"{rate:>7,.0f} req/s  client {pct(client, 50):6.2f} / {pct(client, 99):6.2f}  "
            f"queue {pct(queue, 50):6.2f} / {pct(queue, 99):6.2f}  "
            f"server TTFT {pct(server, 50):6.2f} / {pct(server, 99):6.2f}")


async def main(args: argparse.Namespace) -> None:
    gc.collect()
    gc.freeze()  # the generator's own collections would read as latency
    print("p50 / p99 ms: client publish -> first chunk; queue; server TTFT")
    for rate in args.rates:
        print(await one_rate(args.url, rate, args.seconds), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("--rates", type=float, nargs="+", default=[1000.0, 2500.0, 4000.0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--fresh-ids", action="store_true",
                    help="mark each id as minted for its request (Request.fresh_id)")
    args = ap.parse_args()
    FRESH = args.fresh_ids
    uvloop.run(main(args))
