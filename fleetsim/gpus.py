"""The GPU catalogue the planner prices layouts on: one record per accelerator.

Figures are dense (no 2:4 sparsity) peaks from each vendor datasheet named in
`source`; `link_gb_s` is the intra-node GPU-to-GPU bandwidth per GPU, both
directions together, as NVIDIA quotes NVLink (PCIe Gen4 x16 = 64 GB/s for
cards without NVLink). `allreduce_us` is the latency of a small all-reduce
within a node (Vidur's NCCL profiles `data/profiling/network/{a100,h100}_dgx/
all_reduce.csv`, median of the <= 1 MiB messages: ~40 us on A100, ~30 us on
H100; the others are estimates by link type). Prices are on-demand list
prices per GPU-hour from the provider named in `price_source`: they move, so
`cplane plan --price` overrides them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Gpu:
    """One accelerator: memory, peaks, link and price."""

    name: str
    memory_gb: float  # HBM / GDDR capacity, GB (1e9 bytes)
    bf16_tflops: float  # dense tensor-core peak
    fp8_tflops: float  # dense; = bf16 where the chip has no FP8 units (weights-only FP8)
    hbm_tb_s: float  # memory bandwidth, TB/s
    link: str  # intra-node interconnect: "nvlink" | "pcie"
    link_gb_s: float  # per GPU, both directions
    allreduce_us: float  # small-message all-reduce latency in a node
    price_per_hour: float  # USD per GPU-hour
    source: str
    price_source: str
    gpus_per_node: int = 8


CATALOGUE: dict[str, Gpu] = {g.name: g for g in (
    Gpu("a100-80gb", 80, 312, 312, 2.039, "nvlink", 600, 40, 1.79,
        "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB: 312 TF BF16, 2,039 GB/s, "
        "NVLink 600 GB/s)",
        "Lambda on-demand 8x A100 SXM 80GB, $1.79/GPU/h (lambda.ai/pricing, 2025)"),
    Gpu("h100-80gb", 80, 989, 1979, 3.35, "nvlink", 900, 30, 2.99,
        "NVIDIA H100 Tensor Core GPU datasheet (SXM5: 989 TF BF16, 1,979 TF FP8 dense, "
        "3.35 TB/s, NVLink 900 GB/s)",
        "Lambda on-demand 8x H100 SXM, $2.99/GPU/h (lambda.ai/pricing, 2025)"),
    Gpu("h200", 141, 989, 1979, 4.8, "nvlink", 900, 30, 3.79,
        "NVIDIA H200 Tensor Core GPU datasheet (SXM: 141 GB HBM3e, 4.8 TB/s, same "
        "compute as H100 SXM)",
        "estimate: ~1.27x H100 (public cloud list prices for 8x H200 nodes, 2025)"),
    Gpu("b200", 180, 2250, 4500, 8.0, "nvlink", 1800, 25, 4.99,
        "NVIDIA DGX B200 datasheet (per GPU: 180 GB HBM3e, 8 TB/s, 2.25 PF BF16 and "
        "4.5 PF FP8 dense, NVLink 5 1.8 TB/s)",
        "Lambda on-demand 8x B200, $4.99/GPU/h (lambda.ai/pricing, 2025)"),
    Gpu("l40s", 48, 362, 733, 0.864, "pcie", 64, 60, 1.00,
        "NVIDIA L40S datasheet (48 GB GDDR6, 864 GB/s, 362 TF BF16 and 733 TF FP8 dense, "
        "PCIe Gen4 x16)",
        "estimate: on-demand L40S offers cluster around $0.9-1.1/GPU/h (2025)"),
    Gpu("a10g", 24, 125, 125, 0.6, "pcie", 64, 60, 1.01,
        "NVIDIA A10 datasheet (GA102 as AWS's A10G: 24 GB GDDR6, 600 GB/s, 125 TF BF16 "
        "dense; no FP8 units)",
        "AWS g5.xlarge on-demand, us-east-1: $1.006/h for one A10G (aws.amazon.com/ec2/"
        "instance-types/g5)"),
)}


def gpu(name: str, price_per_hour: float | None = None) -> Gpu:
    """The catalogue entry called `name` (case-insensitive); ValueError naming the choices."""
    try:
        g = CATALOGUE[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; choose one of {sorted(CATALOGUE)}") from None
    return g if price_per_hour is None else replace(g, price_per_hour=price_per_hour)


def parse_budget(text: str) -> tuple[int, Gpu]:
    """`16xh100-80gb` -> (16, the H100 entry); ValueError for anything else."""
    count, sep, name = text.strip().partition("x")
    if not sep or not count.isdigit() or int(count) < 1:
        raise ValueError(f"bad --gpus {text!r} (want COUNTxNAME, e.g. 16xh100-80gb)")
    return int(count), gpu(name)


__all__ = ["CATALOGUE", "Gpu", "gpu", "parse_budget"]
