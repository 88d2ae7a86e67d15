"""Whose code each process of the peers stack spends its CPU in, at saturation.

Starts cplane as bench/peers.py does (gateway, orchestrator, 2 sim workers
scaled 1000x down, round robin), saturates it with bench/loadgen.py (streaming
chat, ~100-word prompts, 16 tokens, 128 in flight) and measures twice:

1. CPU ms per request of every process over `--requests` requests, unprofiled;
2. the same load again with py-spy sampling every Python process (`--hz`,
   `--seconds`); each sample is charged to the owner of its innermost Python
   frame that has one: cplane itself, nats-py, the event loop (asyncio and
   uvloop, including the socket writes and reads they make), the HTTP server
   (uvicorn, starlette), or another library. Time in a C extension called from
   cplane's own code (msgspec, say) counts as cplane's.

Owner shares x unprofiled CPU per request gives milliseconds per request by
owner; nats-server is outside the project's code in full. py-spy is installed
into a virtual environment of its own (never the project's).

    python bench/profile_owners.py [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from loadgen import closed_loop  # noqa: E402
from peer_stacks import DEFAULT_VENV, CplaneStack, cpu_by_name, venv_tool  # noqa: E402
from peers import prompts  # noqa: E402

PY_SPY = "0.4.1"
OWNERS = (("cplane/", "cplane"), ("nats/", "nats-py"), ("asyncio/", "event loop"),
          ("uvloop", "event loop"), ("uvicorn/", "HTTP server"), ("starlette/", "HTTP server"),
          ("httptools", "HTTP server"))
console = Console(stderr=True)


def install_py_spy(root: Path = DEFAULT_VENV.parent) -> Path:
    return venv_tool("py-spy", PY_SPY, root)


def owner(frame: str) -> str | None:
    """The owner of one py-spy frame `func (path:line)`; None for generated code
    (dataclass __init__, frozen bootstrap), charged to its caller."""
    path = frame.rsplit(" (", 1)[-1] if " (" in frame else ""
    if not path or path.startswith(("<string>", "<frozen")):
        return None
    return next((name for key, name in OWNERS if key in path), "other libraries")


def samples(raw: Path) -> collections.Counter[str]:
    """Owner -> samples in one py-spy raw (collapsed stacks) file."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():  # not a stack line (a message py-spy wrote)
            continue
        frames = stack.split(";")
        who = next((o for f in reversed(frames) if (o := owner(f))), "other libraries")
        counts[who] += int(n)
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=7000)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--hz", type=int, default=100)
    ap.add_argument("--seconds", type=int, default=12)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    spy = install_py_spy()
    stack = CplaneStack(2, "round_robin")
    texts = prompts(512, 100)
    def make(i: int) -> dict[str, Any]:
        return stack.body(texts[i % len(texts)], 16)

    out: dict[str, Any] = {"processes": {}}
    try:
        asyncio.run(closed_loop(stack.url, make, 32, 600))  # warm-up
        procs = stack.processes()
        before = cpu_by_name(procs)
        run = asyncio.run(closed_loop(stack.url, make, args.concurrency, args.requests))
        after = cpu_by_name(procs)
        if not run.samples:
            raise SystemExit(f"no request was served: {run.errors[:3]}")
        # per request served: an errored request costs the stack less than a served one
        ms = {k: (after[k] - before[k]) * 1000 / len(run.samples) for k in procs}
        out["served"], out["errors"] = len(run.samples), len(run.errors)
        with tempfile.TemporaryDirectory() as tmp:
            spies = {f"{role}-{i}": (pid, Path(tmp) / f"{role}-{i}.txt")
                     for role, pids in procs.items() if role != "nats-server"
                     for i, pid in enumerate(pids)}
            running = [subprocess.Popen(
                [str(spy), "record", "--nonblocking", "-r", str(args.hz), "-d",
                 str(args.seconds), "-f", "raw", "-o", str(path), "-p", str(pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                for pid, path in spies.values()]
            deadline = time.monotonic() + args.seconds + 5
            n = int(args.requests * 2)  # outlasts the sampling; stopped once it ends
            asyncio.run(_load_until(stack.url, make, args.concurrency, n, running, deadline))
            for p in running:
                _, err = p.communicate(timeout=30)
                if p.returncode:
                    raise SystemExit(f"py-spy failed: {err.decode().strip()[-300:]}")
            got = {name: samples(path) for name, (_, path) in spies.items()}
    finally:
        stack.stop()
    by_owner: dict[str, float] = collections.defaultdict(float)
    for role, cpu in ms.items():
        # a role's processes (a standby orchestrator too) weighted by their samples
        counts = sum((c for name, c in got.items() if name.rsplit("-", 1)[0] == role),
                     collections.Counter[str]())
        total = sum(counts.values())
        split = ({k: v / total for k, v in counts.items()} if role != "nats-server" and total
                 else {"nats-server (Go)": 1.0})
        out["processes"][role] = {"cpu_ms_per_req": round(cpu, 3),
                                  "shares": {k: round(v, 3) for k, v in split.items()}}
        for k, v in split.items():
            by_owner[k] += cpu * v
    ranked = sorted(by_owner.items(), key=lambda kv: -kv[1])
    out["ms_per_req_by_owner"] = {k: round(v, 3) for k, v in ranked}
    out["total_ms_per_req"] = round(sum(ms.values()), 3)
    table = Table(title="CPU ms per request at saturation, by whose code")
    table.add_column("owner")
    table.add_column("ms/request", justify="right")
    table.add_column("share", justify="right")
    for k, v in ranked:
        table.add_row(k, f"{v:.3f}", f"{100 * v / out['total_ms_per_req']:.0f} %")
    Console().print(table)
    for role, row in out["processes"].items():
        parts = ", ".join(f"{k} {100 * v:.0f} %" for k, v in
                          sorted(row["shares"].items(), key=lambda kv: -kv[1]))
        print(f"{role}: {row['cpu_ms_per_req']:.3f} ms/request ({parts})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


async def _load_until(url: str, make: Any, concurrency: int, n: int,
                      spies: list[subprocess.Popen[bytes]], deadline: float) -> None:
    """Load while the samplers run: stopped once they have all ended (or at `deadline`)."""
    task = asyncio.create_task(closed_loop(url, make, concurrency, n))
    while not task.done() and time.monotonic() < deadline and \
            any(p.poll() is None for p in spies):
        await asyncio.sleep(0.2)  # polls the samplers' exit (bounded by `deadline`)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


if __name__ == "__main__":
    sys.exit(main())
