"""The stacks bench/peers.py puts side by side, each started as its own processes.

- cplane: `cplane up`'s processes (embedded nats-server, orchestrator, sim
  workers, gateway), the sim's step formulas scaled 1000x down;
- NVIDIA Dynamo 1.6.1: `dynamo.frontend` (Rust HTTP frontend and router) in
  front of `dynamo.mocker` engines at `--speedup-ratio 1000`, file discovery,
  zmq event plane, no etcd or NATS (../shared/PEERS.md);
- vLLM's router (`vllm-router`) and SGLang's model gateway (`smg`), both Rust,
  in front of bench/zero_engine.py HTTP servers.

Each peer is installed into a virtual environment of its own, never the
project's.

Each stack says which processes are its own, so CPU per request counts
every process of the stack and nothing else (not the load generator).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from remote_overhead import cpu_s as proc_cpu_s  # noqa: E402
from remote_overhead import descendants  # noqa: E402

from cplane.bus.server import free_port  # noqa: E402
from cplane.stack import Stack, StackSpec  # noqa: E402
from tests.vllm_model import build_tokenizer  # noqa: E402

DYNAMO_VERSION = "1.6.1"
# ai-dynamo's requirements without aisimulate: on PyPI it is a stub that fetches the
# real wheel from an index this machine cannot reach; the mocker does not need it.
_DYNAMO_DEPS = ["aiohttp>=3.14.3,<4.0", "certifi", "kubernetes>=32.0.1,<33.0.0", "msgspec>=0.19.0",
                "prometheus-client>=0.23.1,<1.0", "pyzmq>=26.0.0", "redis>=6.2.0,<9.0.0",
                "tqdm>=4.0.0", "transformers>=4.56.0", "typing-extensions>=4.10.0",
                "zstandard>=0.23.0,<1.0"]
DEFAULT_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / \
    "cplane-peers" / f"dynamo-{DYNAMO_VERSION}"

# cplane's sim step formulas scaled 1000x down (Dynamo's mockers run --speedup-ratio 1000):
# engines of nearly zero cost, so what is measured is each stack's own path.
SIM_1000X = {"prefill_a_ms": 0.0055, "prefill_b_ms": 0.0000192, "prefill_c_ms": 0.0,
             "decode_a_ms": 0.0065, "decode_b_ms": 0.0, "decode_c_ms": 0.0}
SPEEDUP = 1000
MAX_NUM_SEQS = 256
BLOCK = 64  # KV block (prefix cache) tokens, both stacks


class PeerStack(Protocol):
    name: str
    router: str
    url: str

    def body(self, prompt: str, max_tokens: int) -> dict[str, Any]: ...
    def stop(self) -> None: ...


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and every descendant."""
    return proc_cpu_s([q for p in pids for q in (p, *descendants(p))])


def cpu_by_name(pids: dict[str, list[int]]) -> dict[str, float]:
    return {name: cpu_s(ps) for name, ps in pids.items()}


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGINT (how Dynamo and the router stop cleanly), then kill after 10 s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return bytes(r.read())


# -- cplane ---------------------------------------------------------------------------

