"""Worker prices from the GPU catalogue: what a layout's GPUs cost per hour, over the
tokens the performance model says it serves. Pure.

A worker that runs `model` as `layout` on GPUs of `gpu` charges, per 1000 tokens:
- prompt: the GPU-hours of prefilling them (a batch of `batch` prompts of
  `prompt_tokens`, the throughput the performance model predicts);
- output: the GPU-hours of decoding them (a batch of `batch` sequences at
  `context_tokens`).
Cost-aware routing (`cost_optimized`) and `cost_budget` read these prices from the
workers' heartbeats; `Final.usage` names them and where they came from.
"""

from __future__ import annotations

from dataclasses import dataclass

from cplane.fleetsim.gpus import Gpu
from cplane.fleetsim.model_config import ModelConfig
from cplane.fleetsim.perf_model import Layout, predict


@dataclass(frozen=True, slots=True)
class Prices:
    in_per_1k: float
    out_per_1k: float
    source: str  # what they were derived from, for Final.usage.price_source


def catalogue_prices(m: ModelConfig, g: Gpu, lay: Layout, *, dtype: str = "bf16",
                     batch: int = 64, prompt_tokens: int = 1024,
                     context_tokens: int = 2048) -> Prices:
    """Prices per 1000 prompt and output tokens at the GPU's hourly price and the
    layout's predicted throughput (a busy engine: `batch` requests at once)."""
    p = predict(m, g, lay, batch=batch, prompt_tokens=prompt_tokens,
                context_tokens=context_tokens, dtype=dtype)
    per_gpu_s = g.price_per_hour / 3600.0  # one GPU-second
    prices = Prices(
        in_per_1k=per_gpu_s / p.prefill_tokens_per_s * 1000,
        out_per_1k=per_gpu_s / p.tokens_per_s * 1000,
        source=(f"catalogue: {m.name} {lay.label()} on {g.name} at ${g.price_per_hour:g}/GPU-h;"
                f" {p.prefill_tokens_per_s:,.0f} prompt and {p.tokens_per_s:,.0f} output "
                f"tokens/s per GPU predicted (batch {batch})"))
    return prices


__all__ = ["Prices", "catalogue_prices"]
