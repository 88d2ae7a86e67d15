"""`cplane workers`: every live worker, from its heartbeats, as a table or JSON.

It subscribes to `llm.hb.*`, asks every worker for a heartbeat at once
(`<prefix>.admin.heartbeat`, as an orchestrator does when it starts), and
collects until `--wait` seconds pass or, earlier, until no new worker has
answered for `SETTLE_S`. A worker is healthy when its state is READY and its
last heartbeat is younger than `orchestrator.worker_timeout_s` (what the
orchestrator allows before it forgets a worker).

Exit codes: 0 listed (healthy or not: see the health column / `healthy`),
1 no worker answered or NATS unreachable (one line on stderr), 2 bad arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Mapping

import msgspec
import nats
from nats.aio.client import Client as NATS

from cplane.bus.credentials import cannot_reach, connect_options, server_list
from cplane.bus.heartbeats import HeartbeatWatcher, Seen
from cplane.client.aggregate import health, load_of
from cplane.schemas.admin import BREAKERS_VERB, breakers_decoder
from cplane.schemas.messages import Heartbeat
from cplane.schemas.settings import NatsSettings, Settings
from cplane.schemas.subjects import Subjects

SETTLE_S = 0.3  # return once the set of workers has not grown for this long
CONNECT_TIMEOUT_S = 5.0
WIDE = 320  # console width when stdout is not a terminal: never cut a column
GIB = 1 << 30


class WorkerRow(msgspec.Struct, kw_only=True):
    """One worker as `--json` prints it."""

    worker_id: str
    role: str
    models: list[str]
    engine: str
    state: str
    healthy: bool
    health: str  # "healthy" or "unhealthy"
    reason: str  # why unhealthy ("" when healthy)
    held_items: int
    capacity: int
    load: float  # held_items / capacity
    running: int
    waiting: int
    kv_usage: float  # 0..1
    prefix_hit_rate: float  # 0..1
    prompt_tokens_per_s: float
    gen_tokens_per_s: float
    ttft_ms_avg: float  # moving averages of its recent requests (least_response_time)
    tpot_ms_avg: float
    heartbeat_age_s: float
    started_ms: float
    ts_ms: float
    # The leading orchestrator's circuit breaker: closed | open | half_open, or
    # "?" when no orchestrator answered.
    breaker: str = "?"
    breaker_reason: str = ""
    served: int = 0  # since it started: served to the end / failed by its engine
    faults: int = 0
    # Its GPUs (NVML: utilisation 0..1 averaged, memory summed); null where it has none.
    gpu_util: float | None = None
    gpu_mem_used_bytes: int | None = None
    gpu_mem_total_bytes: int | None = None


class HeartbeatCollector:
    """Collects the latest heartbeat of each worker on one connection (a stopping
    worker stays, shown as stopped; none is expired: the rows say how old)."""

    def __init__(self, nc: NATS, subjects: Subjects) -> None:
        # No timeout of its own: `rows` judges each heartbeat's age.
        self.watcher = HeartbeatWatcher(nc, subjects, float("inf"), keep_stopped=True,
                                        on_heartbeat=self._heard)
        self._new = asyncio.Event()
        self._last_new = time.monotonic()

    @property
    def seen(self) -> Mapping[str, Seen]:
        return self.watcher.book.seen

    async def start(self) -> None:
        """Subscribe, then ask every worker for a heartbeat now."""
        self._last_new = time.monotonic()
        await self.watcher.start(ask=True)

    async def stop(self) -> None:
        await self.watcher.stop()

    def _heard(self, hb: Heartbeat, prev: Seen | None) -> None:
        if prev is None:
            self._last_new = time.monotonic()
            self._new.set()

    async def settle(self, wait_s: float, settle_s: float = SETTLE_S) -> None:
        """Return after `wait_s`, or once some worker answered and none new for `settle_s`."""
        deadline = time.monotonic() + wait_s
        while True:
            end = min(deadline, self._last_new + settle_s) if self.seen else deadline
            left = end - time.monotonic()
            if left <= 0:
                return
            self._new.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), left)

    def rows(self, timeout_s: float, now: float | None = None) -> list[WorkerRow]:
        """Every worker seen, by id."""
        now = time.monotonic() if now is None else now
        return [row(s.hb, max(0.0, now - s.at), timeout_s)
                for _, s in sorted(self.seen.items())]


def row(hb: Heartbeat, age_s: float, timeout_s: float) -> WorkerRow:
    ok, reason = health(hb, age_s, timeout_s)
    return WorkerRow(
        worker_id=hb.worker_id, role=str(hb.role), models=list(hb.models), engine=hb.engine,
        state=str(hb.state), healthy=ok, health="healthy" if ok else "unhealthy",
        reason=reason, held_items=hb.held_items, capacity=hb.capacity,
        load=load_of(hb.held_items, hb.capacity), running=hb.running,
        waiting=hb.waiting, kv_usage=hb.kv_usage, prefix_hit_rate=hb.prefix_hit_rate,
        prompt_tokens_per_s=hb.prompt_tokens_per_s, gen_tokens_per_s=hb.gen_tokens_per_s,
        ttft_ms_avg=hb.ttft_ms_avg, tpot_ms_avg=hb.tpot_ms_avg,
        heartbeat_age_s=round(age_s, 3), started_ms=hb.started_ms, ts_ms=hb.ts_ms,
        served=hb.served, faults=hb.faults, gpu_util=hb.gpu_util,
        gpu_mem_used_bytes=hb.gpu_mem_used_bytes, gpu_mem_total_bytes=hb.gpu_mem_total_bytes,
    )


def gpu_cell(r: WorkerRow) -> str:
    """'87% 70/80 GiB' (utilisation, memory used/total); '-' for what it does not report."""
    if r.gpu_util is None and r.gpu_mem_used_bytes is None:
        return "-"
    util = "-" if r.gpu_util is None else f"{100 * r.gpu_util:.0f}%"
    if r.gpu_mem_used_bytes is None or r.gpu_mem_total_bytes is None:
        return util
    return f"{util} {r.gpu_mem_used_bytes / GIB:.0f}/{r.gpu_mem_total_bytes / GIB:.0f} GiB"


def render(rows: list[WorkerRow], width: int | None = None) -> None:
    """Print `rows` as a rich table on stdout (wide and plain when not a terminal)."""
    from rich.console import Console, JustifyMethod
    from rich.table import Table

    console = Console(width=width or (None if sys.stdout.isatty() else WIDE))
    table = Table(box=None, header_style="bold", pad_edge=False)
    columns: list[tuple[str, JustifyMethod]] = [
        *((name, "left") for name in ("worker", "role", "models", "engine", "state", "health",
                                      "breaker")),
        *((name, "right") for name in ("held/cap", "load %", "running", "waiting", "kv %",
                                       "prefix %", "prompt tok/s", "gen tok/s", "ttft ms",
                                       "tpot ms", "gpu", "last hb")),
    ]
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=True)
    for r in rows:
        verdict = ("[green]healthy[/]" if r.healthy
                   else f"[red]unhealthy[/] ({r.reason})")
        breaker = {"closed": "[green]closed[/]", "open": f"[red]open[/] ({r.breaker_reason})",
                   "half_open": f"[yellow]half-open[/] ({r.breaker_reason})"
                   }.get(r.breaker, r.breaker)
        table.add_row(
            r.worker_id, r.role, ",".join(r.models) or "-", r.engine, r.state, verdict, breaker,
            f"{r.held_items}/{r.capacity}", f"{100 * r.load:.0f}", str(r.running),
            str(r.waiting), f"{100 * r.kv_usage:.1f}", f"{100 * r.prefix_hit_rate:.1f}",
            f"{r.prompt_tokens_per_s:.0f}", f"{r.gen_tokens_per_s:.0f}",
            f"{r.ttft_ms_avg:.1f}", f"{r.tpot_ms_avg:.2f}", gpu_cell(r),
            f"{r.heartbeat_age_s:.1f} s",
        )
    console.print(table)
    healthy = sum(r.healthy for r in rows)
    console.print(f"{len(rows)} worker(s), {healthy} healthy", highlight=False)


async def _connect(settings: NatsSettings) -> NATS:
    """One connection, no reconnects; ConnectionError with a one-line reason."""
    async def quiet(exc: Exception) -> None:  # nats-py would log each failed attempt
        return None

    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            return await nats.connect(server_list(settings.url), allow_reconnect=False,
                                      max_reconnect_attempts=1, reconnect_time_wait=0.1,
                                      connect_timeout=2, error_cb=quiet,
                                      **connect_options(settings))
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        raise cannot_reach(settings.url, exc) from None


async def collect(settings: Settings, wait_s: float) -> list[WorkerRow]:
    """Connect, ask for heartbeats, collect them, return one row per worker."""
    nc = await _connect(settings.nats)
    try:
        collector = HeartbeatCollector(nc, settings.subjects)
        await collector.start()
        breakers = asyncio.create_task(_breakers(nc, settings, wait_s))
        await collector.settle(wait_s)
        await collector.stop()
        rows = collector.rows(settings.orchestrator.worker_timeout_s)
        states = await breakers
        if states is not None:
            for r in rows:
                r.breaker, r.breaker_reason = states.get(r.worker_id, ("closed", ""))
        return rows
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


async def _breakers(nc: NATS, settings: Settings, wait_s: float
                    ) -> dict[str, tuple[str, str]] | None:
    """The leading orchestrator's breakers by worker; None when none answers."""
    try:
        reply = await nc.request(settings.subjects.admin(BREAKERS_VERB), b"", timeout=wait_s)
        infos = breakers_decoder.decode(reply.data)
    except Exception:  # no orchestrator (or no leader yet): the column says "?"
        return None
    return {i.worker_id: (i.state, i.reason) for i in infos}


def default_wait_s(settings: Settings) -> float:
    """A little over one heartbeat period: even a worker that missed the request shows."""
    return settings.worker.heartbeat_s + 0.5


def run_workers(settings: Settings, wait_s: float | None, as_json: bool) -> int:
    """The `cplane workers` command; returns its exit code."""
    wait = default_wait_s(settings) if wait_s is None else wait_s
    if wait <= 0:
        print("cplane workers: --wait must be above 0", file=sys.stderr)
        return 2
    try:
        rows = asyncio.run(collect(settings, wait))
    except ConnectionError as exc:
        print(f"cplane workers: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(msgspec.json.encode(rows).decode())
    elif rows:
        render(rows)
    if not rows:
        print(f"cplane workers: no workers answered within {wait:g} s", file=sys.stderr)
        return 1
    return 0