class CplaneStack:
    """`cplane up`'s processes with scaled sim workers, fronted by the gateway."""

    name = "cplane"

    def __init__(self, workers: int, router: str, chunk_interval_ms: float = 0.0) -> None:
        self.router = router
        self.variant = f"chunks >= {chunk_interval_ms:g} ms apart" if chunk_interval_ms \
            else "default"
        sim = "\n".join(f"{k} = {v!r}" for k, v in SIM_1000X.items())
        toml = (f"[orchestrator]\nrouter = {router!r}\n\n[sim]\n{sim}\n"
                f"max_num_seqs = {MAX_NUM_SEQS}\nprefix_block_tokens = {BLOCK}\n\n[worker]\n"
                f"chunk_interval_ms = {chunk_interval_ms!r}\n")
        fh = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
        fh.write(toml)
        fh.close()
        self._config = fh.name
        self.stack = Stack(StackSpec(config=fh.name, workers=workers, capacity=MAX_NUM_SEQS,
                                     model="sim"))
        self.stack.start()
        self.url = self.stack.gateway_url or ""

    def processes(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        if self.stack.server is not None and self.stack.server.proc is not None:
            out["nats-server"] = [self.stack.server.proc.pid]
        for p in self.stack.procs:
            args = [str(a) for a in p.args]  # type: ignore[union-attr]
            role = next((a for a in ("gateway", "orchestrator", "worker") if a in args), "other")
            out.setdefault(role, []).append(p.pid)
        return out

    def body(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        return {"model": "sim", "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}}

    def stop(self) -> None:
        self.stack.stop()
        os.unlink(self._config)


# -- NVIDIA Dynamo ----------------------------------------------------------------------

def install_dynamo(venv: Path = DEFAULT_VENV) -> Path:
    """Dynamo in its own virtual environment (made once, reused); returns its python."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run(
            [python, "-c", "import dynamo.frontend, dynamo.mocker"],
            capture_output=True).returncode == 0:
        return python
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, f"ai-dynamo-runtime=={DYNAMO_VERSION}", *_DYNAMO_DEPS], check=True)
    subprocess.run([*pip, "--no-deps", f"ai-dynamo=={DYNAMO_VERSION}"], check=True)
    return python


def model_dir(out: Path) -> tuple[Path, list[int]]:
    """A model directory the frontend accepts (config with `architectures`, a tokenizer;
    no weights) and the token ids of a plain sentence, for the mockers' replayed output."""
    from tokenizers import Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out, 512)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "vocab_size": vocab, "hidden_size": 128, "intermediate_size": 256,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 32, "max_position_embeddings": 8192, "torch_dtype": "float32",
              "bos_token_id": tok.token_to_id("<s>"), "eos_token_id": tok.token_to_id("</s>")}
    (out / "config.json").write_text(json.dumps(config))
    words = tok.encode(" the quick brown fox jumps over the lazy dog").ids
    return out, words


class DynamoStack:
    """`dynamo.frontend` + `workers` x `dynamo.mocker`, loopback only, own HOME.
    `router`: Dynamo's own `--router-mode` name (peers.py's DYNAMO_ROUTER)."""

    name = "dynamo"
    model = "peer-model"
    variant = "default"

    def __init__(self, python: Path, workers: int, router: str, max_tokens: int) -> None:
        self.router = router
        self.tmp = Path(tempfile.mkdtemp(prefix="cplane-peers-dynamo-"))
        path, words = model_dir(self.tmp / "model")
        # The mocker's own output ids are hashes the tokenizer decodes to nothing; a
        # replay row makes it stream real words (its length sets the token count).
        trace = self.tmp / "replay.jsonl"
        ids = (words * (max_tokens // len(words) + 1))[:max_tokens]
        trace.write_text(json.dumps({"request_id": "peer", "output_length": len(ids),
                                         "output_token_ids": ids}) + "\n")
        env = dict(os.environ, HOME=str(self.tmp), HF_HUB_OFFLINE="1",
                   DYN_FILE_KV=str(self.tmp / "kv"), DYN_TCP_RPC_HOST="127.0.0.1",
                   DYN_EVENT_PLANE_HOST="127.0.0.1", DYN_TCP_RESPONSE_STREAM_HOST="127.0.0.1",
                   DYN_LOG="warn")
        env.pop("VIRTUAL_ENV", None)
        common = ["--discovery-backend", "file", "--event-plane", "zmq"]
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        log = open(self.tmp / "dynamo.log", "wb")
        self._log = log
        self.procs = [subprocess.Popen(
            [str(python), "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port",
             str(port), "--router-mode", router, *common], env=env, stdout=log, stderr=log)]
        for _ in range(workers):
            self.procs.append(subprocess.Popen(
                [str(python), "-m", "dynamo.mocker", "--model-path", str(path), "--model-name",
                 self.model, "--speedup-ratio", str(SPEEDUP), "--max-num-seqs",
                 str(MAX_NUM_SEQS), "--block-size", str(BLOCK), "--response-replay-trace-path",
                 str(trace), *common],
                env=env, stdout=log, stderr=log))
        self._ready(workers, 90.0)

    def _ready(self, workers: int, timeout_s: float) -> None:
        """The model listed and every mocker answering (a request served by each)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            try:
                if self.model in _get(self.url + "/v1/models").decode():
                    if self._instances() >= workers:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        tail = (self.tmp / "dynamo.log").read_text(errors="replace")[-6000:]
        self.stop()
        raise RuntimeError(f"Dynamo did not become ready in {timeout_s} s: {tail}")

    def _instances(self) -> int:
        """Mockers registered in file discovery (one instance record each)."""
        root = self.tmp / "kv"
        listed = root / "v1" / "instances"
        return sum(1 for p in listed.glob("*generate*")) if listed.exists() else 0

    def processes(self) -> dict[str, list[int]]:
        return {"frontend": [self.procs[0].pid], "mocker": [p.pid for p in self.procs[1:]]}

    def body(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        return {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True},
                "nvext": {"annotations": ["output_replay_id:peer"]}}

    def stop(self) -> None:
        _stop(self.procs)
        self._log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- HTTP routers in front of HTTP engines (vLLM's, SGLang's) --------------------------

# name -> (PyPI package, version, arguments before the common ones, arguments after them)
HTTP_ROUTERS = {"vllm-router": ("vllm-router", "0.1.17", [], ["--disable-retries"]),
                "smg": ("smg", "1.13.0", ["launch"], [])}


def venv_tool(package: str, version: str, root: Path = DEFAULT_VENV.parent) -> Path:
    """`package==version` from PyPI in a virtual environment of its own under `root`
    (made once, never the project's); returns its executable `bin/<package>`."""
    venv = root / f"{package}-{version}"
    exe = venv / "bin" / package
    if exe.exists():
        return exe
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", f"{package}=={version}"], check=True)
    return exe


def install_router(name: str, root: Path = DEFAULT_VENV.parent) -> Path:
    """A Rust HTTP router from PyPI (`vllm-router`: vLLM's; `smg`: SGLang's model
    gateway) in its own virtual environment; returns its executable."""
    package, version, _, _ = HTTP_ROUTERS[name]
    return venv_tool(package, version, root)


class HttpRouterStack:
    """An HTTP router (`vllm-router` or `smg`) in front of `workers` x
    bench/zero_engine.py (near-zero-cost HTTP engines, one SSE event per token). The
    engines are this bench's own Python servers, so these rows measure a router with
    engines of another kind than cplane's and Dynamo's."""

    model = "zero"
    variant = "default"

    def __init__(self, name: str, exe: Path, workers: int, router: str) -> None:
        self.name = name
        self.router = router
        ports = [free_port() for _ in range(workers)]
        self.procs: list[subprocess.Popen[bytes]] = [subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "zero_engine.py"), "--port", str(p),
             "--model", self.model], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for p in ports]
        try:
            for p in ports:
                _wait_http(f"http://127.0.0.1:{p}/health", 30.0)
        except RuntimeError:
            _stop(self.procs)  # an engine that never came up: none of them outlives it
            raise
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"cplane-peers-{name}-"))
        self._log = open(self.tmp / "router.log", "wb")
        policy = {"round_robin": "round_robin", "prefix_aware": "cache_aware"}.get(router, router)
        _, _, before, after = HTTP_ROUTERS[name]
        self.procs.insert(0, subprocess.Popen(
            [str(exe), *before, "--host", "127.0.0.1", "--port", str(port), "--policy",
             policy, "--worker-urls", *(f"http://127.0.0.1:{p}" for p in ports),
             "--log-level", "warn" if name == "smg" else "warning", *after],
            stdout=self._log, stderr=self._log))
        try:
            _wait_http(self.url + "/v1/models", 60.0)
        except RuntimeError:
            self.stop()
            raise

    def processes(self) -> dict[str, list[int]]:
        return {"router": [self.procs[0].pid], "engine": [p.pid for p in self.procs[1:]]}

    def body(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        return {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}}

    def stop(self) -> None:
        _stop(self.procs)
        self._log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _get(url)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {timeout_s} s")
