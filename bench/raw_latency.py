"""The latency floor of the pipeline's hops on this machine, with no logic at all.

The same hops as `../shared/bench/pipeline_ceiling.py` (client -> LLM_REQ ->
relay -> LLM_WORK -> worker -> a chunk on `llm.out.i.<id>` captured by
LLM_OUT, and a Final stored in LLM_DONE), one process per role, raw nats-py,
and the lowest-latency consumers JetStream has: push consumers (the server
sends each message the moment it is stored, no pull round trip). The client
sends Poisson arrivals at each rate, one `Nats-Msg-Id` each as in
`bench/overhead.py`, and prints publish -> first chunk p50 / p99. Whatever
cplane adds sits on top of these figures:

    python bench/raw_latency.py --rates 100 1000 4000 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing as mp
import random
import sys
import time
from pathlib import Path

import nats
import orjson
import uvloop
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from overhead import pct, send_open_loop  # noqa: E402

from cplane.bus.server import EmbeddedNats  # noqa: E402

STREAMS = [("LLM_REQ", "llm.req.>", RetentionPolicy.WORK_QUEUE, StorageType.FILE),
           ("LLM_WORK", "llm.work.>", RetentionPolicy.WORK_QUEUE, StorageType.FILE),
           ("LLM_OUT", "llm.out.>", RetentionPolicy.LIMITS, StorageType.MEMORY),
           ("LLM_DONE", "llm.done.>", RetentionPolicy.LIMITS, StorageType.FILE)]


async def setup(url: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    for name, subject, retention, storage in STREAMS:
        await js.add_stream(StreamConfig(name=name, subjects=[subject], retention=retention,
                                         storage=storage))
    await nc.close()


async def relay(url: str, role: str, ready: mp.synchronize.Event) -> None:
    """'orch': each request to LLM_WORK; 'worker': a chunk and a Final per work message."""
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    js = nc.jetstream(publish_async_max_pending=8000)

    async def on_request(m: Msg) -> None:
        await js.publish_async("llm.work.unified.any", m.data)  # stored before the ack below
        await m.ack()

    async def on_work(m: Msg) -> None:
        rid = orjson.loads(m.data)["request_id"]
        await nc.publish(f"llm.out.i.{rid}", orjson.dumps(
            {"request_id": rid, "seq": 0, "token_ids": [1, 2, 3], "text": "abc"}))
        await js.publish_async(f"llm.done.i.{rid}", orjson.dumps(
            {"request_id": rid, "finish_reason": "length"}))
        await m.ack()

    subject, cb = ("llm.req.>", on_request) if role == "orch" else ("llm.work.>", on_work)
    await js.subscribe(subject, durable=role, cb=cb, manual_ack=True, pending_msgs_limit=-1,
                       config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT,
                                             max_ack_pending=20000))
    ready.set()
    await asyncio.Event().wait()


def run_role(url: str, role: str, ready: mp.synchronize.Event) -> None:
    uvloop.run(relay(url, role, ready))


async def one_rate(url: str, rate: float, seconds: float, tag: str) -> tuple[float, float]:
    gc.collect()
    gc.freeze()  # the generator's own collections would read as latency (as in overhead.py)
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    js = nc.jetstream(publish_async_max_pending=8000)
    n = max(1, int(rate * seconds))
    sent: dict[str, float] = {}
    first: dict[str, float] = {}
    all_in = asyncio.Event()

    async def on_out(m: Msg) -> None:
        rid = m.subject.rpartition(".")[2]
        if rid not in first:
            first[rid] = time.perf_counter()
            if len(first) >= n:
                all_in.set()

    await nc.subscribe("llm.out.i.>", cb=on_out)
    await nc.flush()
    await send_open_loop(js, rate, n, lambda rid: orjson.dumps(
        {"request_id": rid, "prompt": "hello world", "max_tokens": 3}), sent, tag=tag,
        rng=random.Random(0))
    await asyncio.wait_for(all_in.wait(), 60)
    await nc.close()
    ms = [(first[r] - t) * 1000 for r, t in sent.items()]
    return pct(ms, 50), pct(ms, 99)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[100.0, 1000.0, 4000.0])
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    with EmbeddedNats() as server:
        uvloop.run(setup(server.url))
        procs = []
        for role in ("orch", "worker"):
            ready = ctx.Event()
            p = ctx.Process(target=run_role, args=(server.url, role, ready), daemon=True)
            p.start()
            if not ready.wait(30):
                raise SystemExit(f"raw {role} did not start")
            procs.append(p)
        print("raw pipeline (push consumers, no logic): publish -> first chunk, ms")
        try:
            for i, rate in enumerate(args.rates):
                p50, p99 = uvloop.run(one_rate(server.url, rate, args.seconds, f"r{i}-"))
                print(f"  {rate:>7,.0f} req/s  p50 {p50:6.2f}  p99 {p99:7.2f}", flush=True)
        finally:
            for p in procs:
                p.terminate()


if __name__ == "__main__":
    main()
