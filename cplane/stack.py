"""`cplane up`: an embedded nats-server, one orchestrator and N workers, as processes.

Each service is its own process (`cplane orchestrator`, `cplane worker`), as
in production, so a 2-core laptop uses both cores. The stack is ready when
every worker's heartbeat has been seen; then it prints the URL to publish to.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import nats
from nats.aio.client import Client as NATS

from cplane.bus.heartbeats import HeartbeatWatcher, Seen
from cplane.bus.server import EmbeddedNats, free_port
from cplane.schemas.messages import Heartbeat
from cplane.schemas.settings import load_settings
from cplane.schemas.subjects import Subjects


@dataclass(slots=True)
class StackSpec:
    nats_url: str | None = None  # None: start an embedded server
    config: str | None = None
    workers: int = 2
    engine: str = "sim"
    model: str = "sim"
    capacity: int | None = None
    zero_cost: bool = False
    pd: bool = False  # one prefill + one decode worker instead of unified ones
    extra_worker_args: list[str] = field(default_factory=list)
    gateway: bool = True  # also start `cplane gateway` (OpenAI HTTP API)


async def heartbeats_seen(nc: NATS, subjects: Subjects, n: int, timeout_s: float) -> set[str]:
    """Workers heard (heartbeats; each asked for one at once) until `n` are seen or the
    timeout passes."""
    seen: set[str] = set()
    done = asyncio.Event()

    def heard(hb: Heartbeat, prev: Seen | None) -> None:
        seen.add(hb.worker_id)
        if len(seen) >= n:
            done.set()

    watcher = HeartbeatWatcher(nc, subjects, timeout_s, keep_stopped=True, on_heartbeat=heard)
    await watcher.start(ask=True)  # a worker up before the watcher answers now
    try:
        await asyncio.wait_for(done.wait(), timeout_s)
    except TimeoutError:
        pass
    finally:
        await watcher.stop()
    return seen


async def wait_for_workers(url: str, n: int, timeout_s: float,
                           subjects: Subjects | None = None) -> set[str]:
    """Block until `n` distinct workers have sent a heartbeat (or the timeout passes)."""
    nc = await nats.connect(url)
    try:
        return await heartbeats_seen(nc, subjects or Subjects(), n, timeout_s)
    finally:
        await nc.close()


def gateway_ready(url: str, workers: int, timeout_s: float) -> bool:
    """Poll `url`/health until it answers 200 and sees `workers` workers (or time runs out)."""
    import json
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if json.loads(resp.read()).get("workers", 0) >= workers:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """SIGTERM every process (a graceful drain), then kill what outlives `timeout_s`."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    procs.clear()


