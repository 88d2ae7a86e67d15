"""Fidelity check: one trace slice through the live stack and through the fleet simulator.

The live stack is a private nats-server on a free loopback port, one
orchestrator and N sim workers, each its own process (`python -m cplane.cli`,
as in production), with default settings: the sim engine's default cost
model and `worker.capacity` (64). The simulator gets the same fleet
(`FleetSpec(workers=N, capacity=64)`) and the orchestrator's default decision
configuration.

Each trace request is sent as `prompt_token_ids` of exactly its prompt length
(ids unique to the request from the first token on, so no two prompts share a
prefix block and the live prefix cache stays as cold as the simulator's, which
sees an Azure trace without block hashes), `max_tokens` = its output length,
`ignore_eos`, `temperature=0`. Both sides apply the same caps (`--max-prompt`,
`--max-output`). Requests are published open loop at their rate-scaled trace
times; the client records, on one clock, the publish, the first token chunk and
the Final. TTFT = first chunk - publish; E2E = Final - publish. The simulator
replays the same requests at the offsets they were actually published at (the
schedule's jitter, at most a few ms, is reported), so both sides see the same
arrivals.

    python bench/fidelity.py [--trace PATH] [--requests 500] [--workers 4]
                             [--rate-scale 3] [--out result.json]

Prints TTFT and E2E p50/p90 live vs simulated, each one's error
(sim - live) / live, and the median absolute error of the four.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nats  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402

from bus.server import EmbeddedNats  # noqa: E402
from fleetsim.metrics import percentile  # noqa: E402
from fleetsim.records import TraceRequest  # noqa: E402
from fleetsim.sim import FleetSpec, simulate  # noqa: E402
from fleetsim.workload import load_trace, scale_rate, slice_requests  # noqa: E402
from orchestrator.dispatch import dispatch_config  # noqa: E402
from schemas.codec import encode, output_decoder  # noqa: E402
from schemas.messages import ErrorReply, Final, Priority, Request  # noqa: E402
from schemas.settings import Settings, load_settings  # noqa: E402

DEFAULT_TRACE = ROOT.parent / "shared/traces/AzureLLMInferenceTrace_conv.csv"
METRICS = (("TTFT p50", "ttft", 50.0), ("TTFT p90", "ttft", 90.0),
           ("E2E p50", "e2e", 50.0), ("E2E p90", "e2e", 90.0))
VOCAB = 32_000


# -- the workload ----------------------------------------------------------------
def prepare(reqs: Sequence[TraceRequest], *, count: int, start: int = 0, rate_scale: float = 1.0,
            max_prompt: int = 8192, max_output: int = 2048) -> list[TraceRequest]:
    """`count` requests from position `start`, time compressed by `rate_scale`, lengths
    capped to [1, max_prompt] and [1, max_output]: what both sides run."""
    kept = scale_rate(slice_requests(reqs, start=start, count=count), rate_scale)
    return [replace(r, prompt_tokens=min(max(1, r.prompt_tokens), max_prompt),
                    output_tokens=min(max(1, r.output_tokens), max_output)) for r in kept]


def prompt_ids(index: int, n: int) -> list[int]:
    """`n` deterministic token ids < VOCAB whose first id is unique to `index` (< VOCAB):
    no two requests share a prefix block."""
    return [index % VOCAB] + [(index * 7919 + 31 * j + 1) % VOCAB for j in range(1, n)]


# -- the live stack --------------------------------------------------------------
def _die_with_parent() -> None:
    """In a child: SIGKILL it when this process dies, so no service outlives a crash."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


@dataclass
class Services:
    """The orchestrator and worker processes of one run; `stop()` ends them by pid."""

    url: str
    workers: int
    capacity: int
    log_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env = {k: v for k, v in env.items() if not k.startswith("CPLANE__")}  # defaults only
        cli = [sys.executable, "-m", "cplane.cli"]
        cmds = [("orchestrator", [*cli, "orchestrator", "--nats-url", self.url])]
        for i in range(self.workers):
            cmds.append((f"worker-{i}", [
                *cli, "worker", "--nats-url", self.url, "--engine", "sim", "--model", "sim",
                "--capacity", str(self.capacity), "--worker-id", f"fid-{i}"]))
        for name, argv in cmds:
            with open(self.log_dir / f"{name}.log", "ab") as log:
                self.procs.append(subprocess.Popen(
                    argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent))

    def check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"a service exited with code {p.returncode} "
                                   f"(logs in {self.log_dir})")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs.clear()


