"""Fit the performance model's GEMM constants to Vidur's linear-op profiles.

    .venv/bin/python bench/planner_calibrate.py ../shared/traces/vidur_mlp_*.csv

Each row of a Vidur `mlp.csv` times one layer's linear ops (QKV, output,
gate+up, down) for `num_tokens` tokens at a TP degree; the fit chooses the
compute and memory efficiencies, the roofline's softness and the per-kernel
cost that minimise the squared log error over all rows (grid search), and
prints the elementwise efficiency that the rest of the layer implies.
The tables are read in place, never copied (README of ../shared/traces).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import statistics
from dataclasses import replace

from cplane.fleetsim.gpus import gpu
from cplane.fleetsim.perf_model import EFF, Efficiency, gemm_ms

OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
OTHER = ("input_layernorm", "attn_rope", "post_attention_layernorm", "mlp_act", "add")


def _rows(path: str) -> list[tuple[str, dict[str, float]]]:
    name = "h100-80gb" if "_h100_" in path else "a100-80gb"
    with open(path) as f:
        return [(name, {k: float(v) for k, v in r.items() if v not in ("True", "False", "")})
                for r in csv.DictReader(f)]


def _shapes(r: dict[str, float]) -> list[tuple[float, float]]:
    tp, d = r["num_tensor_parallel_workers"], r["n_embd"]
    hd = d / r["n_head"]
    qkv = (r["n_head"] + 2 * r["n_kv_head"]) * hd / tp
    i = r["n_expanded_embd"] / tp
    return [(d, qkv), (r["n_head"] * hd / tp, d), (d, 2 * i), (i, d)]


def _pred(r: dict[str, float], g: str, eff: Efficiency) -> list[float]:
    n, spec = r["num_tokens"], gpu(g)
    return [gemm_ms(2 * n * k * m, 2 * k * m + 2 * n * (k + m), spec.bf16_tflops, spec.hbm_tb_s,
                    eff.compute, eff) for k, m in _shapes(r)]


def fit(rows: list[tuple[str, dict[str, float]]]) -> tuple[Efficiency, float]:
    best: tuple[float, Efficiency] | None = None
    grid = itertools.product((0.62, 0.66, 0.70, 0.74, 0.78), (0.76, 0.80, 0.84, 0.88, 0.92),
                             (1.2, 1.4, 1.6, 1.8, 2.0, 2.4), (3.0, 4.5, 6.0, 7.5, 9.0))
    for c, mem, p, k in grid:
        eff = replace(EFF, compute=c, memory=mem, softness=p, kernel_us=k)
        err = 0.0
        for g, r in rows:
            for op, t in zip(OPS, _pred(r, g, eff), strict=True):
                err += math.log(t / r[f"time_stats.{op}.median"]) ** 2
        if best is None or err < best[0]:
            best = (err, eff)
    assert best is not None
    eff = best[1]
    errs = [abs(t / r[f"time_stats.{op}.median"] - 1) for g, r in rows
            for op, t in zip(OPS, _pred(r, g, eff), strict=True)]
    return eff, statistics.median(errs)


def elementwise(rows: list[tuple[str, dict[str, float]]]) -> float:
    """Median HBM efficiency of the non-GEMM kernels at >= 1024 tokens."""
    out = []
    for g, r in rows:
        n = r["num_tokens"]
        if n < 1024:
            continue
        t = sum(r[f"time_stats.{op}.median"] for op in OTHER) / 1e3
        nbytes = n * 2 * (10 * r["n_embd"] + 3 * r["n_expanded_embd"] / r[
            "num_tensor_parallel_workers"])
        out.append(nbytes / t / (gpu(g).hbm_tb_s * 1e12))
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tables", nargs="+", help="Vidur mlp.csv files")
    rows = [row for path in ap.parse_args().tables for row in _rows(path)]
    eff, err = fit(rows)
    print(f"{len(rows)} rows: compute={eff.compute} memory={eff.memory} "
          f"softness={eff.softness} kernel_us={eff.kernel_us}; median |error| per op "
          f"{err:.1%}; elementwise={elementwise(rows):.2f}")


if __name__ == "__main__":
    main()
