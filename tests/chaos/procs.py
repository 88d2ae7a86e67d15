"""Processes of the chaos run: nats-server (or a cluster's nodes) and the cplane services, each its own OS process.

Black box, as an operator sees it: the services are started through the CLI
(`python -m cplane.cli ...`), configured by `CPLANE__SECTION__KEY` variables,
killed with SIGKILL, and paused with SIGSTOP / SIGCONT (`Proc.pause`: a process
that is slow, not dead). Every wait is bounded; `Fleet.stop_all` ends every
process this module started, by pid, whatever happened before.

With credentials (the chaos run: tenants.py), the broker's configuration
holds the accounts block (and keeps it across restarts: the file is written
once) and each service gets `--creds` with its own principal's file.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cplane.bus.server import free_port, nats_server_binary

ROOT = Path(__file__).resolve().parents[2]
# Where the services run from (their working directory): this checkout unless
# CPLANE_CHAOS_ROOT names another tree (e.g. an exported commit, to compare).
SERVICE_ROOT = Path(os.environ.get("CPLANE_CHAOS_ROOT") or ROOT)


# Every process started here, so a fixture can kill survivors whatever happened.
STARTED: list[Proc] = []


def _die_with_parent() -> None:
    """In the child: SIGKILL it when the test process dies (PR_SET_PDEATHSIG), no orphans."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


def kill_survivors() -> list[str]:
    """SIGKILL every process this module started that still runs; their names."""
    left = [p for p in STARTED if p.alive()]
    for p in left:
        p.kill9()
    return [p.name for p in left]


