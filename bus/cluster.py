"""A local JetStream cluster: N `nats-server` processes on loopback, for `cplane up
--cluster N`, the cluster chaos suite and tests.

Each node is an `EmbeddedNats` (bus/server.py) with its own store, client port,
route port and monitoring port (loopback only; it has no authentication).
Routes are authorized by certificate: they speak TLS, both sides verified
against a throwaway CA, and a node accepts a route only from a peer whose
certificate subject is the route user (`verify_and_map`), so there is no route
password to keep. Every node lists every route, so any node can start first.

`url` is every node's client URL, comma-separated, in the form each cplane
process takes with `--nats-url`; `url_from(i)` lists node i first, so
processes given different `i` connect to different nodes first (and fail over
to the others). Nodes are killed and started again on their store one at a
time; `meta_leader()` and `stream_leader(name)` say which node leads (from the
monitoring endpoint). The chaos suite's nodes (tests/chaos/cluster.py) use the
same node configuration, URL order and leader lookups.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from cplane.bus.server import EmbeddedNats, free_port

if TYPE_CHECKING:  # bus/tls.py imports cryptography: only where certificates are made
    from cplane.bus.tls import TlsFiles

CLUSTER_NAME = "cplane"
ROUTE_USER = "CN=cplane nats-server"  # the subject of make_certs' server certificate


# Route pings: a node that answers nothing (SIGSTOP, a hung process) loses its routes
# after about ROUTE_PING_S * (ROUTE_PING_MAX + 1) s, not the default 2 min x 2.
ROUTE_PING_S = 1
ROUTE_PING_MAX = 3


def node_config(name: str, route_port: int, monitor_port: int, routes: list[str],
                tls: TlsFiles) -> str:
    """The lines that make a nats-server node `name` of the loopback cluster: its name,
    monitoring port, and the cluster block (route TLS both ways verified, the route
    user from the certificate subject, every route listed)."""
    return "\n".join([
        f"server_name: {name}",
        f"http: 127.0.0.1:{monitor_port}",
        "cluster {",
        f"  name: {CLUSTER_NAME}",
        f"  listen: 127.0.0.1:{route_port}",
        f'  ping_interval: "{ROUTE_PING_S}s"',
        f"  ping_max: {ROUTE_PING_MAX}",
        "  tls {",
        f'    cert_file: "{tls.server_cert}"',
        f'    key_file: "{tls.server_key}"',
        f'    ca_file: "{tls.ca}"',
        "    timeout: 2",
        "    verify_and_map: true",
        "  }",
        f'  authorization {{ user: "{ROUTE_USER}", timeout: 2 }}',
        f"  routes: [{', '.join(routes)}]",
        "}",
    ])


def route_urls(ports: list[int]) -> list[str]:
    return [f"nats-route://127.0.0.1:{p}" for p in ports]


def urls_from(urls: list[str], i: int) -> str:
    """`urls` comma-separated with the `i % len(urls)`-th first: processes given
    different `i` connect to different nodes first (and fail over to the others)."""
    k = i % len(urls)
    return ",".join(urls[k:] + urls[:k])


def node_index(name: str | None, size: int) -> int | None:
    """Index of the node whose server_name is `name` (n1 -> 0), None for another name."""
    if not name or not name.startswith("n") or not name[1:].isdigit():
        return None
    i = int(name[1:]) - 1
    return i if 0 <= i < size else None


class ClusterNotReadyError(TimeoutError):
    """The cluster did not elect a JetStream meta leader in time."""


class EmbeddedCluster:
    """`size` nats-server nodes forming one JetStream cluster on loopback."""

    def __init__(
        self,
        size: int = 3,
        store_root: str | None = None,
        client_tls: TlsFiles | None = None,
        extra_config: str = "",
        sync_interval: str = "100ms",
        max_file_store: str | None = None,
        own_session: bool = False,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        from cplane.bus.tls import make_certs

        self._own_root = store_root is None
        self.root = store_root or tempfile.mkdtemp(prefix="cplane-cluster-")
        # Route certificates: the same server certificate dials and serves routes.
        self.route_tls = client_tls or make_certs(Path(self.root, "tls"))
        ports = [(free_port(), free_port(), free_port()) for _ in range(size)]
        routes = route_urls([route for _, route, _ in ports])
        self.monitor_ports = [mon for _, _, mon in ports]
        self.nodes: list[EmbeddedNats] = []
        for i, (client, route, mon) in enumerate(ports):
            name = f"n{i + 1}"
            store = Path(self.root, name)
            store.mkdir(parents=True, exist_ok=True)
            block = node_config(name, route, mon, routes, self.route_tls) + "\n" + extra_config
            self.nodes.append(EmbeddedNats(
                port=client, store_dir=str(store), sync_interval=sync_interval,
                max_file_store=max_file_store, tls=client_tls, extra_config=block,
                own_session=own_session))

    # -- where to connect ------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated (`--nats-url`, NATS_URL)."""
        return ",".join(self.urls)

    def url_from(self, i: int) -> str:
        """Every node's URL with node `i % size` first: spreads processes over nodes."""
        return urls_from(self.urls, i)

    # -- life cycle -----------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> EmbeddedCluster:
        """Start every node, then wait until JetStream has a meta leader."""
        for node in self.nodes:
            node.start(timeout_s)
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until every running node reports JetStream healthy and a meta leader is known."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.meta_leader() is not None and all(
                    self._healthy(i) for i, n in enumerate(self.nodes) if n.running):
                return
            time.sleep(0.1)
        raise ClusterNotReadyError(f"the {len(self.nodes)}-node cluster has no JetStream "
                                   f"meta leader after {timeout_s} s (logs in {self.root})")

    def kill(self, i: int) -> None:
        """SIGKILL node `i` (a crash: the last sync interval may be lost); store kept."""
        self.nodes[i].kill()

    def start_node(self, i: int, timeout_s: float = 30.0) -> None:
        """Start node `i` again on its ports and store."""
        self.nodes[i].start(timeout_s)

    def stop(self) -> None:
        """Stop every node (resumed first, should a test have paused it) and delete a
        store made here."""
        for node in self.nodes:
            if node.proc is not None and node.running:
                node.proc.send_signal(signal.SIGCONT)
            node.terminate()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- who leads (the monitoring endpoint) ------------------------------------------
    def _ports(self) -> list[int]:
        return [p for p, n in zip(self.monitor_ports, self.nodes, strict=True) if n.running]

    def _healthy(self, i: int) -> bool:
        return node_healthy(self.monitor_ports[i])

    def node_named(self, name: str | None) -> int | None:
        """Index of the node whose server_name is `name` (n1 -> 0)."""
        return node_index(name, len(self.nodes))

    def meta_leader(self) -> int | None:
        """The JetStream meta leader's index, as the first answering node sees it."""
        return self.node_named(leader_of(self._ports()))

    def stream_leader(self, stream: str) -> int | None:
        """Index of the node leading `stream` (its Raft group), None when none is known."""
        return self.node_named(leader_of(self._ports(), stream))


