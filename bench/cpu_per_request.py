"""CPU per request, by process: what each part of the pipeline costs.

Starts a private nats-server, one orchestrator and two zero-cost sim workers
(separate processes, from the code in --root, default this checkout), pushes
N requests through at full speed (JetStream publishes, 256 in flight), waits
for every terminal, and reads each process's CPU time over exactly that
window from /proc. Unlike a throughput figure on a shared 2-core machine,
CPU per request barely moves between runs, so two versions can be compared
(run both, alternating, several times):

    python bench/cpu_per_request.py --requests 20000
    python bench/cpu_per_request.py --root /tmp/older-checkout --requests 20000

`--ceiling DIR` measures the raw-nats-py pipeline ceiling the same way
(`DIR/pipeline_ceiling.py`, its setup/orch/worker/client roles as
processes, 16 requests per work message): what the same hops cost with no
logic, process by process.

    python bench/cpu_per_request.py --ceiling ../shared/bench --requests 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import nats
from nats.aio.msg import Msg

HERE = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_services(root: Path, url: str, creds: dict[str, str] | None = None
                   ) -> list[subprocess.Popen[bytes]]:
    """One orchestrator and two zero-cost sim workers, as the CLI starts them (each on
    its own credentials file when `creds` names them)."""
    env = dict(os.environ, PYTHONPATH=str(root), CPLANE__SIM__ZERO_COST="true")
    cli = [sys.executable, "-m", "cplane.cli"]

    def own(name: str) -> list[str]:
        return ["--creds", creds[name]] if creds else []

    cmds = [[*cli, "orchestrator", "--nats-url", url, *own("orchestrator")]] + [
        [*cli, "worker", "--worker-id", f"w{i}", "--zero-cost", "--capacity", "512",
         "--nats-url", url, *own(f"worker-w{i}")] for i in range(2)]
    return [subprocess.Popen(c, env=env, cwd=root, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for c in cmds]


async def run(root: Path, n: int, auth: bool = False) -> dict[str, float]:
    """`auth`: the multi-tenant accounts (`cplane up --auth`); the load is a tenant's."""
    sys.path.insert(0, str(root))
    from cplane.bus.server import EmbeddedNats

    creds: dict[str, str] | None = None
    as_tenant: dict[str, str] = {}
    as_operator: dict[str, str] = {}
    extra = ""
    if auth:
        from cplane.auth_setup import AuthSetup
        from cplane.schemas.settings import load_settings

        setup = AuthSetup.create(["w0", "w1"], ["bench"], gateway=False)
        extra, creds = setup.config(load_settings(env={})), setup.files
        as_tenant, as_operator = setup.login("tenant-bench"), setup.login("operator")
    server = EmbeddedNats(extra_config=extra).start()
    procs = start_services(root, server.url, creds)
    watcher = await nats.connect(server.url, **as_operator)
    nc = await nats.connect(server.url, **as_tenant)
    try:
        js = nc.jetstream()
        seen: set[str] = set()
        ready = asyncio.Event()

        async def on_hb(msg: Msg) -> None:
            seen.add(msg.subject)
            if len(seen) >= 2:
                ready.set()

        await watcher.subscribe("llm.hb.*", cb=on_hb)
        await asyncio.wait_for(ready.wait(), 120)
        await asyncio.sleep(2)  # the orchestrator leads and pulls
        done = 0
        finished = asyncio.Event()

        async def on_done(msg: Msg) -> None:
            nonlocal done
            done += 1
            if done >= n:
                finished.set()

        await nc.subscribe("llm.done.i.>", cb=on_done)
        await nc.flush()
        assert server.proc is not None
        pids = {"nats-server": server.proc.pid, "orchestrator": procs[0].pid,
                "worker-0": procs[1].pid, "worker-1": procs[2].pid}
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        mine, t0 = os.times(), time.perf_counter()
        pending = []
        for i in range(n):
            body = json.dumps({"request_id": f"r{i}", "prompt": "hello world hello world",
                               "max_tokens": 3}).encode()
            pending.append(js.publish("llm.req.normal.standard", body,
                                      headers={"Nats-Msg-Id": f"r{i}"}))
            if len(pending) >= 256:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
        await asyncio.wait_for(finished.wait(), 600)
        wall = time.perf_counter() - t0
        out = {k: (cpu_seconds(p) - before[k]) * 1e6 / n for k, p in pids.items()}
        now = os.times()
        out["client"] = ((now.user + now.system) - (mine.user + mine.system)) * 1e6 / n
        out["total"] = sum(out.values())
        out["req_per_s"] = n / wall
        return out
    finally:
        await nc.close()
        await watcher.close()
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(15)
        server.stop()


def _children_cpu_s() -> float:
    """CPU seconds of every child reaped so far (counted when waited for)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _startup_cpu_s() -> float:
    """What an interpreter with the ceiling's imports costs before its first message."""
    before = _children_cpu_s()
    subprocess.run([sys.executable, "-c", "import asyncio, nats, orjson, uvloop"], check=True)
    return _children_cpu_s() - before


def ceiling(script_dir: Path, n: int, batch: int = 16) -> dict[str, float]:
    """The raw pipeline's roles as processes: CPU us per request of each, and req/s."""
    from cplane.bus.server import EmbeddedNats

    script = str(script_dir / "pipeline_ceiling.py")
    env = dict(os.environ, BATCH=str(batch))
    startup = _startup_cpu_s()
    with EmbeddedNats() as server:
        url = server.url
        subprocess.run([sys.executable, script, "setup", url, "0"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        assert server.proc is not None
        srv0 = cpu_seconds(server.proc.pid)
        procs = {}
        for role in ("orch", "worker", "client"):
            procs[role] = subprocess.Popen([sys.executable, script, role, url, str(n)], env=env,
                                           stdout=subprocess.PIPE, text=True)
            if role != "client":
                time.sleep(1.0)  # consumers in place before the client publishes
        out: dict[str, float] = {}
        text = ""
        for role in ("client", "orch", "worker"):
            before = _children_cpu_s()
            stdout, _ = procs[role].communicate(timeout=600)
            text += stdout
            out[role] = (_children_cpu_s() - before - startup) * 1e6 / n
        out["nats-server"] = (cpu_seconds(server.proc.pid) - srv0) * 1e6 / n
    out["total"] = sum(out.values())
    match = re.search(r"end-to-end (\d+) req/s", text)
    out["req_per_s"] = float(match.group(1)) if match else float("nan")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=HERE, help="checkout whose code runs")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--auth", action="store_true",
                    help="multi-tenant accounts, each process its own user, the load a tenant")
    ap.add_argument("--ceiling", type=Path, default=None,
                    help="measure the raw pipeline ceiling of DIR/pipeline_ceiling.py instead")
    args = ap.parse_args()
    if args.ceiling is not None:
        sys.path.insert(0, str(HERE))
        r, name = ceiling(args.ceiling.resolve(), args.requests), "ceiling (batch 16)"
    else:
        r = asyncio.run(run(args.root.resolve(), args.requests, args.auth))
        name = args.root.name + (" --auth" if args.auth else "")
    parts = " ".join(f"{k}={v:.0f}" for k, v in r.items() if k != "req_per_s")
    print(f"{name}: {r['req_per_s']:,.0f} req/s; CPU ms per 1000 requests: {parts}")


if __name__ == "__main__":
    main()
