"""`cplane status`, `cplane metrics`, `cplane request ID`, `cplane cancel ID`.

Thin CLI over client/control.py `ControlPlane`: rich tables on a terminal (and
wide plain tables when piped), `--json` for machines. Exit codes: 0 answered;
1 nobody answered, NATS unreachable, or (request, cancel) the request is not
found; a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from cplane.settings_args import settings_from_args

T = TypeVar("T")
WIDE = 200  # console width when stdout is not a terminal: never cut a column


def add_parsers(sp: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register the four commands on the CLI's subparsers."""
    def parser(name: str, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sp.add_parser(name, help=help_)
        common(p)
        p.add_argument("--json", action="store_true", help="print JSON instead of tables")
        p.add_argument("--timeout", type=float, default=2.0,
                       help="seconds to wait for the first answer")
        return p

    parser("status", "orchestrator replicas (leader first), live workers, queue depth"
           ).set_defaults(fn=cmd_status)
    parser("metrics", "request totals, latency percentiles, rates, SLO compliance"
           ).set_defaults(fn=cmd_metrics)
    p = parser("request", "one request's phase and timeline (queued ... completed)")
    p.add_argument("request_id")
    p.add_argument("--group", default="i", help="output group (a batch job id; default i)")
    p.add_argument("--tenant", default=None, help="the tenant whose request it is")
    p.set_defaults(fn=cmd_request)
    p = parser("cancel", "cancel a request (stored: every part honours it)")
    p.add_argument("request_id")
    p.add_argument("--group", default="i", help="output group (a batch job id; default i)")
    p.add_argument("--tenant", default=None, help="the tenant whose request it is")
    p.add_argument("--force", action="store_true",
                   help="store the cancel even when no one knows the id (still in LLM_REQ)")
    p.set_defaults(fn=cmd_cancel)


def _run(args: argparse.Namespace, call: Callable[[Any], Awaitable[T]]) -> T | None:
    """Connect, run `call(control_plane)`; None (reason on stderr) when nobody answers."""
    from cplane.client.admin import NoOrchestrator
    from cplane.client.control import ControlPlane

    settings = settings_from_args(args)

    async def main() -> T:
        cp = await ControlPlane.connect(settings.nats.url, settings, timeout_s=args.timeout)
        async with cp:
            return await call(cp)

    try:
        return asyncio.run(main())
    except (NoOrchestrator, ConnectionError) as exc:
        print(f"cplane {args.cmd}: {exc}", file=sys.stderr)
        return None


def _console() -> Any:
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else WIDE)


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Any:
    from rich.table import Table

    t = Table(title=title, box=None, header_style="bold", pad_edge=False, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        t.add_row(*r)
    return t


def _json(obj: object) -> None:
    print(msgspec.json.encode(obj).decode())


def _clock(ms: float) -> str:
    if not ms:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%H:%M:%S.%f")[:-3]


# -- status ----------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    status = _run(args, lambda cp: cp.get_status())
    if status is None:
        return 1
    if args.json:
        _json(status)
        return 0
    con = _console()
    con.print(_table(f"orchestrators (policy {status.policy})",
                     ["orchestrator", "role", "policy", "router", "pd", "held", "in flight",
                      "accepted", "dispatched", "rejected", "workers ready/known"],
                     [[o.orchestrator_id, "leader" if o.leading else "standby", o.policy,
                       o.router, o.pd_mode, str(sum(o.held.values())), str(o.in_flight),
                       str(o.counters.get("accepted", 0)), str(o.counters.get("dispatched", 0)),
                       str(o.counters.get("rejected", 0)),
                       f"{o.workers_ready}/{o.workers_known}"] for o in status.orchestrators]))
    con.print(_table("workers", ["worker", "role", "state", "models", "held/cap", "running",
                                 "waiting", "kv %", "prefix %", "gen tok/s", "ttft ms"],
                     [[hb.worker_id, str(hb.role), str(hb.state), ",".join(hb.models),
                       f"{hb.held_items}/{hb.capacity}", str(hb.running), str(hb.waiting),
                       f"{100 * hb.kv_usage:.1f}", f"{100 * hb.prefix_hit_rate:.1f}",
                       f"{hb.gen_tokens_per_s:.0f}", f"{hb.ttft_ms_avg:.1f}"]
                      for hb in status.instances]))
    con.print(_table("queue (LLM_REQ, from JetStream)", ["priority", "pending", "held",
                                                         "by class"],
                     [[q.priority, str(q.pending), str(q.held),
                       " ".join(f"{k}={v}" for k, v in sorted(q.by_class.items())) or "-"]
                      for q in status.queue]))
    con.print(f"{len(status.orchestrators)} orchestrator(s), leader "
              f"{status.leader or 'none'}; {len(status.instances)} worker(s)", highlight=False)
    return 0


# -- metrics ---------------------------------------------------------------------------
def cmd_metrics(args: argparse.Namespace) -> int:
    m = _run(args, lambda cp: cp.get_metrics())
    if m is None:
        return 1
    if args.json:
        _json(m)
        return 0
    con = _console()
    con.print(_table("requests", ["total", "completed", "failed", "cancelled", "rejected",
                                  "shed", "active", "running", "queued"],
                     [[str(v) for v in (m.total, m.completed, m.failed, m.cancelled,
                                        m.rejected, m.shed, m.active, m.running, m.queued)]]))
    lat = [("TTFT", m.ttft), ("TPOT", m.tpot), ("inter-token", m.itl), ("end to end", m.e2e),
           ("queue", m.queue_time)]
    con.print(_table("latency (ms; mean over all, percentiles over recent requests)",
                     ["", "count", "mean", "p50", "p90", "p95", "p99"],
                     [[name, str(s.count), f"{s.mean_ms:.2f}", f"{s.p50_ms:.2f}",
                       f"{s.p90_ms:.2f}", f"{s.p95_ms:.2f}", f"{s.p99_ms:.2f}"]
                      for name, s in lat]))
    con.print(_table(f"rates (last {m.window_s:.0f} s)", ["req/s", "prompt tok/s",
                                                          "gen tok/s", "prompt tokens",
                                                          "gen tokens", "cost"],
                     [[f"{m.requests_per_s:.2f}", f"{m.prompt_tokens_per_s:.1f}",
                       f"{m.completion_tokens_per_s:.1f}", str(m.prompt_tokens),
                       str(m.completion_tokens), f"{m.cost:.4f}"]]))
    con.print(_table(f"SLO (compliance {100 * m.slo_compliance:.1f} %, "
                     f"{m.slo_violations} violations)",
                     ["class", "finished", "met", "violations", "compliance %",
                      "goodput tokens"],
                     [[s.slo_class, str(s.finished), str(s.met), str(s.violations),
                       f"{100 * s.compliance:.1f}", str(s.goodput_tokens)] for s in m.slo]))
    con.print(f"{m.orchestrators} orchestrator(s) (leader {m.leader or 'none'}), "
              f"{m.workers} worker(s) ({m.workers_healthy} healthy); KV usage avg "
              f"{100 * m.kv_usage_avg:.1f} %, max {100 * m.kv_usage_max:.1f} %",
              highlight=False)
    return 0


# -- one request -------------------------------------------------------------------------
def cmd_request(args: argparse.Namespace) -> int:
    from cplane.schemas.control import RequestPhase

    st = _run(args, lambda cp: cp.get_request_status(args.request_id, args.group,
                                                              args.tenant))
    if st is None:
        return 1
    if st.phase is RequestPhase.NOT_FOUND:
        if args.json:
            _json(st)
        print(f"request {args.request_id}: not found"
              + (f" ({st.message})" if st.message else ""), file=sys.stderr)
        return 1
    if args.json:
        _json(st)
        return 0
    rows = [["phase", str(st.phase)], ["answered by", st.source],
            ["priority / class", f"{st.priority or '-'} / {st.slo_class or '-'}"],
            ["orchestrator", st.orchestrator_id or "-"], ["worker", st.worker_id or "-"],
            ["queued", _clock(st.queued_ms)], ["dispatched", _clock(st.dispatched_ms)],
            ["started", _clock(st.started_ms)], ["first token", _clock(st.first_token_ms)],
            ["finished", _clock(st.finished_ms)], ["tokens", str(st.tokens)]]
    if st.finish_reason:
        rows.append(["finish reason", st.finish_reason])
    if st.error_code:
        rows.append(["error", f"{st.error_code}: {st.message}"])
    con = _console()
    con.print(f"request {st.request_id}", highlight=False)
    con.print(_table("", ["", ""], rows))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    res = _run(args, lambda cp: cp.cancel_request(args.request_id, args.group,
                                                  force=args.force, tenant=args.tenant))
    if res is None:
        return 1
    if args.json:
        _json(res)
    if not res.found and not res.sent:
        print(f"request {args.request_id}: not found (--force stores the cancel anyway)",
              file=sys.stderr)
        return 1
    if not args.json:
        print(f"request {args.request_id} ({res.phase}): {res.message}")
    return 0


__all__ = ["add_parsers"]
