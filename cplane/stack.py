"""`cplane up`: an embedded nats-server, one orchestrator and N workers, as processes.

Each service is its own process (`cplane orchestrator`, `cplane worker`), as
in production, so a 2-core laptop uses both cores. The stack is ready when
every worker's heartbeat has been seen; then it prints the URL to publish to.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
import nats
from nats.aio.client import Client as NATS

from cplane.auth_setup import AuthSetup
from cplane.bus.cluster import EmbeddedCluster
from cplane.bus.credentials import connect_options, redact, server_list
from cplane.bus.heartbeats import HeartbeatWatcher, Seen
from cplane.bus.server import EmbeddedNats, free_port
from cplane.schemas.messages import Heartbeat
from cplane.schemas.settings import NatsSettings, load_settings
from cplane.schemas.subjects import Subjects

if TYPE_CHECKING:  # bus/tls.py imports cryptography: only where certificates are made
    from cplane.bus.tls import TlsFiles


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
    # --auth: the multi-tenant accounts (docs/security.md), a user per process and
    # per tenant; --tls: a throwaway CA, the server TLS-only.
    auth: bool = False
    tenants: list[str] = field(default_factory=list)
    tls: bool = False
    as_json: bool = False  # print each principal as one JSON line
    # --cluster N: N nats-servers forming one JetStream cluster (bus/cluster.py), every
    # stream and store with min(N, 3) replicas, processes spread over the nodes.
    cluster: int = 0
    orchestrators: int = 0  # replicas (one leads, the others stand by); 0: 1, 2 on a cluster
    # --engine openai: the OpenAI-compatible servers to front (one worker process, one
    # instance each; it also fronts what `cplane instances add` registers for "remote").
    urls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.orchestrators <= 0:
            self.orchestrators = 2 if self.cluster else 1


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
                           subjects: Subjects | None = None,
                           nats_settings: NatsSettings | None = None) -> set[str]:
    """Block until `n` distinct workers have sent a heartbeat (or the timeout passes);
    `nats_settings` gives the credentials and TLS (bus/credentials.py)."""
    nats_settings = msgspec.structs.replace(nats_settings or NatsSettings(), url=url)
    nc = await nats.connect(server_list(url), **connect_options(nats_settings))
    try:
        return await heartbeats_seen(nc, subjects or Subjects(), n, timeout_s)
    finally:
        await nc.close()


def _poll(url: str, holds: Callable[[bytes], bool], timeout_s: float,
          context: ssl.SSLContext | None = None) -> bool:
    """GET `url` every 0.1 s until it answers 2xx with a body that `holds`; False once
    `timeout_s` has passed (an error status or a refused connection: asked again)."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                if holds(resp.read()):
                    return True
        except OSError:  # HTTPError (not 2xx) included
            pass
        time.sleep(0.1)
    return False


def probe_ready(port: int, timeout_s: float) -> bool:
    """Poll a service's `/readyz` on its metrics port until it answers 200 (an
    orchestrator: provisioned every store and connected) or time runs out."""
    return _poll(f"http://127.0.0.1:{port}/readyz", lambda body: True, timeout_s)