def monitor_json(port: int, path: str, timeout_s: float = 1.0) -> dict[str, Any] | None:
    """A node's monitoring endpoint's answer (None: no answer, a paused or dead node)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as r:
            data = json.loads(r.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def node_healthy(port: int) -> bool:
    """The node's JetStream is up and current with the cluster: its meta layer and every
    stream and consumer it holds caught up (`/healthz`, what a Kubernetes probe asks)."""
    data = monitor_json(port, "/healthz")
    return data is not None and data.get("status") == "ok"


def leader_of(monitor_ports: list[int], stream: str | None = None) -> str | None:
    """The server name of the JetStream meta leader (`stream` None) or of the leader of
    `stream` (any account), as the first node that answers sees it."""
    for port in monitor_ports:
        if stream is None:
            meta = (monitor_json(port, "/jsz") or {}).get("meta_cluster")
            if isinstance(meta, dict):
                return meta.get("leader") or None
            continue
        data = monitor_json(port, "/jsz?streams=true")
        if data is None:
            continue
        for acc in data.get("account_details") or []:
            for st in acc.get("stream_detail") or []:
                if st.get("name") == stream:
                    return (st.get("cluster") or {}).get("leader") or None
        return None
    return None


__all__ = ["CLUSTER_NAME", "ROUTE_PING_MAX", "ROUTE_PING_S", "ROUTE_USER", "ClusterNotReadyError",
           "EmbeddedCluster", "leader_of", "monitor_json", "node_config", "node_healthy",
           "node_index", "route_urls", "urls_from"]
