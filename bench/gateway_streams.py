"""The gateway under many open SSE streams, and what it adds to latency.

Two phases, each on its own `cplane up`-style stack (embedded nats-server,
orchestrator, sim workers and `cplane gateway`, all processes):

  (a) latency: zero-cost sim workers; `--latency-requests` streamed requests
      one after another through the gateway (HTTP + SSE, aiohttp) and as many
      through the Python SDK (Client.stream) on the same stack: TTFT and
      end-to-end p50/p99 of each, and the difference (what HTTP adds);
  (b) scale: slow sim workers (one token per `--token-ms`), `--streams`
      concurrent SSE streams opened at once on one gateway process; the
      gateway's RSS idle and once every stream is open (its `open_streams`
      gauge), so memory per open stream = RSS delta / streams; every stream
      must end with `data: [DONE]` and the right token count.

    python bench/gateway_streams.py [--streams 2000] [--json bench/results/gateway_streams.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import uvloop
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cplane.client.sdk import Client, new_request_id  # noqa: E402
from cplane.schemas.messages import Request  # noqa: E402
from cplane.schemas.settings import load_settings  # noqa: E402
from cplane.stack import Stack, StackSpec  # noqa: E402

console = Console()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def gateway_pid(stack: Stack) -> int:
    for p in stack.procs:
        if "gateway" in p.args:  # type: ignore[operator]
            return p.pid
    raise RuntimeError("the stack has no gateway process")


def start_stack(toml: str, workers: int, capacity: int, zero_cost: bool) -> Stack:
    fh = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    fh.write(toml)
    fh.close()
    stack = Stack(StackSpec(config=fh.name, workers=workers, capacity=capacity,
                            zero_cost=zero_cost, model="sim"))
    stack.start()
    return stack


async def sse_request(http: aiohttp.ClientSession, url: str, max_tokens: int
                      ) -> tuple[float, float, int]:
    """One streamed completion: (ttft_s, e2e_s, words); raises unless it ends with [DONE]."""
    body = {"model": "sim", "prompt": "hello world", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True}
    t0 = time.perf_counter()
    ttft, text, done = 0.0, [], False
    async with http.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if event["choices"] and event["choices"][0]["text"]:
                ttft = ttft or time.perf_counter() - t0
                text.append(event["choices"][0]["text"])
    if not done:
        raise RuntimeError("the stream ended without data: [DONE]")
    return ttft, time.perf_counter() - t0, len("".join(text).split())


async def sdk_request(client: Client, max_tokens: int) -> tuple[float, float, int]:
    req = Request(request_id=new_request_id(), model="sim", prompt="hello world",
                  max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    ttft, words = 0.0, 0
    async for chunk in client.stream(req):
        ttft = ttft or time.perf_counter() - t0
        words += len(chunk.text.split())
    return ttft, time.perf_counter() - t0, words


async def latency_phase(stack: Stack, n: int, max_tokens: int) -> dict[str, dict[str, float]]:
    settings = load_settings(stack.spec.config, nats={"url": stack.url})
    client = await Client.connect(stack.url, settings)
    out: dict[str, dict[str, float]] = {}
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(20):  # warm both paths
                await sse_request(http, stack.gateway_url or "", max_tokens)
                await sdk_request(client, max_tokens)
            for name in ("sdk", "gateway"):
                ttfts, e2es = [], []
                for _ in range(n):
                    if name == "sdk":
                        ttft, e2e, words = await sdk_request(client, max_tokens)
                    else:
                        ttft, e2e, words = await sse_request(http, stack.gateway_url or "",
                                                             max_tokens)
                    assert words == max_tokens, (name, words)
                    ttfts.append(ttft * 1000)
                    e2es.append(e2e * 1000)
                out[name] = {"ttft_p50_ms": pct(ttfts, 50), "ttft_p99_ms": pct(ttfts, 99),
                             "e2e_p50_ms": pct(e2es, 50), "e2e_p99_ms": pct(e2es, 99),
                             "e2e_mean_ms": statistics.fmean(e2es)}
    finally:
        await client.close()
    return out


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return float("nan")


async def scale_phase(stack: Stack, streams: int, max_tokens: int) -> dict[str, float]:
    url, pid = stack.gateway_url or "", gateway_pid(stack)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=600)) as http:
        await sse_request(http, url, 2)  # warm: imports, first connection
        idle = rss_mib(pid)
        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(sse_request(http, url, max_tokens))
                 for _ in range(streams)]
        peak_open, rss_at_peak, opened_s = 0.0, idle, float("nan")
        while not all(t.done() for t in tasks):
            open_now = await metric(http, url, "cplane_gateway_open_streams")
            if open_now >= peak_open:
                peak_open, rss_at_peak = open_now, rss_mib(pid)
                if open_now >= streams and opened_s != opened_s:
                    opened_s = time.perf_counter() - t0
            await asyncio.sleep(0.5)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        wall = time.perf_counter() - t0
    failed = [r for r in results if isinstance(r, BaseException)]
    ok = [r for r in results if not isinstance(r, BaseException)]
    if failed:
        console.print(f"[red]{len(failed)} streams failed[/red], first: {failed[0]!r}")
    ttfts = [r[0] * 1000 for r in ok]
    return {"streams": streams, "completed": len(ok), "failed": len(failed),
            "right_token_count": sum(1 for r in ok if r[2] == max_tokens),
            "peak_open_streams": peak_open, "all_open_after_s": opened_s,
            "rss_idle_mib": idle, "rss_peak_mib": rss_at_peak,
            "kib_per_stream": (rss_at_peak - idle) * 1024 / max(peak_open, 1),
            "ttft_p50_ms": pct(ttfts, 50), "ttft_p99_ms": pct(ttfts, 99), "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=2000)
    ap.add_argument("--stream-tokens", type=int, default=20, help="tokens per scale stream")
    ap.add_argument("--token-ms", type=float, default=1000.0, help="sim decode step (scale)")
    ap.add_argument("--latency-requests", type=int, default=200)
    ap.add_argument("--latency-tokens", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    result: dict[str, object] = {"args": vars(args), "cpus": os.cpu_count()}

    stack = start_stack("", args.workers, 64, zero_cost=True)
    try:
        lat = uvloop.run(latency_phase(stack, args.latency_requests, args.latency_tokens))
    finally:
        stack.stop()
    result["latency"] = lat
    t = Table(title=f"(a) one streamed request at a time, {args.latency_tokens} tokens, "
                    "zero-cost sim (ms)")
    for col in ("path", "TTFT p50", "TTFT p99", "e2e p50", "e2e p99"):
        t.add_column(col)
    for name, row in lat.items():
        t.add_row(name, *(f"{row[k]:.2f}" for k in ("ttft_p50_ms", "ttft_p99_ms",
                                                    "e2e_p50_ms", "e2e_p99_ms")))
    added = {k: lat["gateway"][k] - lat["sdk"][k] for k in lat["sdk"]}
    t.add_row("added by the gateway", *(f"{added[k]:+.2f}" for k in (
        "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms")))
    console.print(t)

    per_worker = args.streams // args.workers + 8
    toml = (f"[sim]\ndecode_a_ms = {args.token_ms}\nmax_num_seqs = {per_worker}\n"
)
    stack = start_stack(toml, args.workers, per_worker, zero_cost=False)
    try:
        scale = uvloop.run(scale_phase(stack, args.streams, args.stream_tokens))
    finally:
        stack.stop()
    result["scale"] = scale
    t = Table(title=f"(b) {args.streams} concurrent SSE streams on one gateway process")
    t.add_column("figure")
    t.add_column("value")
    for k, v in scale.items():
        t.add_row(k, f"{v:.1f}" if isinstance(v, float) else str(v))
    console.print(t)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if scale["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