def gateway_ready(url: str, workers: int, timeout_s: float, ca: str | None = None) -> bool:
    """Poll `url`/health until it answers 200 and sees `workers` workers (or time runs out);
    `ca` verifies an https gateway."""
    context = ssl.create_default_context(cafile=ca) if ca else None
    return _poll(f"{url}/health", lambda body: json.loads(body).get("workers", 0) >= workers,
                 timeout_s, context)


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
        self.cluster: EmbeddedCluster | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.url = spec.nats_url or ""
        self.kv_dir: str | None = None
        self.gateway_url: str | None = None
        self._gateway_sock: socket.socket | None = None
        self.metrics_ports: list[int] = []  # orchestrator, then each worker
        self.auth: AuthSetup | None = None
        self.tls_ca: str | None = None
        self.tls_files: TlsFiles | None = None  # --tls: the gateway serves https with them

    def _cli(self, *args: str, principal: str = "operator", node: int = 0) -> list[str]:
        """A `cplane` command line; on a cluster it lists node `node` first."""
        url = self.cluster.url_from(node) if self.cluster is not None else self.url
        base = [sys.executable, "-m", "cplane.cli", *args, "--nats-url", url]
        if self.spec.config:
            base += ["--config", self.spec.config]
        if self.auth is not None:
            base += ["--creds", self.auth.creds(principal)]
        if self.tls_ca:
            base += ["--tls-ca", self.tls_ca]
        return base

    def _worker_ids(self) -> list[str]:
        s = self.spec
        if s.engine == "openai":  # the instance ids workers/instances.py gives --url servers
            return ["remote"] if len(s.urls) == 1 else [f"remote-{i + 1}"
                                                        for i in range(len(s.urls))]
        return ["prefill-0", "decode-0"] if s.pd else [f"{s.engine}-{i}"
                                                        for i in range(s.workers)]

    def _start_server(self) -> None:
        """The embedded server: with --auth its accounts and every principal's credentials
        (written now), with --tls a throwaway CA and certificates."""
        s = self.spec
        extra = ""
        if s.auth:
            self.auth = AuthSetup.create(self._worker_ids(), s.tenants, s.gateway)
            extra = self.auth.config(load_settings(s.config))
        tls = None
        if s.tls:
            from cplane.bus.tls import make_certs

            tls = make_certs(tempfile.mkdtemp(prefix="cplane-tls-"))
            self.tls_ca = tls.ca
            self.tls_files = tls
        if s.cluster:
            self.cluster = EmbeddedCluster(s.cluster, client_tls=tls, extra_config=extra,
                                           own_session=True).start()
            self.url = self.cluster.url
            return
        self.server = EmbeddedNats(tls=tls, extra_config=extra, own_session=True).start()
        self.url = self.server.url

    def operator_nats(self) -> NatsSettings:
        """How this process (the operator) connects to the stack's server."""
        nats_settings = load_settings(self.spec.config).nats
        return msgspec.structs.replace(
            nats_settings, url=self.url, tls_ca=self.tls_ca or nats_settings.tls_ca,
            creds=self.auth.creds("operator") if self.auth else nats_settings.creds)

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
        if s.engine == "openai":
            urls = [arg for url in s.urls for arg in ("--url", url)]
            return [self._cli("worker", "--worker-id", "remote", "--group", "remote", *urls,
                              *common, principal="worker-remote", node=s.orchestrators)]
        kv: list[str] = []
        if s.pd and s.engine != "sim":
            self.kv_dir = tempfile.mkdtemp(prefix="cplane-kv-")
            kv = ["--kv-connector", "ExampleConnector", "--kv-shared-path", self.kv_dir]
        return [
            self._cli("worker", "--role", w.split("-")[0] if s.pd else "unified", "--worker-id",
                      w, *common, *kv, principal=f"worker-{w}", node=s.orchestrators + i)
            for i, w in enumerate(self._worker_ids())
        ]

    def start(self, timeout_s: float = 180.0) -> None:
        if not self.url:
            self._start_server()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.cluster_env())
        # Each process its own /metrics port (orchestrators first), free when picked.
        cmds = self._worker_cmds()
        n_orch = self.spec.orchestrators
        self.metrics_ports = [free_port() for _ in range(n_orch + len(cmds))]
        for i in range(n_orch):
            orch = self._cli("orchestrator", principal="orchestrator", node=i)
            self.procs.append(subprocess.Popen(orch, env={
                **env, "CPLANE__METRICS__ORCHESTRATOR_PORT": str(self.metrics_ports[i])}))
        for cmd, port in zip(cmds, self.metrics_ports[n_orch:], strict=True):
            self.procs.append(subprocess.Popen(cmd, env={
                **env, "CPLANE__METRICS__WORKER_PORT": str(port)}))
        if self.spec.gateway:
            try:
                self._start_gateway(env)
            except BaseException:
                self.stop()
                raise
        settings = load_settings(self.spec.config)
        n = len(self._worker_ids())
        seen = asyncio.run(wait_for_workers(self.url, n, timeout_s, settings.subjects,
                                            self.operator_nats()))
        if len(seen) < n:
            self.stop()
            raise RuntimeError(f"only {len(seen)} of {n} workers came up in {timeout_s} s")
        if self.gateway_url and not gateway_ready(self.gateway_url, n, 30.0,
                                                  self.tls_ca):
            self.stop()
            raise RuntimeError(f"the gateway at {self.gateway_url} did not become ready")
        orch_ports = self.metrics_ports[:self.spec.orchestrators]
        if not all(probe_ready(port, 60.0) for port in orch_ports):
            self.stop()
            raise RuntimeError("an orchestrator did not become ready (/readyz) in 60 s")

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
            self.gateway_url = url_of(self._gateway_sock, self.spec.tls or bool(cfg.tls_cert))
        return self.gateway_url or ""

    def _start_gateway(self, env: dict[str, str]) -> None:
        """`cplane gateway` on the socket bound here, inherited."""
        self.bind_gateway()
        sock, self._gateway_sock = self._gateway_sock, None
        assert sock is not None
        try:
            fd = sock.fileno()
            gw_env = {**env, **self.auth.gateway_env()} if self.auth else dict(env)
            if self.tls_files is not None:
                gw_env.update(CPLANE__GATEWAY__TLS_CERT=self.tls_files.server_cert,
                              CPLANE__GATEWAY__TLS_KEY=self.tls_files.server_key)
            self.procs.append(subprocess.Popen(
                self._cli("gateway", "--fd", str(fd), principal="gateway"), env=gw_env,
                pass_fds=(fd,), stdout=subprocess.DEVNULL))
        finally:
            sock.close()  # the gateway holds its own copy

    def cluster_env(self) -> dict[str, str]:
        """On a cluster: every stream and store with min(N, 3) replicas."""
        if self.cluster is None:
            return {}
        return {"CPLANE__STREAMS__REPLICAS": str(min(3, len(self.cluster.nodes)))}

    def stop(self) -> None:
        stop_processes(self.procs, 40)
        if self.server:
            self.server.stop()
            self.server = None
        if self.cluster:
            self.cluster.stop()
            self.cluster = None

    def _print_principals(self) -> None:
        """--auth: how each principal connects (one JSON object per line with --json)."""
        if self.auth is None:
            return
        for rec in self.auth.describe(self.url):
            if self.spec.as_json:
                print(json.dumps(rec), flush=True)
                continue
            who = f"{rec['role']} {rec['tenant']}" if rec["tenant"] else rec["role"]
            key = f" (gateway API key {rec['api_key']})" if "api_key" in rec else ""
            print(f"  {who}: --nats-url {redact(self.url)} --creds {rec['file']}{key}",
                  flush=True)
        if self.tls_ca:
            print(f"  TLS: every client needs --tls-ca {self.tls_ca}", flush=True)

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
        roles = ("prefill+decode" if s.pd else f"{len(self._worker_ids())} unified")
        orch = f"{s.orchestrators} orchestrator replicas" if s.orchestrators > 1 else "orchestrator"
        print(f"cplane is up: NATS at {redact(self.url)} | {orch} + {roles} {s.engine} "
              f"worker(s), model {s.model!r}", flush=True)
        if self.gateway_url:
            print(f"  gateway: {self.gateway_url}  (OpenAI API at {self.gateway_url}/v1)",
                  flush=True)
        n_orch = s.orchestrators
        others = ", ".join(map(str, self.metrics_ports[1:n_orch]))
        print(f"  metrics: http://127.0.0.1:{self.metrics_ports[0]}/metrics (orchestrator"
              f"{'; its replicas on ports ' + others if others else ''}), workers on ports "
              f"{', '.join(map(str, self.metrics_ports[n_orch:]))}", flush=True)
        if self.cluster is not None:
            print(f"  cluster: {len(self.cluster.nodes)} nats-server nodes, every stream and "
                  f"store R{self.cluster_env()['CPLANE__STREAMS__REPLICAS']}; give your own "
                  "processes all the URLs and CPLANE__STREAMS__REPLICAS the same", flush=True)
            for i, node in enumerate(self.cluster.nodes):
                print(f"    n{i + 1}: {redact(node.url)}  (monitoring http://127.0.0.1:"
                      f"{self.cluster.monitor_ports[i]}, store {node.store_dir})", flush=True)
        who = f" --creds {self.auth.creds('operator')}" if self.auth else ""
        who += f" --tls-ca {self.tls_ca}" if self.tls_ca else ""
        print(f"  try: cplane generate 'Hello' --nats-url {redact(self.url)}{who}", flush=True)
        print("  or publish JSON to llm.req.normal.standard, read llm.out.i.<id> / llm.done.i.<id>",
              flush=True)
        self._print_principals()
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
