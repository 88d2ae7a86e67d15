"""The performance model against public measurements of 70B models (not calibration data).

    .venv/bin/python bench/planner_validate.py [--json]

Each row is one published figure: who measured it, the engine, the GPU, the
layout and the shape; the model's prediction beside it. Prefill rows are
time to first token at batch 1 (engine-side, or a client on the same host);
decode rows are the time per output token. The median absolute error per
kind is what docs/planner.md reports.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from typing import Any

from cplane.fleetsim.gpus import gpu
from cplane.fleetsim.model_config import ModelConfig
from cplane.fleetsim.perf_model import Layout, decode_step_ms, prefill_ms

LLAMA2_70B = ModelConfig(name="Llama-2-70B", hidden=8192, layers=80, heads=64, kv_heads=8,
                         head_dim=128, intermediate=28672, vocab=32000, max_context=4096)
LLAMA3_70B = ModelConfig(name="Llama-3-70B", hidden=8192, layers=80, heads=64, kv_heads=8,
                         head_dim=128, intermediate=28672, vocab=128256, max_context=8192)

TRT = "TensorRT-LLM v0.5 docs/source/performance.md, 'Low Latency' (1st token, batch 1)"
LMD = ("lmdeploy v0.1.0a1 docs/en/benchmark/a100_fp16.md, llama2-70b static inference "
       "(8x A100-80G; prefill = FTL, decode = token latency p50)")
NIM = ("NVIDIA NIM LLM benchmarking docs, performance page: Llama-3.3-70B-Instruct NIM 1.8.0, "
       "2x H100 80G, fp8 TP2, concurrency 1")
VLLM = ("vLLM nightly performance benchmark (buildkite vllm/performance-benchmark build 9515): "
        "latency_llama70B_tp4 on H200, batch 8, 32 in / 128 out, mean 2077.5 ms end to end")


@dataclass(frozen=True)
class Point:
    kind: str  # prefill | decode | e2e
    source: str
    model: ModelConfig
    gpu: str
    tp: int
    dtype: str
    batch: int
    prompt: int
    context: int  # decode: mean context over the run; e2e: output tokens
    measured_ms: float


POINTS = (
    Point("prefill", TRT, LLAMA2_70B, "h100-80gb", 4, "fp8", 1, 128, 0, 26),
    Point("prefill", TRT, LLAMA2_70B, "h100-80gb", 4, "fp8", 1, 2048, 0, 109),
    Point("prefill", TRT, LLAMA2_70B, "a100-80gb", 4, "bf16", 1, 128, 0, 47),
    Point("prefill", TRT, LLAMA2_70B, "a100-80gb", 4, "bf16", 1, 2048, 0, 377),
    Point("prefill", LMD, LLAMA2_70B, "a100-80gb", 4, "bf16", 1, 128, 0, 74),
    Point("prefill", LMD, LLAMA2_70B, "a100-80gb", 4, "bf16", 1, 2048, 0, 402),
    Point("prefill", NIM, LLAMA3_70B, "h100-80gb", 2, "fp8", 1, 500, 0, 47.77),
    Point("prefill", NIM, LLAMA3_70B, "h100-80gb", 2, "fp8", 1, 5000, 0, 406.77),
    Point("decode", LMD, LLAMA2_70B, "a100-80gb", 4, "bf16", 1, 1, 65, 29),
    Point("decode", LMD, LLAMA2_70B, "a100-80gb", 4, "bf16", 1, 2048, 3072, 31),
    Point("decode", LMD, LLAMA2_70B, "a100-80gb", 4, "bf16", 16, 128, 192, 30),
    Point("decode", LMD, LLAMA2_70B, "a100-80gb", 4, "bf16", 16, 2048, 3072, 36),
    Point("decode", LMD, LLAMA2_70B, "a100-80gb", 4, "bf16", 32, 128, 192, 32),
    Point("decode", LMD, LLAMA2_70B, "a100-80gb", 4, "bf16", 32, 2048, 3072, 43),
    Point("decode", LMD, LLAMA2_70B, "a100-80gb", 4, "bf16", 64, 128, 192, 37),
    Point("decode", LMD, LLAMA2_70B, "a100-80gb", 4, "bf16", 64, 2048, 3072, 55),
    Point("decode", NIM, LLAMA3_70B, "h100-80gb", 2, "fp8", 1, 500, 1500, 18.91),
    Point("decode", NIM, LLAMA3_70B, "h100-80gb", 2, "fp8", 1, 5000, 5250, 18.58),
    Point("e2e", VLLM, LLAMA3_70B, "h200", 4, "bf16", 8, 32, 128, 2077.5),
)


def predicted(p: Point) -> float:
    g, lay = gpu(p.gpu), Layout(tp=p.tp)
    if p.kind == "prefill":
        return prefill_ms(p.model, g, lay, [p.prompt] * p.batch, p.dtype)
    if p.kind == "decode":
        return decode_step_ms(p.model, g, lay, p.batch, p.context, p.dtype)
    steps = sum(decode_step_ms(p.model, g, lay, p.batch, p.prompt + i, p.dtype)
                for i in range(1, p.context))
    return prefill_ms(p.model, g, lay, [p.prompt] * p.batch, p.dtype) + steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    for p in POINTS:
        pred = predicted(p)
        rows.append({"kind": p.kind, "model": p.model.name, "gpu": p.gpu, "tp": p.tp,
                     "dtype": p.dtype, "batch": p.batch, "prompt": p.prompt,
                     "context": p.context, "measured_ms": p.measured_ms,
                     "predicted_ms": round(pred, 1),
                     "error": round(pred / p.measured_ms - 1, 3), "source": p.source})
    med = {k: statistics.median(abs(r["error"]) for r in rows if r["kind"] in kinds)
           for k, kinds in (("prefill", ("prefill",)), ("decode", ("decode", "e2e")))}
    if args.json:
        print(json.dumps({"rows": rows, "median_abs_error": med}))
        return
    print("| kind | model | GPU | TP | dtype | batch | prompt | context | measured ms | "
          "model ms | error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['kind']} | {r['model']} | {r['gpu']} | {r['tp']} | {r['dtype']} | "
              f"{r['batch']} | {r['prompt']} | {r['context']} | {r['measured_ms']:g} | "
              f"{r['predicted_ms']:g} | {r['error']:+.0%} |")
    print(f"\nmedian |error|: prefill {med['prefill']:.1%}, decode {med['decode']:.1%}")


if __name__ == "__main__":
    main()
