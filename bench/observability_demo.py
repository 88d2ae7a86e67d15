"""A demo run scraped like Prometheus would, drawn as the Grafana dashboard's panels.

    .venv/bin/python bench/observability_demo.py [--seconds 40] [--out FILE.png]

Starts the `cplane up` stack (embedded nats-server, orchestrator, 2 sim
workers of 8 slots, each process with its own /metrics port), sends a mixed
load for `--seconds` (five priorities, three SLO classes, three tenants, a
burst in the middle that queues and sheds, a few cancels and invalid
requests), scrapes every /metrics every 2 s, then evaluates each panel of
deploy/grafana/dashboard.py on those scrapes (the same queries, computed
here: no Prometheus, no Grafana on this machine) and renders them with
matplotlib. It prints `get_metrics()` at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import random
import sys
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cplane.client.control import ControlPlane  # noqa: E402
from cplane.client.sdk import Client, Overloaded, RequestFailed, new_request_id  # noqa: E402
from cplane.schemas.messages import Priority, Request  # noqa: E402
from cplane.schemas.settings import load_settings  # noqa: E402
from cplane.stack import Stack, StackSpec  # noqa: E402

Sample = tuple[str, dict[str, str], float]
Scrape = tuple[float, list[Sample]]


def _dashboard() -> Any:
    path = ROOT / "deploy" / "grafana" / "dashboard.py"
    spec = importlib.util.spec_from_file_location("cplane_dashboard", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cplane_dashboard"] = module
    spec.loader.exec_module(module)
    return module


def scrape(ports: Iterable[int]) -> list[Sample]:
    out: list[Sample] = []
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            for fam in text_string_to_metric_families(r.read().decode()):
                out.extend((s.name, dict(s.labels), s.value) for s in fam.samples)
    return out


# -- the panels' queries, on raw scrapes --------------------------------------------------
def _grouped(samples: list[Sample], name: str, q: Any, extra: str = ""
             ) -> dict[tuple[str, ...], float]:
    keys = (*q.by, extra) if extra else q.by
    out: dict[tuple[str, ...], float] = {}
    for n, labels, v in samples:
        if n != name or any(labels.get(k) != want for k, want in q.match):
            continue
        key = tuple(labels.get(k, "") for k in keys)
        if q.agg == "max":
            out[key] = max(out.get(key, -math.inf), v)
        elif q.agg == "min":
            out[key] = min(out.get(key, math.inf), v)
        else:
            out[key] = out.get(key, 0.0) + v
    return out


def _rate(a: Scrape, b: Scrape, name: str, q: Any, extra: str = "") -> dict[tuple[str, ...], float]:
    before, after = _grouped(a[1], name, q, extra), _grouped(b[1], name, q, extra)
    dt = b[0] - a[0]
    return {k: (v - before.get(k, 0.0)) / dt for k, v in after.items()}


def _quantile(a: Scrape, b: Scrape, q: Any) -> float:
    buckets = _rate(a, b, q.name + "_bucket", q, "le")
    cum = sorted(((float(k[-1]), v) for k, v in buckets.items()), key=lambda x: x[0])
    if not cum or cum[-1][1] <= 0:
        return math.nan
    rank = q.q * cum[-1][1]
    prev_b, prev_c = 0.0, 0.0
    for bound, c in cum:
        if c >= rank:
            if math.isinf(bound):
                return prev_b
            return prev_b + (bound - prev_b) * (rank - prev_c) / max(c - prev_c, 1e-12)
        prev_b, prev_c = bound, c
    return prev_b


def series(scrapes: list[Scrape], q: Any, window: int) -> dict[tuple[str, ...], list[float]]:
    """One value per scrape (NaN before the window fills), per label group."""
    out: dict[tuple[str, ...], list[float]] = {}
    n = len(scrapes)
    for i in range(n):
        if q.op == "gauge":
            vals = _grouped(scrapes[i][1], q.name, q)
        elif i < 1:
            vals = {}
        else:
            a, b = scrapes[max(0, i - window)], scrapes[i]
            if q.op == "rate":
                vals = _rate(a, b, q.name, q)
            elif q.op == "quantile":
                vals = {(): _quantile(a, b, q)}
            else:  # ratio
                num, den = _rate(a, b, q.name, q), _rate(a, b, q.den, q)
                vals = {k: (num.get(k, 0.0) / d if d > 0 else math.nan) for k, d in den.items()}
        for k, v in vals.items():
            out.setdefault(k, [math.nan] * n)[i] = v
    return out


def legend(fmt: str, keys: tuple[str, ...], values: tuple[str, ...]) -> str:
    for k, v in zip(keys, values, strict=False):
        fmt = fmt.replace("{{" + k + "}}", v)
    return fmt


def render(scrapes: list[Scrape], out: Path, seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dash = _dashboard()
    panels = dash.PANELS
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 3.1 * rows))
    t0 = scrapes[0][0]
    xs = [t - t0 for t, _ in scrapes]
    for ax, panel in zip(axes.flat, panels, strict=False):
        for fmt, _, q in panel.targets:
            for key, ys in sorted(series(scrapes, q, window=5).items()):
                if all(math.isnan(y) for y in ys):
                    continue
                ax.plot(xs, ys, label=legend(fmt, q.by, key)[:40], linewidth=1.3)
        ax.set_title(panel.title, fontsize=10, loc="left")
        ax.set_ylabel(panel.unit, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left", ncol=2)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("cplane: the panels of deploy/grafana/cplane.json, drawn with matplotlib from "
                 f"/metrics scrapes (every 2 s) of a {seconds:.0f} s demo run "
                 "(bench/observability_demo.py) - not a Grafana screenshot", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(out, dpi=60)
    print(f"wrote {out}")


# -- the demo load ------------------------------------------------------------------------
async def load(url: str, seconds: float, rng: random.Random) -> dict[str, int]:
    settings = load_settings(nats={"url": url})
    client = await Client.connect(url, settings)
    counts = {"sent": 0, "ok": 0, "failed": 0, "cancelled": 0, "refused": 0}
    tasks: list[asyncio.Task[None]] = []

    async def one(burst: bool) -> None:
        req = Request(request_id=new_request_id(), prompt="Tell me about NATS " *
                      rng.randint(4, 80), max_tokens=rng.randint(16, 160), ignore_eos=True,
                      tenant=rng.choice(("acme", "globex", "initech")))
        try:
            handle = await client.submit(req, priority=rng.choice(list(Priority)),
                                         slo_class=rng.choice(("interactive", "standard",
                                                               "batch")))
        except Overloaded:
            counts["refused"] += 1
            return
        counts["sent"] += 1
        try:
            final = await handle.result(120)
            counts["cancelled" if final.finish_reason == "cancelled" else "ok"] += 1
        except RequestFailed:
            counts["failed"] += 1

    cp = await ControlPlane.connect(url, settings)
    start = time.monotonic()
    burst_done = False
    while (elapsed := time.monotonic() - start) < seconds:
        tasks.append(asyncio.create_task(one(False)))
        if not burst_done and elapsed > seconds * 0.4:  # a burst: queues, sheds
            burst_done = True
            tasks.extend(asyncio.create_task(one(True)) for _ in range(80))
        if rng.random() < 0.05:  # an invalid request: rejected by the orchestrator
            await client.nc.jetstream().publish(settings.subjects.request("normal"), b"{oops")
        if rng.random() < 0.04 and client._open:
            victim = next(iter(client._open)).request_id
            await cp.cancel_request(victim)
        await asyncio.sleep(rng.expovariate(10.0))
    await asyncio.gather(*tasks)
    await cp.close()
    await client.close()
    return counts


async def run(stack: Stack, seconds: float) -> list[Scrape]:
    scrapes: list[Scrape] = []
    done = asyncio.Event()

    async def scraper() -> None:
        while not done.is_set():
            try:
                samples = await asyncio.to_thread(scrape, stack.metrics_ports)
                scrapes.append((time.time(), samples))
            except OSError as exc:  # a service still starting: as Prometheus, skip a round
                print(f"scrape failed: {exc}")
            await asyncio.sleep(2.0)

    task = asyncio.create_task(scraper())
    await asyncio.sleep(4.0)  # a baseline before the load
    counts = await load(stack.url, seconds, random.Random(7))
    await asyncio.sleep(6.0)  # the rates come back down
    done.set()
    await task
    print(f"client: {counts}")
    async with await ControlPlane.connect(stack.url, load_settings(nats={"url": stack.url})) as cp:
        m = await cp.get_metrics()
    print(f"get_metrics: total={m.total} completed={m.completed} cancelled={m.cancelled} "
          f"rejected={m.rejected} shed={m.shed} ttft mean/p99 ms={m.ttft.mean_ms:.1f}/"
          f"{m.ttft.p99_ms:.1f} e2e p50/p99 ms={m.e2e.p50_ms:.0f}/{m.e2e.p99_ms:.0f} "
          f"slo compliance={m.slo_compliance:.3f}")
    return scrapes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "observability-dashboard.png"))
    args = ap.parse_args()
    stack = Stack(StackSpec(workers=2, capacity=8, gateway=False))
    stack.start(timeout_s=60)
    try:
        scrapes = asyncio.run(run(stack, args.seconds))
    finally:
        stack.stop()
    render(scrapes, Path(args.out), args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