class Stack:
    def __init__(self, spec: StackSpec) -> None:
        self.spec = spec
        self.server: EmbeddedNats | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.url = spec.nats_url or ""
        self.kv_dir: str | None = None
        self.gateway_url: str | None = None
        self._gateway_sock: socket.socket | None = None
        self.metrics_ports: list[int] = []  # orchestrator, then each worker

    def _cli(self, *args: str) -> list[str]:
        base = [sys.executable, "-m", "cplane.cli", *args, "--nats-url", self.url]
        if self.spec.config:
            base += ["--config", self.spec.config]
        return base

    def _worker_cmds(self) -> list[list[str]]:
        s = self.spec
        common = ["--engine", s.engine]
        if s.model:
            common += ["--model", s.model]
        if s.capacity:
            common += ["--capacity", str(s.capacity)]
        if s.zero_cost:
            common.append("--zero-cost")
        common += s.extra_worker_args
        if s.pd:
            self.kv_dir = tempfile.mkdtemp(prefix="cplane-kv-")
            kv = ["--kv-connector", "ExampleConnector", "--kv-shared-path", self.kv_dir]
            if s.engine == "sim":
                kv = []
            return [
                self._cli("worker", "--role", "prefill", "--worker-id", "prefill-0", *common, *kv),
                self._cli("worker", "--role", "decode", "--worker-id", "decode-0", *common, *kv),
            ]
        return [
            self._cli("worker", "--role", "unified", "--worker-id", f"{s.engine}-{i}", *common)
            for i in range(s.workers)
        ]

    def start(self, timeout_s: float = 180.0) -> None:
        if not self.url:
            self.server = EmbeddedNats().start()
            self.url = self.server.url
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # Each process its own /metrics port (orchestrator first), free when picked.
        cmds = self._worker_cmds()
        self.metrics_ports = [free_port() for _ in range(1 + len(cmds))]
        self.procs.append(subprocess.Popen(self._cli("orchestrator"), env={
            **env, "CPLANE__METRICS__ORCHESTRATOR_PORT": str(self.metrics_ports[0])}))
        for cmd, port in zip(cmds, self.metrics_ports[1:], strict=True):
            self.procs.append(subprocess.Popen(cmd, env={
                **env, "CPLANE__METRICS__WORKER_PORT": str(port)}))
        if self.spec.gateway:
            try:
                self._start_gateway(env)
            except BaseException:
                self.stop()
                raise
        subjects = load_settings(self.spec.config).subjects
        seen = asyncio.run(wait_for_workers(self.url, len(cmds), timeout_s, subjects))
        if len(seen) < len(cmds):
            self.stop()
            raise RuntimeError(f"only {len(seen)} of {len(cmds)} workers came up in {timeout_s} s")
        if self.gateway_url and not gateway_ready(self.gateway_url, len(cmds), 30.0):
            self.stop()
            raise RuntimeError(f"the gateway at {self.gateway_url} did not become ready")

    def bind_gateway(self) -> str:
        """Bind the gateway's socket (gateway.port, or a free one) now; returns its URL.

        `cplane up` prints it before any service starts, so it is the first
        http URL in the output whatever the services log.
        """
        from cplane.gateway.app import listen
        from cplane.gateway_cmd import url_of

        if self._gateway_sock is None:
            cfg = load_settings(self.spec.config).gateway
            self._gateway_sock = listen(cfg.host, cfg.port)
            self.gateway_url = url_of(self._gateway_sock)
        return self.gateway_url or ""

    def _start_gateway(self, env: dict[str, str]) -> None:
        """`cplane gateway` on the socket bound here, inherited."""
        self.bind_gateway()
        sock, self._gateway_sock = self._gateway_sock, None
        assert sock is not None
        try:
            fd = sock.fileno()
            self.procs.append(subprocess.Popen(self._cli("gateway", "--fd", str(fd)), env=env,
                                               pass_fds=(fd,), stdout=subprocess.DEVNULL))
        finally:
            sock.close()  # the gateway holds its own copy

    def stop(self) -> None:
        stop_processes(self.procs, 40)
        if self.server:
            self.server.stop()
            self.server = None

    def run_foreground(self) -> int:
        """`cplane up`: start, print where to publish, wait for Ctrl-C or SIGTERM."""
        stop = {"now": False}

        def on_signal(signum: int, frame: object) -> None:
            stop["now"] = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        if self.spec.gateway:
            print(f"gateway: {self.bind_gateway()} (starting)", flush=True)
        self.start()
        s = self.spec
        roles = "prefill+decode" if s.pd else f"{s.workers} unified"
        print(f"cplane is up: NATS at {self.url} | orchestrator + {roles} {s.engine} worker(s), "
              f"model {s.model!r}", flush=True)
        if self.gateway_url:
            print(f"  gateway: {self.gateway_url}  (OpenAI API at {self.gateway_url}/v1)",
                  flush=True)
        print(f"  metrics: http://127.0.0.1:{self.metrics_ports[0]}/metrics (orchestrator), "
              f"workers on ports {', '.join(map(str, self.metrics_ports[1:]))}", flush=True)
        print(f"  try: cplane generate 'Hello' --nats-url {self.url}", flush=True)
        print("  or publish JSON to llm.req.normal.standard, read llm.out.i.<id> / llm.done.i.<id>",
              flush=True)
        try:
            while not stop["now"]:
                if any(p.poll() is not None for p in self.procs):
                    print("cplane up: a service exited; stopping", file=sys.stderr, flush=True)
                    self.stop()
                    return 1
                time.sleep(0.2)
        finally:
            self.stop()
        return 0
