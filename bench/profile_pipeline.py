"""Where each process's CPU goes: the pipeline of cpu_per_request.py under cProfile.

Runs bench/cpu_per_request.py's measurement (private nats-server, one
orchestrator and two zero-cost sim workers as processes, N requests at full
speed) with the orchestrator and worker-0 started as
`python bench/profile_pipeline.py --child FILE -- <cplane.cli arguments>`:
cProfile with a CPU-time clock (`python -m cProfile` counts wall time, which
on a busy 2-core machine charges a coroutine for the time the process waited
for a core) around `runpy.run_module("cplane.cli")`. They stop on SIGTERM (the
CLI's run_service sets a stop event and returns), and the file is written on
that exit. For each profiled process it prints the top functions by
internal and by cumulative time in microseconds per request (time / N).

The profile covers the process's whole life (imports, start, the N requests,
the drain), and cProfile's own hooks inflate every Python call: read it for
the shares, and take the CPU per request of unprofiled processes (also
printed, for worker-1 and the server) from cpu_per_request.py.

    python bench/profile_pipeline.py --requests 20000
    python bench/profile_pipeline.py --root /tmp/co-87855ab --requests 20000
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import cpu_per_request  # noqa: E402

console = Console(width=160)
PROFILED = ("orchestrator", "worker-0")


def profiled_services(out_dir: Path) -> object:
    """A replacement for cpu_per_request.start_services: the first two under cProfile."""

    def start(root: Path, url: str) -> list[subprocess.Popen[bytes]]:
        env = dict(os.environ, PYTHONPATH=str(root), CPLANE__SIM__ZERO_COST="true")

        def cli(name: str | None) -> list[str]:
            if name is None:
                return [sys.executable, "-m", "cplane.cli"]
            return [sys.executable, __file__, "--child", str(out_dir / f"{name}.prof"), "--"]

        def worker(i: int) -> list[str]:
            return ["worker", "--worker-id", f"w{i}", "--zero-cost", "--capacity", "512",
                    "--nats-url", url]

        cmds = [[*cli("orchestrator"), "orchestrator", "--nats-url", url],
                [*cli("worker-0"), *worker(0)], [*cli(None), *worker(1)]]
        return [subprocess.Popen(c, env=env, cwd=root, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL) for c in cmds]

    return start


def where(func: tuple[str, int, str], root: Path) -> str:
    """file:line(name), shortened to the repository or the installed package."""
    path, line, name = func
    for prefix in (str(root) + "/", "site-packages/", "/lib/python3."):
        if prefix in path:
            path = path.split(prefix, 1)[1]
            if prefix.startswith("/lib/"):
                path = "py3." + path
            break
    return f"{path}:{line}({name})" if line else name


def top(prof: Path, n: int, key: str, limit: int, root: Path) -> Table:
    """The `limit` functions with the most `key` time ("tottime" or "cumtime")."""
    st = pstats.Stats(str(prof))
    rows = []
    for func, (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append((tt if key == "tottime" else ct, tt, ct, nc, func))
    rows.sort(key=lambda r: r[0], reverse=True)
    total = st.total_tt  # type: ignore[attr-defined]
    t = Table(title=f"{prof.stem}: top {limit} by {key}; profiled total "
                    f"{total * 1e6 / n:,.0f} us per request")
    t.add_column("function")
    t.add_column("calls/req", justify="right")
    t.add_column("internal us/req", justify="right")
    t.add_column("cumulative us/req", justify="right")
    for _, tt, ct, nc, func in rows[:limit]:
        t.add_row(where(func, root), f"{nc / n:.2f}", f"{tt * 1e6 / n:.1f}",
                  f"{ct * 1e6 / n:.1f}")
    return t


def child(out: str, argv: list[str]) -> None:
    """Run `cplane.cli argv` under cProfile (CPU time), writing `out` on exit."""
    prof = cProfile.Profile(time.process_time)
    sys.argv = ["cplane", *argv]
    prof.enable()
    try:
        runpy.run_module("cplane.cli", run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    finally:
        prof.disable()
        prof.dump_stats(out)


def main() -> None:
    if len(sys.argv) > 3 and sys.argv[1] == "--child" and sys.argv[3] == "--":
        child(sys.argv[2], sys.argv[4:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=BENCH.parent, help="checkout whose code runs")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--keep", type=Path, default=None, help="keep the .prof files here")
    args = ap.parse_args()
    root = args.root.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        cpu_per_request.start_services = profiled_services(out)  # type: ignore[assignment]
        r = asyncio.run(cpu_per_request.run(root, args.requests))
        parts = " ".join(f"{k}={v:.0f}" for k, v in r.items() if k != "req_per_s")
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        console.print(f"{root.name} (orchestrator and worker-0 under cProfile): "
                      f"{r['req_per_s']:,.0f} req/s; CPU us per request: {parts}; load {load}")
        for name in PROFILED:
            prof = out / f"{name}.prof"
            if not prof.exists():
                raise SystemExit(f"{name} wrote no profile ({prof}): did it exit on SIGTERM?")
            for key in ("tottime", "cumtime"):
                console.print(top(prof, args.requests, key, args.top, root))


if __name__ == "__main__":
    main()