@dataclass(slots=True)
class Sample:
    """One live request, client clock (perf_counter seconds)."""

    request_id: str
    publish: float = 0.0
    first: float | None = None
    final: float | None = None
    error: str = ""
    worker: str = ""  # who served it (the Final's last worker)
    tpot_ms: float | None = None  # the worker's own (last - first token) / (n - 1)


async def _wait_workers(nc: Any, settings: Settings, n: int, timeout_s: float) -> None:
    seen: set[str] = set()
    done = asyncio.Event()

    async def on_hb(msg: Msg) -> None:
        seen.add(msg.subject.rpartition(".")[2])
        if len(seen) >= n:
            done.set()

    sub = await nc.subscribe(settings.subjects.heartbeats_all, cb=on_hb)
    try:
        await asyncio.wait_for(done.wait(), timeout_s)
    except TimeoutError:
        raise RuntimeError(f"only {len(seen)} of {n} workers sent a heartbeat "
                           f"within {timeout_s} s") from None
    finally:
        await sub.unsubscribe()


async def _drive(nc: Any, settings: Settings, reqs: Sequence[TraceRequest], tag: str,
                 timeout_s: float, services: Services | None = None) -> list[Sample]:
    """Publish `reqs` open loop at their arrival times; wait for every terminal."""
    subjects = settings.subjects
    js = nc.jetstream()
    req_subject = subjects.request(Priority.NORMAL, "standard")
    samples = [Sample(f"{tag}{i}") for i in range(len(reqs))]
    by_id = {s.request_id: s for s in samples}
    left = len(samples)
    all_done = asyncio.Event()
    bodies = [encode(Request(request_id=s.request_id, prompt_token_ids=prompt_ids(i, r.prompt_tokens),
                             max_tokens=r.output_tokens, temperature=0.0, ignore_eos=True))
              for i, (s, r) in enumerate(zip(samples, reqs, strict=True))]

    async def on_first(msg: Msg) -> None:
        s = by_id.get(msg.subject.rpartition(".")[2])
        if s is not None and s.first is None:
            s.first = time.perf_counter()

    async def on_done(msg: Msg) -> None:
        nonlocal left
        now = time.perf_counter()
        s = by_id.get(msg.subject.rpartition(".")[2])
        if s is None or s.final is not None:
            return
        s.final = now
        out = output_decoder.decode(msg.data)
        if isinstance(out, ErrorReply):
            s.error = f"{out.code}: {out.message}"
        elif isinstance(out, Final):
            s.worker = out.workers[-1] if out.workers else ""
            s.tpot_ms = out.timings.tpot_ms if out.usage.completion_tokens > 1 else None
        left -= 1
        if left == 0:
            all_done.set()

    # Every subscription is in place before the first publish: the first chunk only
    # (max_msgs=1: the server stops sending this client the rest), and the terminals.
    for s in samples:
        await nc.subscribe(subjects.out("i", s.request_id), cb=on_first, max_msgs=1)
    done_sub = await nc.subscribe(subjects.done("i", "*"), cb=on_done)
    await nc.flush()

    acks: list[asyncio.Task[Any]] = []
    start = time.perf_counter()
    for s, r, body in zip(samples, reqs, bodies, strict=True):
        delay = start + r.arrival_ms / 1000 - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        s.publish = time.perf_counter()
        acks.append(asyncio.ensure_future(
            js.publish(req_subject, body, headers={"Nats-Msg-Id": s.request_id}, timeout=30)))
    await asyncio.gather(*acks)
    deadline = time.monotonic() + timeout_s
    while not all_done.is_set():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{left} of {len(samples)} requests had no terminal "
                               f"after {timeout_s} s")
        if services is not None:
            services.check_alive()
        try:
            await asyncio.wait_for(all_done.wait(), 1.0)
        except TimeoutError:
            pass
    await done_sub.unsubscribe()
    for s in samples:
        s.publish -= start
        s.first = None if s.first is None else s.first - start
        s.final = None if s.final is None else s.final - start
    return samples


