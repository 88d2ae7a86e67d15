"""Fidelity check: one trace slice through the live stack and through the fleet simulator.

The live stack is a private nats-server on a free loopback port (its JetStream
file store on tmpfs where there is one, see DEFAULT_STORE), one orchestrator
and N sim workers, each its own process (`python -m cplane.cli`, as in
production), all with default settings: the sim engine's default cost model
and `worker.capacity` (64). The simulator gets the same fleet
(`FleetSpec(workers=N, capacity=64)`, default delays) and the orchestrator's
default decision configuration (`dispatch_config(Settings().orchestrator)`).

Each trace request is sent as `prompt_token_ids` of exactly its prompt length
(see `prompt_ids`: no two Azure prompts share a prefix block, so the live
prefix cache stays as cold as the simulator's; Mooncake block hashes become
equal blocks), `max_tokens` = its output length, `ignore_eos`,
`temperature=0`. Both sides apply the same caps (`--max-prompt`,
`--max-output`). Requests are published open loop at their rate-scaled trace
times after a short warm-up; the client records, on one clock, the publish,
the first token chunk and the Final. TTFT = first chunk - publish; E2E =
Final - publish. The simulator replays the same requests at the offsets they
were actually published at (the schedule's lag, well under the messaging
delays, is reported), so both sides see the same arrivals.

    python bench/fidelity.py [--trace PATH] [--requests 500] [--workers 4]
                             [--rate-scale 3] [--out result.json]

Prints TTFT and E2E p50/p90 live vs simulated, each one's error
(sim - live) / live, the median absolute error of the four, where the median
TTFT goes on each side (publish -> dispatched, -> first token out of the
engine, -> at the client), TPOT, and the CPU the live run used. `--out` also
keeps every request's figures on both sides.

What this found and what was fixed (2026-11-29, 2-core host): the live sim
engine slept each step's modelled time after the loop's own work and ran
4-10 % slower than its model (it now keeps its own step clock); the
simulator handed pool work strictly in turn, where JetStream serves the
oldest waiting pull request (it now gives pool work to the worker with room
that took work longest ago). After both, 500 requests on 4 workers: every
figure within 6 %, median |error| 3.1 %. Left: TTFT p90 on two workers runs
about 20 % low in the simulator (live pulls clump more when two workers race).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import shutil
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

import msgspec  # noqa: E402
import nats  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402

from cplane.bus.server import EmbeddedNats  # noqa: E402
from cplane.fleetsim.metrics import percentile  # noqa: E402
from cplane.fleetsim.records import RequestRecord, TraceRequest  # noqa: E402
from cplane.fleetsim.sim import FleetSpec, simulate  # noqa: E402
from cplane.fleetsim.workload import load_trace, scale_rate, slice_requests  # noqa: E402
from cplane.orchestrator.dispatch import dispatch_config  # noqa: E402
from cplane.schemas.codec import encode, output_decoder  # noqa: E402
from cplane.schemas.messages import ErrorReply, Final, Priority, Request  # noqa: E402
from cplane.schemas.settings import Settings, SimSettings, load_settings  # noqa: E402
from cplane.stack import heartbeats_seen, stop_processes  # noqa: E402

DEFAULT_TRACE = ROOT.parent / "shared/traces/AzureLLMInferenceTrace_conv.csv"
# The JetStream store goes to tmpfs where there is one: the simulator has no disk, and a
# shared disk's fsync stalls (measured here: 60-360 ms, a few per minute) would land in
# the live tails as noise. It is still nats-server's file store, synced every 100 ms.
DEFAULT_STORE = "/dev/shm" if os.path.isdir("/dev/shm") else None
METRICS = (("TTFT p50", "ttft", 50.0), ("TTFT p90", "ttft", 90.0),
           ("E2E p50", "e2e", 50.0), ("E2E p90", "e2e", 90.0))
VOCAB = 32_000  # SimSettings.vocab_size
BLOCK_TOKENS = SimSettings().prefix_block_tokens  # Mooncake's hash_ids are per 512 tokens


# -- the workload ----------------------------------------------------------------
def prepare(reqs: Sequence[TraceRequest], *, count: int, start: int = 0, rate_scale: float = 1.0,
            max_prompt: int = 8192, max_output: int = 2048) -> list[TraceRequest]:
    """`count` requests from position `start`, time compressed by `rate_scale`, lengths
    capped to [1, max_prompt] and [1, max_output] (block hashes cut to the prompt kept):
    what both sides run."""
    kept = scale_rate(slice_requests(reqs, start=start, count=count), rate_scale)
    out = []
    for r in kept:
        prompt = min(max(1, r.prompt_tokens), max_prompt)
        out.append(replace(r, prompt_tokens=prompt,
                           output_tokens=min(max(1, r.output_tokens), max_output),
                           block_hashes=r.block_hashes[:-(-prompt // BLOCK_TOKENS)]))
    return out


def prompt_ids(index: int, r: TraceRequest) -> list[int]:
    """`r.prompt_tokens` deterministic ids < VOCAB. A block with a trace block hash gets
    ids drawn from that hash, so equal hashes are equal prefixes live too (Mooncake); the
    rest is unique to the request from its first token on (index < VOCAB), so requests
    without hashes (Azure) share no prefix block: the live prefix cache stays as cold as
    the simulator's."""
    ids: list[int] = []
    for h in r.block_hashes:
        ids.extend(hash((h, k)) % VOCAB for k in range(BLOCK_TOKENS))
    n = r.prompt_tokens
    if len(ids) >= n:
        return ids[:n]
    tail = [index % VOCAB] + [hash((index, k)) % VOCAB for k in range(1, n - len(ids))]
    return ids + tail


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
    zero_cost: bool = False  # free engine steps: what is left is messaging
    nats_pid: int | None = None  # counted in cpu_s() too
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env = {k: v for k, v in env.items() if not k.startswith("CPLANE__")}  # defaults only
        cli = [sys.executable, "-m", "cplane.cli"]
        cmds = [("orchestrator", [*cli, "orchestrator", "--nats-url", self.url])]
        for i in range(self.workers):
            cmds.append((f"worker-{i}", [
                *cli, "worker", "--nats-url", self.url, "--engine", "sim", "--model", "sim",
                "--capacity", str(self.capacity), "--worker-id", f"fid-{i}",
                *(["--zero-cost"] if self.zero_cost else [])]))
        for name, argv in cmds:
            self.names.append(name)
            with open(self.log_dir / f"{name}.log", "ab") as log:
                self.procs.append(subprocess.Popen(
                    argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent))

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds (user + system) used so far by each service, and by nats-server."""
        pids = {name: p.pid for name, p in zip(self.names, self.procs, strict=True)}
        if self.nats_pid:
            pids["nats-server"] = self.nats_pid
        out = {}
        tick = os.sysconf("SC_CLK_TCK")
        for name, pid in pids.items():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
                out[name] = (int(fields[11]) + int(fields[12])) / tick
            except (OSError, ValueError, IndexError):
                pass
        out["client"] = sum(os.times()[:2])
        return out

    def check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"a service exited with code {p.returncode} "
                                   f"(logs in {self.log_dir})")

    def stop(self) -> None:
        stop_processes(self.procs, 20)


@dataclass(slots=True)
class Sample:
    """One live request: client clock (perf_counter s, from the run's start) and what its
    Final said."""

    request_id: str
    publish: float = 0.0
    first: float | None = None
    final: float | None = None
    error: str = ""
    worker: str = ""  # who served it (the Final's last worker)
    wall_ms: float = 0.0  # time.time() at publish (ms), to place the Final's server times
    timings: dict[str, float] = field(default_factory=dict)  # the Final's, plus its ts_ms
    completion_tokens: int = 0

    def split(self) -> dict[str, float] | None:
        """publish -> dispatched (intake), dispatched -> first token out of the engine
        (work + engine), first token out -> client (token); ms, server clocks of one host."""
        t = self.timings
        if not t or self.first is None:
            return None
        stored = t["ts_ms"] - t["e2e_ms"]  # when JetStream stored the request
        first_out = stored + t["ttft_ms"]
        first_seen = self.wall_ms + (self.first - self.publish) * 1000
        return {"intake": stored - self.wall_ms + t["queue_ms"],
                "engine": t["ttft_ms"] - t["queue_ms"],
                "token": first_seen - first_out}


class _Collector:
    """The client side of one run: subscriptions first, then open-loop publishes."""

    def __init__(self, nc: Any, settings: Settings, reqs: Sequence[TraceRequest], tag: str):
        self.nc = nc
        self.subjects = settings.subjects
        self.reqs = reqs
        self.samples = [Sample(f"{tag}{i}") for i in range(len(reqs))]
        self.by_id = {s.request_id: s for s in self.samples}
        self.left = len(self.samples)
        self.all_done = asyncio.Event()

    async def on_first(self, msg: Msg) -> None:
        s = self.by_id.get(msg.subject.rpartition(".")[2])
        if s is not None and s.first is None:
            s.first = time.perf_counter()

    async def on_done(self, msg: Msg) -> None:
        now = time.perf_counter()
        s = self.by_id.get(msg.subject.rpartition(".")[2])
        if s is None or s.final is not None:
            return
        s.final = now
        out = output_decoder.decode(msg.data)
        if isinstance(out, ErrorReply):
            s.error = f"{out.code}: {out.message}"
        elif isinstance(out, Final):
            s.worker = out.workers[-1] if out.workers else ""
            s.completion_tokens = out.usage.completion_tokens
            s.timings = {**msgspec.structs.asdict(out.timings), "ts_ms": out.ts_ms}
        self.left -= 1
        if self.left == 0:
            self.all_done.set()

    async def run(self, timeout_s: float, services: Services | None) -> list[Sample]:
        nc, subjects = self.nc, self.subjects
        js = nc.jetstream()
        req_subject = subjects.request(Priority.NORMAL, "standard")
        bodies = [encode(Request(request_id=s.request_id,
                                 prompt_token_ids=prompt_ids(i, r),
                                 max_tokens=r.output_tokens, temperature=0.0, ignore_eos=True))
                  for i, (s, r) in enumerate(zip(self.samples, self.reqs, strict=True))]
        # Every subscription is in place before the first publish: the first chunk only
        # (max_msgs=1: the server stops sending this client the rest), and the terminals.
        for s in self.samples:
            await nc.subscribe(subjects.out("i", s.request_id), cb=self.on_first, max_msgs=1)
        done_sub = await nc.subscribe(subjects.done("i", "*"), cb=self.on_done)
        await nc.flush()
        acks: list[asyncio.Future[Any]] = []
        start = time.perf_counter()
        for s, r, body in zip(self.samples, self.reqs, bodies, strict=True):
            delay = start + r.arrival_ms / 1000 - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            s.publish = time.perf_counter()
            s.wall_ms = time.time() * 1000
            acks.append(asyncio.ensure_future(js.publish(
                req_subject, body, headers={"Nats-Msg-Id": s.request_id}, timeout=30)))
        await asyncio.gather(*acks)
        deadline = time.monotonic() + timeout_s
        while not self.all_done.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.left} of {len(self.samples)} requests had no "
                                   f"terminal after {timeout_s} s")
            if services is not None:
                services.check_alive()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.all_done.wait(), 1.0)
        await done_sub.unsubscribe()
        for s in self.samples:
            s.publish -= start
            s.first = None if s.first is None else s.first - start
            s.final = None if s.final is None else s.final - start
        return self.samples


async def _wait_workers(nc: Any, settings: Settings, n: int, timeout_s: float) -> None:
    seen = await heartbeats_seen(nc, settings.subjects, n, timeout_s)
    if len(seen) < n:
        raise RuntimeError(f"only {len(seen)} of {n} workers sent a heartbeat "
                           f"within {timeout_s} s")


def _warmup_reqs(n: int) -> list[TraceRequest]:
    return [TraceRequest(f"warm{i}", i * 20.0, 64 + i, 8) for i in range(n)]


@dataclass(slots=True)
class LiveRun:
    samples: list[Sample]
    cpu_s: dict[str, float]  # CPU seconds each service used during the measured slice
    wall_s: float  # first publish -> last terminal


async def _live(url: str, reqs: Sequence[TraceRequest], services: Services,
                timeout_s: float) -> LiveRun:
    settings = load_settings(env={}, nats={"url": url})
    services.start()
    try:
        nc = await nats.connect(url, pending_size=256 << 20, connect_timeout=5)
        try:
            await _wait_workers(nc, settings, services.workers, 60)
            # Every worker busy once (code paths warm), and the orchestrator has seen
            # every worker's heartbeat with it idle again, before the measured slice.
            warm = _warmup_reqs(4 * services.workers)
            await _Collector(nc, settings, warm, "w-").run(60, services)
            await asyncio.sleep(settings.worker.heartbeat_s * 1.5)
            cpu0 = services.cpu_s()
            samples = await _Collector(nc, settings, reqs, "r-").run(timeout_s, services)
            cpu1 = services.cpu_s()
        finally:
            await nc.close()
    finally:
        services.stop()
    ends = [s.final for s in samples if s.final is not None]
    return LiveRun(samples, {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1},
                   max(ends, default=0.0))


def run_live(reqs: Sequence[TraceRequest], *, workers: int, capacity: int = 64,
             timeout_s: float = 300.0, log_dir: str | Path | None = None,
             zero_cost: bool = False, store_in: str | None = DEFAULT_STORE) -> LiveRun:
    """`reqs` through a fresh live stack (its own nats-server and service processes).

    `store_in`: the folder the JetStream store is made in (None: the system temp dir).
    """
    import uvloop

    logs = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="cplane-fidelity-"))
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cplane-fidelity-js-", dir=store_in) as store, \
            EmbeddedNats(store_dir=store) as server:
        services = Services(server.url, workers, capacity, logs, zero_cost,
                            nats_pid=server.proc.pid if server.proc else None)
        try:
            run = uvloop.run(_live(server.url, reqs, services, timeout_s))
        except Exception as exc:
            exc.add_note(f"service logs: {logs}")
            raise
        finally:
            with contextlib.suppress(OSError):
                shutil.copy(Path(store, "server.log"), logs / "nats-server.log")
    if not log_dir:  # kept only when the run failed (the error names the folder)
        shutil.rmtree(logs, ignore_errors=True)
    return run


# -- the simulator -----------------------------------------------------------------
def as_published(reqs: Sequence[TraceRequest], samples: Sequence[Sample]) -> list[TraceRequest]:
    """The requests at the offsets the live client actually published them."""
    return [replace(r, arrival_ms=s.publish * 1000)
            for r, s in zip(reqs, samples, strict=True)]


def run_sim(reqs: Sequence[TraceRequest], *, workers: int, capacity: int = 64,
            fleet: FleetSpec | None = None) -> list[RequestRecord]:
    """The simulator's record of every request, same fleet, default decision config."""
    spec = fleet or FleetSpec(workers=workers, capacity=capacity)
    return simulate(reqs, spec, dispatch_config(Settings().orchestrator), seed=0).records


def live_latencies(samples: Sequence[Sample]) -> dict[str, list[float]]:
    ok = [s for s in samples if not s.error and s.first is not None and s.final is not None]
    return {"ttft": [(s.first - s.publish) * 1000 for s in ok if s.first is not None],
            "e2e": [(s.final - s.publish) * 1000 for s in ok if s.final is not None]}


def sim_latencies(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    ok = [r for r in records if not r.rejected]
    return {"ttft": [r.ttft_ms for r in ok if r.ttft_ms is not None],
            "e2e": [r.e2e_ms for r in ok if r.e2e_ms is not None]}


def _sim_split(rec: RequestRecord, fleet: FleetSpec) -> dict[str, float] | None:
    if rec.dispatched_ms is None or rec.first_token_ms is None:
        return None
    return {"intake": rec.dispatched_ms - rec.req.arrival_ms,
            "engine": rec.first_token_ms - fleet.token_ms - rec.dispatched_ms,
            "token": fleet.token_ms}


def _split_p50(splits: Sequence[dict[str, float] | None]) -> dict[str, float | None]:
    ok = [x for x in splits if x is not None]
    return {k: percentile([x[k] for x in ok], 50) for k in ("intake", "engine", "token")}


def _dist(values: Sequence[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "mean": statistics.fmean(values) if values else None}


# -- the comparison ------------------------------------------------------------------
def compare(live: dict[str, list[float]], sim: dict[str, list[float]]) -> dict[str, Any]:
    """Per metric: live, simulated, error % ((sim - live) / live); and the median |error|."""
    rows: list[dict[str, Any]] = []
    errs: list[float] = []
    for name, key, p in METRICS:
        lv, sv = percentile(live[key], p), percentile(sim[key], p)
        err = None if lv is None or sv is None or lv == 0 else (sv - lv) / lv * 100
        rows.append({"metric": name, "live_ms": lv, "sim_ms": sv, "error_pct": err})
        if err is not None:
            errs.append(abs(err))
    return {"rows": rows, "median_abs_error_pct": statistics.median(errs) if errs else None}


def fidelity(reqs: Sequence[TraceRequest], *, workers: int, capacity: int = 64,
             timeout_s: float = 300.0, log_dir: str | Path | None = None,
             fleet: FleetSpec | None = None,
             store_in: str | None = DEFAULT_STORE) -> dict[str, Any]:
    """Run `reqs` live, then simulated at the offsets they were published at; the
    comparison, and what each side saw."""
    run = run_live(reqs, workers=workers, capacity=capacity, timeout_s=timeout_s,
                   log_dir=log_dir, store_in=store_in)
    return evaluate(reqs, run, fleet or FleetSpec(workers=workers, capacity=capacity))


def evaluate(reqs: Sequence[TraceRequest], run: LiveRun, spec: FleetSpec) -> dict[str, Any]:
    """Simulate what `run` did live on the fleet `spec`; the comparison and details."""
    samples = run.samples
    workers, capacity = spec.workers, spec.capacity
    records = run_sim(as_published(reqs, samples), workers=workers, capacity=capacity,
                      fleet=spec)
    live, sim = live_latencies(samples), sim_latencies(records)
    by_id = {r.req.request_id: r for r in records}
    out = compare(live, sim)
    lags = [s.publish * 1000 - r.arrival_ms for r, s in zip(reqs, samples, strict=True)]
    live_tpot = [s.timings["tpot_ms"] for s in samples
                 if s.timings and s.completion_tokens > 1]
    sim_tpot = [r.tpot_ms for r in records if r.tpot_ms is not None]
    out.update({
        "requests": len(reqs), "workers": workers, "capacity": capacity,
        "fleet": {k: getattr(spec, k) for k in
                  ("intake_ms", "work_ms", "done_ms", "token_ms", "heartbeat_ms")},
        "live_ok": len(live["e2e"]), "live_errors": sorted({s.error for s in samples if s.error}),
        "sim_ok": len(sim["e2e"]),
        "arrival_span_s": max(r.arrival_ms for r in reqs) / 1000 if reqs else 0.0,
        "publish_lag_ms": {"max": max(lags, default=0.0), "p50": percentile(lags, 50) or 0.0},
        "live_wall_s": run.wall_s,
        "live_cpu_s": run.cpu_s,
        "live": {k: _dist(v) for k, v in live.items()},
        "sim": {k: _dist(v) for k, v in sim.items()},
        # Where TTFT goes (medians, ms): publish -> dispatched, dispatched -> first token
        # out of the engine, and -> at the client.
        "ttft_split_p50": {"live": _split_p50([s.split() for s in samples]),
                           "sim": _split_p50([_sim_split(r, spec) for r in records])},
        "tpot_p50_ms": {"live": percentile(live_tpot, 50), "sim": percentile(sim_tpot, 50)},
        "per_request": [_pair(r, s, by_id.get(r.request_id))
                        for r, s in zip(reqs, samples, strict=True)],
    })
    return out


def _pair(r: TraceRequest, s: Sample, rec: RequestRecord | None) -> dict[str, Any]:
    """One request, both sides (ms; None where it has no value)."""
    def ms(t: float | None) -> float | None:
        return None if t is None else round((t - s.publish) * 1000, 3)

    return {"id": r.request_id, "prompt": r.prompt_tokens, "output": r.output_tokens,
            "publish_ms": round(s.publish * 1000, 3),
            "live": {"ttft": ms(s.first), "e2e": ms(s.final), "worker": s.worker,
                     "error": s.error, "split": s.split()},
            "sim": None if rec is None else {"ttft": rec.ttft_ms, "e2e": rec.e2e_ms,
                                             "worker": rec.worker}}


def show(res: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("metric")
    t.add_column("live (ms)", justify="right")
    t.add_column("simulated (ms)", justify="right")
    t.add_column("error %", justify="right")

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:,.2f}" if abs(v) < 10 else f"{v:,.1f}"

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
    split = res["ttft_split_p50"]
    parts = ", ".join(f"{k} {ms(split['live'][k])} / {ms(split['sim'][k])}"
                      for k in ("intake", "engine", "token"))
    tpot = res["tpot_p50_ms"]
    console.print(f"TTFT split p50 live / sim (ms): {parts}; TPOT p50 "
                  f"{ms(tpot['live'])} / {ms(tpot['sim'])}")
    cpu = res["live_cpu_s"]
    busy = sum(cpu.values()) / max(res["live_wall_s"], 1e-9) / (os.cpu_count() or 1)
    console.print(f"live CPU: {busy:.0%} of {os.cpu_count()} cores ("
                  + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(cpu.items())) + ")")
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
    ap.add_argument("--store-dir", default=DEFAULT_STORE,
                    help="make the JetStream store in this folder (default: %(default)s; "
                    "'' = the system temp dir)")
    ap.add_argument("--logs", default=None,
                    help="keep the service logs here (default: a temp dir, kept on failure)")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    args = ap.parse_args(argv)
    trace = load_trace(args.trace, limit=args.start + args.requests)
    reqs = prepare(trace, count=args.requests, start=args.start, rate_scale=args.rate_scale,
                   max_prompt=args.max_prompt, max_output=args.max_output)
    if not reqs:
        print(f"no requests in {args.trace} from row {args.start}", file=sys.stderr)
        return 1
    res = fidelity(reqs, workers=args.workers, capacity=args.capacity, timeout_s=args.timeout,
                   log_dir=args.logs, store_in=args.store_dir or None)
    res["args"] = vars(args)
    show(res, f"fleetsim fidelity: {len(reqs)} requests of {Path(args.trace).name}, "
              f"{args.workers} sim workers x {args.capacity}, rate x{args.rate_scale:g}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
