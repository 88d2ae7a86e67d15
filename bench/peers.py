"""cplane beside NVIDIA Dynamo (and vLLM's and SGLang's routers), on this machine, in one
run, under one load generator.

Each stack runs alone, one after the other, fronted by its OpenAI HTTP server,
with 2 engine workers of equal, near-zero simulated cost (cplane's sim step
formulas scaled 1000x down; Dynamo's mocker at --speedup-ratio 1000), and is
driven by bench/loadgen.py (streaming chat, ~100-word prompts, 16 streamed
tokens):

  saturation  closed loop, `--concurrency` in flight;
  half        open loop (Poisson) at half of cplane's saturation rate, the same
              rate for every stack;
  low         open loop at `--low-rate` req/s.

Requests/s per core = requests / CPU seconds of every process of the stack
(user + system, the load generator excluded): what a core buys on either
stack, whatever else shares the machine. Dynamo and the HTTP routers
(`vllm-router`, SGLang's `smg`, in front of bench/zero_engine.py HTTP servers:
engines of another kind) are installed into virtual environments of their own
(bench/peer_stacks.py), never the project's.

    python bench/peers.py [--quick] [--json FILE] [--png docs/peers.png]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from loadgen import Run, closed_loop, open_loop  # noqa: E402
from peer_stacks import (  # noqa: E402
    HTTP_ROUTERS,
    CplaneStack,
    DynamoStack,
    HttpRouterStack,
    PeerStack,
    cpu_by_name,
    install_dynamo,
    install_router,
)

console = Console(stderr=True)
# cplane's router -> Dynamo's --router-mode of the same idea.
DYNAMO_ROUTER = {"round_robin": "round-robin", "prefix_aware": "kv", "random": "random"}
WORDS = ("the quick brown fox jumps over a lazy dog while engines stream tokens to every "
         "client that asks for them and the scheduler keeps queues short").split()


def prompts(n: int, words: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def prefix_prompts(n: int, docs: int, doc_words: int, tail_words: int,
                   seed: int = 11) -> list[str]:
    """A prefix-heavy workload: each prompt one of `docs` long shared documents, then a
    question of its own (what a router that follows the KV cache should exploit)."""
    rng = random.Random(seed)
    shared = prompts(docs, doc_words, seed)
    def tail() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(tail_words))

    return [f"{shared[rng.randrange(docs)]} {tail()}" for _ in range(n)]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.prompts = prompts(512, args.prompt_words)
        self.prefixed = prefix_prompts(args.prefix_requests, 16, args.prefix_words, 12)
        self.rows: list[dict[str, Any]] = []

    def maker(self, stack: PeerStack, texts: list[str] | None = None
              ) -> Callable[[int], dict[str, Any]]:
        texts = texts or self.prompts
        return lambda i: stack.body(texts[i % len(texts)], self.args.max_tokens)

    async def phase(self, stack: Any, load: str, run: Callable[[], Any],
                    setting: str) -> dict[str, Any]:
        procs = stack.processes()
        before = cpu_by_name(procs)
        t0 = time.process_time()
        res: Run = await run()
        client_cpu = time.process_time() - t0
        after = cpu_by_name(procs)
        n = max(1, len(res.samples))
        cpu = {k: (after[k] - before[k]) * 1000 / n for k in procs}
        total_ms = sum(cpu.values())
        row = {"stack": stack.name, "router": stack.router, "variant": stack.variant,
               "load": load, "setting": setting,
               "requests": len(res.samples), "errors": len(res.errors),
               "req_per_s": round(res.rate(), 1), "tokens_per_s": round(res.tokens_per_s(), 1),
               "req_per_s_per_core": round(1000 / total_ms, 1) if total_ms else 0.0,
               "cores_used": round(total_ms * res.rate() / 1000, 2),
               "ttft_p50_ms": round(res.ttft_ms(50), 2), "ttft_p99_ms": round(res.ttft_ms(99), 2),
               "itl_p50_ms": round(res.itl_ms(50), 3), "itl_p99_ms": round(res.itl_ms(99), 3),
               "e2e_p50_ms": round(res.e2e_ms(50), 2),
               "cpu_ms_per_req": {k: round(v, 3) for k, v in cpu.items()},
               "cpu_ms_per_req_total": round(total_ms, 3),
               "client_cpu_ms_per_req": round(client_cpu * 1000 / n, 3)}
        hit = res.cache_hit()
        row["cache_hit"] = None if hit is None else round(hit, 3)
        if res.errors:
            row["first_error"] = res.errors[0]
        console.print(f"  {stack.name:7} {stack.router:12} {stack.variant:8} {load:10} "
                      f"{setting:>10}: "
                      f"{row['req_per_s']:8.1f} req/s, {row['req_per_s_per_core']:7.1f} per core, "
                      f"TTFT p50/p99 {row['ttft_p50_ms']:.1f}/{row['ttft_p99_ms']:.1f} ms, "
                      f"cpu {total_ms:.2f} ms/req {row['cpu_ms_per_req']}"
                      + (f", {len(res.errors)} errors: {res.errors[0]}" if res.errors else ""))
        self.rows.append(row)
        return row

    async def measure(self, stack: Any, half_rate: float | None) -> float:
        """Every load on one stack; returns its saturation rate."""
        a, make = self.args, self.maker(stack)
        await closed_loop(stack.url, make, 32, a.warmup)
        sat = await self.phase(stack, "saturation", lambda: closed_loop(
            stack.url, make, a.concurrency, a.requests), f"{a.concurrency} in flight")
        rate = half_rate or sat["req_per_s"] / 2
        await self.phase(stack, "half", lambda: open_loop(
            stack.url, make, rate, max(50, int(rate * a.half_s))), f"{rate:.0f} req/s")
        await self.phase(stack, "low", lambda: open_loop(
            stack.url, make, a.low_rate, a.low_requests), f"{a.low_rate:.0f} req/s")
        if a.prefix_requests:
            await self.phase(stack, "prefix", lambda: closed_loop(
                stack.url, self.maker(stack, self.prefixed), 32, a.prefix_requests),
                "32 in flight")
        return float(sat["req_per_s"])

    def run(self) -> None:
        """Every stack per router; from the second round on the order alternates (the
        half-load rate is cplane's saturation rate from the round before, halved)."""
        a = self.args
        python = install_dynamo(Path(a.dynamo_venv)) if a.dynamo_venv else install_dynamo()
        routers = {name: install_router(name) for name in a.http_routers}
        half: dict[str, float] = {}
        stacks = ["cplane", *(f"cplane:{ms:g}" for ms in a.chunk_ms), "dynamo", *routers]
        for rep in range(a.repeats):
            for router in a.routers:
                # From the second round on, every order is reversed (cplane's saturation,
                # which sets the half rate, is then known from the round before).
                order = stacks[::-1] if rep % 2 and router in half else stacks
                for name in order:
                    console.print(f"[bold]{name}[/] ({router}), round {rep + 1}")
                    stack: Any
                    if name.startswith("cplane"):
                        ms = float(name.partition(":")[2] or 0)
                        stack = CplaneStack(a.workers, router, ms)
                    elif name in routers:
                        stack = HttpRouterStack(name, routers[name], a.workers, router)
                    else:
                        stack = DynamoStack(python, a.workers, DYNAMO_ROUTER.get(router, router),
                                            a.max_tokens)
                    try:
                        sat = uvloop.run(self.measure(stack, half.get(router)))
                    finally:
                        stack.stop()
                    if name == "cplane":
                        half.setdefault(router, sat / 2)

def table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="cplane beside its peers (2 engine workers each, 16 streamed tokens)")
    for col in ("stack", "router", "variant", "load", "setting", "req/s", "req/s per core",
                "TTFT p50 / p99 ms", "ITL p50 / p99 ms", "CPU ms/req", "errors"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["stack"], r["router"], r["variant"], r["load"], r["setting"],
                  f"{r['req_per_s']:.0f}",
                  f"{r['req_per_s_per_core']:.0f}",
                  f"{r['ttft_p50_ms']:.1f} / {r['ttft_p99_ms']:.1f}",
                  f"{r['itl_p50_ms']:.2f} / {r['itl_p99_ms']:.2f}",
                  f"{r['cpu_ms_per_req_total']:.2f}", str(r["errors"]))
    return t


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| stack | router | variant | load | setting | req/s | req/s per core "
            "| TTFT p50 / p99 ms | ITL p50 / p99 ms | prefix hit | CPU ms per request "
            "(by process) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    return head + "".join(
        f"| {r['stack']} | {r['router']} | {r['variant']} | {r['load']} | {r['setting']} | "
        f"{r['req_per_s']:.0f} | "
        f"{r['req_per_s_per_core']:.0f} | {r['ttft_p50_ms']:.1f} / {r['ttft_p99_ms']:.1f} | "
        f"{r['itl_p50_ms']:.2f} / {r['itl_p99_ms']:.2f} | "
        f"{'' if r.get('cache_hit') is None else format(r['cache_hit'], '.2f')} | "
        f"{r['cpu_ms_per_req_total']:.2f} ("
        + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_ms_per_req"].items()) + ") |\n"
        for r in rows)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["stack"], r["router"], r["variant"]) for r in rows})
    def short(v: str) -> str:
        return "" if v == "default" else "\n" + v.replace(" apart", "").replace(">= ", "")

    labels = [f"{s}\n{r}{short(v)}" for s, r, v in keys]
    palette = {"dynamo": "tab:green", "vllm-router": "tab:orange", "smg": "tab:red"}
    colors = [palette.get(s, "tab:blue" if v == "default" else "lightsteelblue")
              for s, _, v in keys]

    def best(key: tuple[str, str, str], load: str, field: str, hi: bool) -> float:
        v = [r[field] for r in rows if (r["stack"], r["router"], r["variant"]) == key
             and r["load"] == load]
        return (max(v) if hi else min(v)) if v else 0.0

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    panels = [("saturation", "req_per_s_per_core", True, "requests/s per core (saturation)"),
              ("half", "ttft_p50_ms", False, "TTFT p50 ms (half load)"),
              ("low", "ttft_p50_ms", False, "TTFT p50 ms (low load)")]
    for ax, (load, field, hi, title) in zip(axes, panels, strict=True):
        ax.bar(labels, [best(k, load, field, hi) for k in keys], color=colors)
        ax.tick_params(axis="x", labelsize=7, rotation=40)
        ax.set_title(title + " (best run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs, round-robin only")
    ap.add_argument("--json", default=None, help="write {'runs': [...]} here")
    ap.add_argument("--png", default=None, help="write the chart here")
    ap.add_argument("--markdown", default=None, help="write the table (markdown) here")
    ap.add_argument("--replot", default=None, help="no run: table and chart from this JSON")
    ap.add_argument("--routers", nargs="+", default=None,
                    help="cplane router names (prefix_aware runs Dynamo's kv router)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--half-s", type=float, default=None, help="seconds of the half-load phase")
    ap.add_argument("--low-rate", type=float, default=20.0)
    ap.add_argument("--low-requests", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompt-words", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--prefix-requests", type=int, default=None,
                    help="requests of the prefix-heavy phase (0: none; quick: none)")
    ap.add_argument("--prefix-words", type=int, default=800, help="words per shared document")
    ap.add_argument("--dynamo-venv", default=None, help="Dynamo's own virtual environment")
    ap.add_argument("--http-routers", nargs="*", default=list(HTTP_ROUTERS),
                    choices=list(HTTP_ROUTERS),
                    help="HTTP routers to run in front of bench/zero_engine.py servers")
    ap.add_argument("--chunk-ms", type=float, nargs="*", default=None,
                    help="also run cplane with worker.chunk_interval_ms at each value "
                    "(default: 2; --quick: none, so its rows are per-token streaming only)")
    a = ap.parse_args()
    a.routers = a.routers or (["round_robin"] if a.quick else ["round_robin", "prefix_aware"])
    a.requests = a.requests or (2500 if a.quick else 8000)
    a.half_s = a.half_s or (4.0 if a.quick else 10.0)
    a.low_requests = a.low_requests or (120 if a.quick else 400)
    a.repeats = a.repeats or (1 if a.quick else 2)
    if a.chunk_ms is None:
        a.chunk_ms = [] if a.quick else [2.0]
    if a.prefix_requests is None:
        a.prefix_requests = 0 if a.quick else 800
    bench = Bench(a)
    if a.replot:  # the table and chart again from a JSON this script wrote
        bench.rows = json.loads(Path(a.replot).read_text())["runs"]
    else:
        bench.run()
    Console().print(table(bench.rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": bench.rows, "settings": {
            k: v for k, v in vars(a).items() if k not in ("json", "png", "markdown")}}, indent=1))
    if a.markdown:
        Path(a.markdown).write_text(markdown(bench.rows))
    if a.png:
        plot(bench.rows, Path(a.png))
    return 1 if any(r["errors"] for r in bench.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