def _warmup_reqs(n: int) -> list[TraceRequest]:
    return [TraceRequest(f"warm{i}", i * 20.0, 64 + i, 8) for i in range(n)]


async def _live(url: str, reqs: Sequence[TraceRequest], workers: int, capacity: int,
                log_dir: Path, timeout_s: float) -> list[Sample]:
    settings = load_settings(env={}, nats={"url": url})
    services = Services(url, workers, capacity, log_dir)
    services.start()
    try:
        nc = await nats.connect(url, pending_size=256 << 20, connect_timeout=5)
        try:
            await _wait_workers(nc, settings, workers, 60)
            # Every worker busy once (code paths warm), and the orchestrator has seen
            # every worker's heartbeat with it idle again, before the measured slice.
            await _drive(nc, settings, _warmup_reqs(4 * workers), "w-", 60, services)
            await asyncio.sleep(settings.worker.heartbeat_s * 1.5)
            return await _drive(nc, settings, reqs, "r-", timeout_s, services)
        finally:
            await nc.close()
    finally:
        services.stop()


def run_live(reqs: Sequence[TraceRequest], *, workers: int, capacity: int = 64,
             timeout_s: float = 300.0, log_dir: str | Path | None = None) -> list[Sample]:
    """`reqs` through a fresh live stack; one Sample per request, times in s from the start."""
    import uvloop

    logs = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="cplane-fidelity-"))
    logs.mkdir(parents=True, exist_ok=True)
    with EmbeddedNats() as server:
        return uvloop.run(_live(server.url, reqs, workers, capacity, logs, timeout_s))


# -- the simulator -----------------------------------------------------------------
def as_published(reqs: Sequence[TraceRequest], samples: Sequence[Sample]) -> list[TraceRequest]:
    """The requests at the offsets the live client actually published them."""
    return [replace(r, arrival_ms=s.publish * 1000)
            for r, s in zip(reqs, samples, strict=True)]


def run_sim(reqs: Sequence[TraceRequest], *, workers: int, capacity: int = 64,
            fleet: FleetSpec | None = None) -> dict[str, list[float]]:
    """TTFT and E2E (ms) of every request the simulator finished."""
    spec = fleet or FleetSpec(workers=workers, capacity=capacity)
    res = simulate(reqs, spec, dispatch_config(Settings().orchestrator), seed=0)
    ttft = [r.ttft_ms for r in res.records if r.ttft_ms is not None and not r.rejected]
    e2e = [r.e2e_ms for r in res.records if r.e2e_ms is not None and not r.rejected]
    return {"ttft": ttft, "e2e": e2e}


def live_latencies(samples: Sequence[Sample]) -> dict[str, list[float]]:
    ok = [s for s in samples if not s.error and s.first is not None and s.final is not None]
    return {"ttft": [(s.first - s.publish) * 1000 for s in ok if s.first is not None],
            "e2e": [(s.final - s.publish) * 1000 for s in ok if s.final is not None]}


# -- the comparison ------------------------------------------------------------------
def compare(live: dict[str, list[float]], sim: dict[str, list[float]]) -> dict[str, Any]:
    """Per metric: live, simulated, error % ((sim - live) / live); and the median |error|."""
    rows = []
    for name, key, p in METRICS:
        lv, sv = percentile(live[key], p), percentile(sim[key], p)
        err = None if lv is None or sv is None or lv == 0 else (sv - lv) / lv * 100
        rows.append({"metric": name, "live_ms": lv, "sim_ms": sv, "error_pct": err})
    errs = [abs(r["error_pct"]) for r in rows if r["error_pct"] is not None]
    return {"rows": rows, "median_abs_error_pct": statistics.median(errs) if errs else None}


