"""What one terminal costs nats-server, by how it is stored and delivered.

One publisher (`publish_async`, a `Nats-Msg-Id` each, 300-byte body, file
storage) and one subscriber on a private nats-server; the server's CPU over
the run from /proc, per message. Shapes:

- plain: stored in one stream, the subscriber reads the published subject
  (87855ab's Final);
- republish: stored, then republished to the subject the reader reads
  (cplane's outputs: a reader sees only what is stored);
- source: republish, plus a second stream sourcing it (cplane's terminals:
  LLM_OUT for order, LLM_DONE for days);
- capture: republish, plus a second stream capturing the republished subject.

    python bench/store_cost.py --messages 60000 plain republish source capture
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import nats
from nats.aio.msg import Msg
from nats.js.api import RePublish, StorageType, StreamConfig, StreamSource

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cpu_per_request import cpu_seconds  # noqa: E402

from cplane.bus.server import EmbeddedNats  # noqa: E402

SHAPES = ("plain", "republish", "source", "capture")


async def streams(js: nats.js.JetStreamContext, shape: str) -> str:
    """Create the shape's streams; returns the subject the reader subscribes to."""
    republish = (RePublish(src="t.s.*.>", dest="t.{{wildcard(1)}}.>")
                 if shape != "plain" else None)
    await js.add_stream(StreamConfig(name="OUT", subjects=["t.s.>"], republish=republish,
                                     storage=StorageType.FILE))
    if shape == "source":
        await js.add_stream(StreamConfig(name="DONE", subjects=[], storage=StorageType.FILE,
                                         sources=[StreamSource(name="OUT",
                                                               filter_subject="t.s.done.>")]))
    elif shape == "capture":
        await js.add_stream(StreamConfig(name="DONE", subjects=["t.done.>"],
                                         storage=StorageType.FILE))
    return "t.s.done.i.*" if shape == "plain" else "t.done.i.*"


async def one(url: str, pid: int, shape: str, n: int) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=4000)
    got = 0
    all_in = asyncio.Event()

    async def on_msg(_: Msg) -> None:
        nonlocal got
        got += 1
        if got >= n:
            all_in.set()

    await nc.subscribe(await streams(js, shape), cb=on_msg)
    await nc.flush()
    t0 = cpu_seconds(pid)
    futs = []
    for i in range(n):
        futs.append(await js.publish_async(f"t.s.done.i.r{i}", b"x" * 300,
                                           headers={"Nats-Msg-Id": f"r{i}:done"}))
        if len(futs) >= 2000:
            await asyncio.gather(*futs)
            futs = []
    await asyncio.gather(*futs)
    await asyncio.wait_for(all_in.wait(), 120)
    if shape in ("source", "capture"):  # the second copy is part of the cost
        deadline = time.monotonic() + 60
        while (await js.stream_info("DONE")).state.messages < n:
            if time.monotonic() > deadline:
                raise SystemExit("the second stream did not get every message")
            await asyncio.sleep(0.1)
    used_s = cpu_seconds(pid) - t0
    await nc.close()
    return used_s * 1e6 / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--messages", type=int, default=60000)
    args = ap.parse_args()
    for shape in args.shapes:
        if shape not in SHAPES:
            raise SystemExit(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
        with EmbeddedNats() as server:
            assert server.proc is not None
            us = asyncio.run(one(server.url, server.proc.pid, shape, args.messages))
        print(f"{shape:10s} nats-server {us:5.1f} us per message", flush=True)


if __name__ == "__main__":
    main()