def vm_hwm_kb(pid: int) -> int:
    """Peak resident set (VmHWM) of a live process, in KiB; 0 when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Proc:
    """One child process with its own log file (appended to across restarts)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.argv, self.env, self.log = name, argv, env, log
        self.popen: subprocess.Popen[bytes] | None = None
        self.peak_kb = 0
        self.paused = False  # SIGSTOPped by `pause` right now

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen else -1

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> Proc:
        self.paused = False
        with open(self.log, "ab") as fh:
            fh.write(f"\n==== chaos: start {self.name} at {time.time():.3f}\n".encode())
            fh.flush()
            self.popen = subprocess.Popen(
                self.argv, stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=SERVICE_ROOT,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        STARTED.append(self)
        return self

    def sample_rss(self) -> None:
        if self.alive():
            self.peak_kb = max(self.peak_kb, vm_hwm_kb(self.pid))

    def tail(self, n: int = 6) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"    {self.log.name}: {x}" for x in lines[-n:])

    def current_log_has(self, text: str) -> bool:
        """Whether the log written since the last start contains `text`."""
        try:
            data = self.log.read_text(errors="replace")
        except OSError:
            return False
        return text in data[data.rfind("==== chaos: start"):]

    def _note(self, what: str) -> None:
        with open(self.log, "ab") as fh:
            fh.write(f"\n==== chaos: {what} {self.name} pid={self.pid} at {time.time():.3f}\n"
                     .encode())

    def kill9(self) -> None:
        if not self.alive():
            return
        assert self.popen is not None
        self.sample_rss()
        self._note("SIGKILL")
        self.popen.send_signal(signal.SIGKILL)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass

    async def pause(self, seconds: float, max_s: float = 30.0) -> bool:
        """SIGSTOP, `seconds` (at most `max_s`) stopped, then SIGCONT; False when not running.

        The process is resumed whatever happens meanwhile (cancellation
        included), and only the process that was stopped: a restart under the
        same `Proc` meanwhile gets no stray SIGCONT (`Popen.send_signal` sends
        nothing to a process already reaped).
        """
        popen = self.popen
        if popen is None or popen.poll() is not None or self.paused:
            return False
        seconds = max(0.0, min(seconds, max_s))
        self.sample_rss()
        self._note(f"SIGSTOP for {seconds:.1f}s")
        popen.send_signal(signal.SIGSTOP)
        self.paused = True
        try:
            await asyncio.sleep(seconds)  # the fault under test: the process is stopped this long
        finally:
            popen.send_signal(signal.SIGCONT)
            if self.popen is popen:
                self.paused = False
            with contextlib.suppress(OSError):
                self._note("SIGCONT")
        return True

    async def terminate(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, wait (bounded, without blocking the loop), then SIGKILL."""
        if not self.alive():
            return
        assert self.popen is not None
        self.sample_rss()
        self._note("SIGTERM")
        self.popen.send_signal(signal.SIGTERM)
        self.popen.send_signal(signal.SIGCONT)  # a stopped process acts on SIGTERM only once resumed
        deadline = time.monotonic() + timeout_s
        while self.popen.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # poll for the exit (bounded), keeping the loop free
        if self.popen.poll() is None:
            self.kill9()


async def wait_port(port: int, proc: Proc, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited (see {proc.log})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            await asyncio.sleep(0.05)  # poll for the port (bounded by timeout_s)
    raise TimeoutError(f"{proc.name} did not listen on {port} within {timeout_s} s")


class NatsServer:
    """nats-server with JetStream file storage; restarts on the same port and store dir.

    Same configuration as bus.server.EmbeddedNats (sync_interval on purpose);
    `extra_config` (an `accounts { ... }` block; a cluster node's own lines) is
    appended, as there. `name` other than the default: a node of a cluster
    (tests/chaos/cluster.py), its files under run_dir/<name>, its log <name>.log.
    """

    def __init__(self, run_dir: Path, sync_interval: str = "100ms",
                 extra_config: str = "", name: str = "nats-server") -> None:
        self.name = name
        self.port = free_port()
        home = run_dir if name == "nats-server" else run_dir / name
        home.mkdir(parents=True, exist_ok=True)
        self.store = home / "js"
        self.conf = home / "nats.conf"
        self.conf.touch(mode=0o600)  # the accounts block holds passwords
        self.conf.chmod(0o600)
        self.conf.write_text("\n".join([
            "listen: 127.0.0.1:%d" % self.port,
            "max_payload: %d" % (8 << 20),
            "jetstream {",
            '  store_dir: "%s"' % self.store,
            "  sync_interval: %s" % sync_interval,
            "}",
            extra_config,
            "",
        ]))
        self.proc = Proc(name, [nats_server_binary(), "-c", str(self.conf)],
                         dict(os.environ), run_dir / f"{name}.log")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def procs(self) -> list[Proc]:
        """Every nats-server process of the broker (one here; a cluster's nodes there)."""
        return [self.proc]

    def available(self) -> bool:
        """Whether a process started now can connect (and find JetStream)."""
        return self.proc.alive() and not self.proc.paused

    async def start(self) -> None:
        self.proc.start()
        await wait_port(self.port, self.proc)

    async def restart(self, graceful: bool, down_s: float = 1.0) -> None:
        if graceful:
            await self.proc.terminate(15.0)
        else:
            self.proc.kill9()
        await asyncio.sleep(down_s)  # the outage under test: the broker stays down down_s
        await self.start()

    async def stop(self) -> None:
        await self.proc.terminate(10.0)


class Fleet:
    """Orchestrator replicas and sim workers, started through the CLI.

    A process may reach the broker through its own URL (a partition proxy,
    tests/chaos/proxy.py): `urls` by process name; the rest use `url`.

    `creds` (tenants.ChaosAuth.creds), when given: each process runs as its own
    principal (`orchestrator`, `worker-<id>`). Then `worker_ids` are the only
    ids a worker may have: a new worker takes the next unused one, and once
    they are used up the id of a worker that is not running.
    """

    def __init__(self, run_dir: Path, url: str, env: dict[str, str], capacity: int,
                 creds: Callable[[str], str] | None = None,
                 worker_ids: list[str] | None = None) -> None:
        self.dir, self.url, self.env, self.capacity = run_dir, url, env, capacity
        self.creds = creds
        self.worker_ids = worker_ids
        self.orchestrators: list[Proc] = []
        self.workers: dict[str, Proc] = {}
        self.retired: list[Proc] = []
        self.next_worker = 1
        self.events: list[str] = []
        self.urls: dict[str, str] = {}
        self.models: dict[str, str] = {}  # worker id -> the model it was started with

    def _python(self) -> str:
        venv = ROOT / ".venv" / "bin" / "python"
        return str(venv) if venv.exists() else sys.executable

    def url_of(self, name: str) -> str:
        return self.urls.get(name, self.url)

    def _creds(self, principal: str) -> list[str]:
        return ["--creds", self.creds(principal)] if self.creds is not None else []

    def start_orchestrator(self, url: str | None = None,
                           env: dict[str, str] | None = None) -> Proc:
        i = len(self.orchestrators)
        name = f"orch{i}"
        if url is not None:
            self.urls[name] = url
        p = Proc(name, [self._python(), "-m", "cplane.cli", "orchestrator",
                        *self._creds("orchestrator"), "--nats-url", self.url_of(name)],
                 {**self.env, **(env or {})}, self.dir / f"orch{i}.log")
        self.orchestrators.append(p.start())
        return p

    def _new_worker_id(self) -> str:
        if self.worker_ids is None:
            worker_id = f"w{self.next_worker}"
            self.next_worker += 1
            return worker_id
        fresh = [w for w in self.worker_ids if w not in self.workers]
        if fresh:
            return fresh[0]
        dead = [w for w in self.worker_ids if not self.workers[w].alive()]
        if not dead:
            raise RuntimeError(f"every worker id of the run is in use: {self.worker_ids}")
        self.note(f"worker ids used up: a new worker reuses {dead[0]}")
        return dead[0]

    def start_worker(self, worker_id: str | None = None, url: str | None = None,
                     model: str | None = None) -> Proc:
        """`model`: the one it serves (default: the settings', `sim`); a restart under
        the same id keeps it."""
        if model is None:
            model = self.models.get(worker_id or "")
        if worker_id is None:
            worker_id = self._new_worker_id()
        if url is not None and url != self.url:
            self.urls[worker_id] = url
        else:  # direct (a reused id may have had a proxy before)
            self.urls.pop(worker_id, None)
        argv = [self._python(), "-m", "cplane.cli", "worker", "--engine", "sim",
                "--worker-id", worker_id, *self._creds(f"worker-{worker_id}"),
                "--nats-url", self.url_of(worker_id), "--capacity", str(self.capacity)]
        if model is not None:
            argv += ["--model", model]
            self.models[worker_id] = model
        p = Proc(worker_id, argv, self.env, self.dir / f"worker-{worker_id}.log")
        old = self.workers.get(worker_id)
        if old is not None:
            self.retired.append(old)
        self.workers[worker_id] = p.start()
        return p

    def orchestrator_by_id(self, orch_id: str) -> Proc | None:
        """The replica whose current run logged `orchestrator <orch_id> up` (ids are generated)."""
        for p in self.orchestrators:
            if p.alive() and p.current_log_has(f"orchestrator {orch_id} up"):
                return p
        return None

    def live_workers(self) -> list[str]:
        return [wid for wid, p in self.workers.items() if p.alive()]

    def note(self, what: str) -> None:
        self.events.append(f"{time.time():.3f} {what}")

    def all_procs(self) -> list[Proc]:
        return [*self.orchestrators, *self.workers.values(), *self.retired]

    def sample_rss(self) -> None:
        for p in self.all_procs():
            p.sample_rss()

    def max_rss_mb(self) -> int:
        return max((p.peak_kb for p in self.all_procs()), default=0) // 1024

    def dead_unexpectedly(self) -> list[str]:
        """Processes that exited on their own (not killed by the harness), with exit codes."""
        return [f"{p.name} rc={p.popen.returncode}" for p in self.all_procs()
                if p.popen is not None and p.popen.returncode not in (None, -9)
                and p not in self.retired]

    async def stop_all(self) -> None:
        procs = [p for p in self.all_procs() if p.alive()]
        await asyncio.gather(*(p.terminate(10.0) for p in procs), return_exceptions=True)