def fidelity(reqs: Sequence[TraceRequest], *, workers: int, capacity: int = 64,
             timeout_s: float = 300.0, log_dir: str | Path | None = None,
             fleet: FleetSpec | None = None) -> dict[str, Any]:
    """Run `reqs` live and simulated; the comparison plus what each side saw."""
    t0 = time.perf_counter()
    samples = run_live(reqs, workers=workers, capacity=capacity, timeout_s=timeout_s,
                       log_dir=log_dir)
    live_s = time.perf_counter() - t0
    live = live_latencies(samples)
    sim = run_sim(as_published(reqs, samples), workers=workers, capacity=capacity, fleet=fleet)
    out = compare(live, sim)
    lags = [s.publish * 1000 - r.arrival_ms for r, s in zip(reqs, samples, strict=True)]
    out.update({
        "requests": len(reqs), "workers": workers, "capacity": capacity,
        "live_ok": len(live["e2e"]), "live_errors": sorted({s.error for s in samples if s.error}),
        "sim_ok": len(sim["e2e"]),
        "arrival_span_s": max(r.arrival_ms for r in reqs) / 1000 if reqs else 0.0,
        "publish_lag_ms": {"max": max(lags, default=0.0),
                           "p50": percentile(lags, 50) or 0.0},
        "live_wall_s": live_s,
        "live": {k: {"p50": percentile(v, 50), "p90": percentile(v, 90),
                     "p99": percentile(v, 99), "mean": statistics.fmean(v) if v else None}
                 for k, v in live.items()},
        "sim": {k: {"p50": percentile(v, 50), "p90": percentile(v, 90),
                    "p99": percentile(v, 99), "mean": statistics.fmean(v) if v else None}
                for k, v in sim.items()},
    })
    return out


def show(res: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("metric")
    t.add_column("live (ms)", justify="right")
    t.add_column("simulated (ms)", justify="right")
    t.add_column("error %", justify="right")

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:,.1f}"

    for row in res["rows"]:
        err = row["error_pct"]
        t.add_row(row["metric"], ms(row["live_ms"]), ms(row["sim_ms"]),
                  "-" if err is None else f"{err:+.1f}")
    med = res["median_abs_error_pct"]
    t.add_row("median |error|", "", "", "-" if med is None else f"{med:.1f}", style="bold")
    console = Console()
    console.print(t)
    console.print(
        f"{res['live_ok']}/{res['requests']} live requests ok, {res['sim_ok']} simulated; "
        f"arrivals over {res['arrival_span_s']:.1f} s, publish lag p50 "
        f"{res['publish_lag_ms']['p50']:.2f} / max {res['publish_lag_ms']['max']:.1f} ms; "
        f"live run {res['live_wall_s']:.1f} s")
    if res["live_errors"]:
        console.print(f"live errors: {res['live_errors']}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", default=str(DEFAULT_TRACE), help="Azure CSV or Mooncake JSONL")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--start", type=int, default=0, help="first trace row of the slice")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--capacity", type=int, default=64, help="worker.capacity, both sides")
    ap.add_argument("--rate-scale", type=float, default=3.0,
                    help="compress the trace's time by this factor (3 = 3x the request rate)")
    ap.add_argument("--max-prompt", type=int, default=8192, help="prompt token cap, both sides")
    ap.add_argument("--max-output", type=int, default=2048, help="output token cap, both sides")
    ap.add_argument("--timeout", type=float, default=300.0, help="live run: wait this long")
    ap.add_argument("--logs", default=None, help="service logs here (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    args = ap.parse_args(argv)
    trace = load_trace(args.trace, limit=args.start + args.requests)
    reqs = prepare(trace, count=args.requests, start=args.start, rate_scale=args.rate_scale,
                   max_prompt=args.max_prompt, max_output=args.max_output)
    if not reqs:
        print(f"no requests in {args.trace} from row {args.start}", file=sys.stderr)
        return 1
    res = fidelity(reqs, workers=args.workers, capacity=args.capacity, timeout_s=args.timeout,
                   log_dir=args.logs)
    res["args"] = vars(args)
    show(res, f"fleetsim fidelity: {len(reqs)} requests of {Path(args.trace).name}, "
              f"{args.workers} sim workers x {args.capacity}, rate x{args.rate_scale:g}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
