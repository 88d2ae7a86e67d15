"""JetStream storage per request: what each stream keeps once requests are done.

Starts a private nats-server (file store), one orchestrator and two zero-cost
sim workers (as bench/cpu_per_request.py does), pushes N requests of a given
prompt and output length through and waits for every terminal, then reads each
stream's state (bytes, messages) from the server. Bytes per request, and per
million requests kept, are what a node's disk holds for one replica (an R3
stream holds that on each of three nodes); the stream limits in
`schemas/settings.py` (max_age_s, max_bytes) decide how long each keeps it.

    python bench/storage_per_request.py --requests 20000 --prompt-words 256 --max-tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import nats
from nats.aio.msg import Msg

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

from cpu_per_request import start_services  # noqa: E402

from cplane.bus.server import EmbeddedNats  # noqa: E402
from cplane.schemas.settings import load_settings  # noqa: E402

IN_FLIGHT = 256


async def run(n: int, prompt_words: int, max_tokens: int) -> dict[str, tuple[int, int]]:
    """stream name -> (messages, bytes) once all `n` requests are done."""
    streams = load_settings(env={}).streams
    with EmbeddedNats() as server:
        procs = start_services(ROOT, server.url)
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            seen: set[str] = set()
            ready, finished = asyncio.Event(), asyncio.Event()
            done = 0

            async def on_hb(msg: Msg) -> None:
                seen.add(msg.subject)
                if len(seen) >= 2:
                    ready.set()

            async def on_done(msg: Msg) -> None:
                nonlocal done
                done += 1
                if done >= n:
                    finished.set()

            await nc.subscribe("llm.hb.*", cb=on_hb)
            await asyncio.wait_for(ready.wait(), 120)
            await asyncio.sleep(2)  # the orchestrator leads and pulls
            await nc.subscribe("llm.done.i.>", cb=on_done)
            await nc.flush()
            prompt = " ".join(f"w{i % 997}" for i in range(prompt_words))
            pending = []
            for i in range(n):
                body = json.dumps({"request_id": f"r{i}", "prompt": prompt,
                                   "max_tokens": max_tokens, "ignore_eos": True}).encode()
                pending.append(js.publish("llm.req.normal.standard", body,
                                          headers={"Nats-Msg-Id": f"r{i}"}))
                if len(pending) >= IN_FLIGHT:
                    await asyncio.gather(*pending)
                    pending = []
            await asyncio.gather(*pending)
            await asyncio.wait_for(finished.wait(), 900)
            await asyncio.sleep(2)  # LLM_DONE sources the last terminals from LLM_OUT
            out = {}
            for s in (streams.req, streams.work, streams.out, streams.done, streams.cancel,
                      streams.dlq):
                st = (await js.stream_info(s.name)).state
                out[s.name] = (st.messages, st.bytes)
            return out
        finally:
            await nc.close()
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--prompt-words", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=256)
    args = ap.parse_args()
    r = asyncio.run(run(args.requests, args.prompt_words, args.max_tokens))
    n = args.requests
    print(f"{n} requests, prompt {args.prompt_words} words, {args.max_tokens} tokens out")
    print(f"{'stream':<11} {'messages':>9} {'bytes':>13} {'B/request':>10} {'GB per 1M':>10}")
    for name, (msgs, size) in r.items():
        print(f"{name:<11} {msgs:>9} {size:>13} {size / n:>10.0f} {size / n * 1e6 / 1e9:>10.2f}")


if __name__ == "__main__":
    main()
