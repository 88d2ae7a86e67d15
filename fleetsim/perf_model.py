"""Performance of one model on one parallel layout: memory, prefill, decode, tokens/s.

Every operator of a layer is priced on a soft roofline: compute time
`flops / (E_c * peak)` and memory time `bytes / (E_m * hbm)` combine as
`(t_c**P + t_m**P) ** (1/P)` (a plain max is 25-40 % optimistic at the knee,
where neither bound is reached; Vidur's tables show it), plus a fixed cost per
kernel. Per layer on one GPU of a TP group: the QKV, output, MLP (or expert)
GEMMs on `1/TP` of the weights, attention (FlashAttention FLOPs in prefill,
the KV read in decode), the elementwise kernels, and two all-reduces
(`allreduce_us + 2 (TP-1)/TP * bytes / (E_link * link)`). PP splits the layers
into stages: a token crosses every stage (latency adds up), and a batch is cut
into at most PP micro-batches (fewer leave stages idle: the bubble). MoE: the
experts that at least one token of the batch picks are read from memory,
`E * (1 - (1 - k/E)**n)`; EP replaces the expert all-reduce by two all-to-alls.

Calibration (bench/planner_calibrate.py reproduces the fit): the GEMM
constants are a least-squares fit (log error) to Vidur's profiles of
Llama-2-7B on H100 and Llama-3-8B on A100, TP 1-8, 1-4096 tokens
(microsoft/vidur `data/profiling/compute/*/mlp.csv`); the elementwise
efficiency is the same tables' non-GEMM rest; all-reduce from Vidur's
`network/{a100,h100}_dgx/all_reduce.csv`. Validation against measurements of
70B models, which are not calibration data: docs/planner.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from cplane.fleetsim.gpus import Gpu
from cplane.fleetsim.model_config import ModelConfig

DTYPES = {"bf16": 2, "fp16": 2, "fp8": 1}  # weight bytes; activations stay 16-bit


@dataclass(frozen=True, slots=True)
class Efficiency:
    """Measured fractions of peak (sources in the module docstring and docs/planner.md)."""

    compute: float = 0.74  # dense GEMM, of the BF16 peak (Vidur fit)
    compute_fp8: float = 0.55  # FP8 GEMM incl. quantize kernels, of the FP8 peak (see docs)
    memory: float = 0.80  # weight streaming by small-batch GEMMs, of HBM peak (Vidur fit)
    softness: float = 1.4  # P of the soft roofline (Vidur fit)
    kernel_us: float = 4.5  # fixed cost per GEMM kernel (Vidur fit)
    elementwise: float = 0.54  # norms, RoPE, SiLU, residual adds: of HBM peak (Vidur rest)
    elementwise_kernels: int = 6  # such kernels per layer
    attention: float = 0.5  # FlashAttention prefill, of the BF16 peak (FA2 paper: 50-73 % on
    # A100; FA3: 75 % on H100; causal masking and short sequences cost more)
    kv_read: float = 0.7  # paged decode attention, of HBM peak (FlashInfer / vLLM kernels)
    link: float = 0.7  # all-reduce bus bandwidth, of the link's both-ways figure (Vidur fit)
    step_ms: float = 1.0  # per engine step: scheduling, sampling, launches (lmdeploy
    # Llama-2-7B batch-1 token latency on A100: 9-10 ms against 8.7 ms of kernels)
    utilization: float = 0.9  # vLLM's gpu_memory_utilization
    reserve_gb: float = 1.5  # CUDA graphs, NCCL buffers, allocator slack


EFF = Efficiency()


@dataclass(frozen=True, slots=True)
class Layout:
    """One engine's parallel layout; DP = how many such engines."""

    tp: int = 1
    pp: int = 1
    ep: int = 1  # expert-parallel ways inside the TP group (MoE only)
    dp: int = 1

    @property
    def gpus(self) -> int:
        """GPUs of one engine."""
        return self.tp * self.pp

    def label(self) -> str:
        s = f"TP{self.tp}"
        if self.pp > 1:
            s += f" PP{self.pp}"
        if self.ep > 1:
            s += f" EP{self.ep}"
        return s


def check(m: ModelConfig, g: Gpu, lay: Layout, dtype: str) -> None:
    """ValueError when the layout cannot run this model at all."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if min(lay.tp, lay.pp, lay.ep, lay.dp) < 1:
        raise ValueError("tp, pp, ep and dp must be >= 1")
    if m.heads % lay.tp:
        raise ValueError(f"TP {lay.tp} does not divide {m.heads} attention heads")
    if lay.pp > m.layers:
        raise ValueError(f"PP {lay.pp} exceeds {m.layers} layers")
    if lay.tp > g.gpus_per_node:
        raise ValueError(f"TP {lay.tp} spans nodes ({g.gpus_per_node} GPUs per node)")
    if lay.ep > 1 and (not m.is_moe or lay.tp % lay.ep or m.experts % lay.ep):
        raise ValueError(f"EP {lay.ep} needs an MoE model and must divide TP and the experts")


# -- memory -------------------------------------------------------------------------
def _kv_heads_local(m: ModelConfig, tp: int) -> float:
    return max(1.0, m.kv_heads / tp)  # fewer KV heads than ranks: each keeps a copy


def kv_bytes_per_token(m: ModelConfig, lay: Layout) -> float:
    """KV bytes one token takes on one GPU (the stage with the most layers); the KV
    cache stays 16-bit whatever the weights' dtype."""
    width = m.kv_dim_per_layer or 2 * m.head_dim * _kv_heads_local(m, lay.tp)
    return _stage(m, lay) * width * 2


def kv_ms_per_token(m: ModelConfig, lay: Layout, gb_s: float,
                    efficiency: float = EFF.link) -> float:
    """KV hand-off time per prompt token (ms): each GPU of the engine sends its own
    shard (its KV heads and layers) over its own link of `gb_s` at `efficiency`."""
    return kv_bytes_per_token(m, lay) / (gb_s * efficiency * 1e9) * 1e3


def weight_bytes_per_gpu(m: ModelConfig, lay: Layout, dtype: str) -> float:
    wb = DTYPES[dtype]
    body = m.params() - m.embedding_params
    emb = m.vocab * m.hidden / lay.tp * (2 if lay.pp == 1 and not m.tied_embeddings else 1)
    return (body / (lay.tp * lay.pp) + emb) * wb


@dataclass(frozen=True, slots=True)
class Memory:
    weights_gb: float  # per GPU
    reserve_gb: float  # activations at the token budget, graphs, buffers
    kv_gb: float  # what is left for the KV cache
    kv_tokens: int  # tokens of KV the engine holds
    fits: bool  # weights and reserve fit with room for KV

    @property
    def headroom(self) -> float:
        """KV share of usable memory (0 = nothing left for KV)."""
        total = self.weights_gb + self.reserve_gb + self.kv_gb
        return self.kv_gb / total if total > 0 else 0.0


def memory(m: ModelConfig, g: Gpu, lay: Layout, dtype: str = "bf16",
           max_batched_tokens: int = 8192, eff: Efficiency = EFF) -> Memory:
    """Per-GPU memory: weights, reserve, and the KV cache vLLM would allocate."""
    w = weight_bytes_per_gpu(m, lay, dtype) / 1e9
    inter = (m.expert_intermediate * m.experts_per_token if m.is_moe else m.intermediate)
    act = max_batched_tokens * (4 * m.hidden + 2 * inter / lay.tp) * 2 / 1e9
    reserve = eff.reserve_gb + act
    kv = eff.utilization * g.memory_gb - w - reserve
    kv_tokens = int(max(0.0, kv) * 1e9 / kv_bytes_per_token(m, lay))
    return Memory(w, reserve, max(0.0, kv), kv_tokens, kv > 0 and kv_tokens >= 1024)


# -- time ---------------------------------------------------------------------------
def gemm_ms(flops: float, nbytes: float, tflops: float, tb_s: float, eff_c: float,
            eff: Efficiency = EFF) -> float:
    """One kernel on the soft roofline (ms)."""
    tc = flops / (eff_c * tflops * 1e12)
    tm = nbytes / (eff.memory * tb_s * 1e12)
    p = eff.softness
    return (tc**p + tm**p) ** (1 / p) * 1e3 + eff.kernel_us / 1e3


def allreduce_ms(nbytes: float, n: int, g: Gpu, eff: Efficiency = EFF) -> float:
    if n <= 1:
        return 0.0
    return g.allreduce_us / 1e3 + 2 * (n - 1) / n * nbytes / (eff.link * g.link_gb_s * 1e9) * 1e3


def _peak(g: Gpu, dtype: str, eff: Efficiency) -> tuple[float, float]:
    return (g.fp8_tflops, eff.compute_fp8) if dtype == "fp8" else (g.bf16_tflops, eff.compute)


def _linear_ms(m: ModelConfig, g: Gpu, lay: Layout, dtype: str, n: float,
               eff: Efficiency) -> float:
    """The GEMMs, elementwise kernels and collectives of one layer for `n` tokens."""
    if n <= 0:
        return 0.0
    tp, wb = lay.tp, DTYPES[dtype]
    tflops, ec = _peak(g, dtype, eff)

    def mm(k: float, nn: float, rows: float = n, weights: float = 1.0) -> float:
        return gemm_ms(2 * rows * k * nn, weights * k * nn * wb + 2 * rows * (k + nn), tflops,
                       g.hbm_tb_s, ec, eff)

    q = m.heads * m.head_dim / tp
    kv = 2 * m.head_dim * _kv_heads_local(m, tp)
    ms = mm(m.hidden, q + kv) + mm(q, m.hidden)
    ms += 2 * allreduce_ms(n * m.hidden * 2, tp, g, eff)
    inter = m.intermediate / tp
    if m.is_moe and m.moe_layers:
        frac = m.moe_layers / m.layers  # dense layers priced as dense, weighted
        ms += (1 - frac) * (mm(m.hidden, 2 * inter) + mm(inter, m.hidden))
        ms += frac * _moe_ms(m, g, lay, dtype, n, eff)
        inter = m.expert_intermediate * m.experts_per_token / tp
    else:
        ms += mm(m.hidden, 2 * inter) + mm(inter, m.hidden)
    elem = n * 2 * (10 * m.hidden + 3 * inter)
    ms += eff.elementwise_kernels * eff.kernel_us / 1e3
    ms += elem / (eff.elementwise * g.hbm_tb_s * 1e12) * 1e3
    return ms


def _moe_ms(m: ModelConfig, g: Gpu, lay: Layout, dtype: str, n: float,
            eff: Efficiency) -> float:
    """Routed experts (grouped GEMM over the experts in use) + shared ones + routing."""
    tp, ep, wb = lay.tp, lay.ep, DTYPES[dtype]
    tflops, ec = _peak(g, dtype, eff)
    e, k, i = m.experts, m.experts_per_token, m.expert_intermediate
    used = e * (1 - (1 - k / e) ** n)  # experts at least one token picks
    flops = 2 * n * k * 3 * m.hidden * i / tp
    nbytes = used * 3 * m.hidden * i * wb / tp + 2 * n * k * (m.hidden + i) * 2 / tp
    ms = gemm_ms(flops, nbytes, tflops, g.hbm_tb_s, ec, eff)
    ms += gemm_ms(2 * n * m.hidden * e, m.hidden * e * wb, tflops, g.hbm_tb_s, ec, eff)
    if m.shared_intermediate:
        s = m.shared_intermediate / tp
        ms += gemm_ms(2 * n * 3 * m.hidden * s, 3 * m.hidden * s * wb, tflops, g.hbm_tb_s, ec,
                      eff)
    if ep > 1:  # dispatch + combine all-to-all instead of sharding every expert
        a2a = n * k * m.hidden * 2 * (ep - 1) / ep / (eff.link * g.link_gb_s * 1e9) * 1e3
        ms += 2 * (a2a + g.allreduce_us / 1e3)
    return ms


def _stage(m: ModelConfig, lay: Layout) -> int:
    return math.ceil(m.layers / lay.pp)


def _head_ms(m: ModelConfig, g: Gpu, lay: Layout, dtype: str, rows: int,
             eff: Efficiency) -> float:
    tflops, ec = _peak(g, dtype, eff)
    v = m.vocab / lay.tp
    return gemm_ms(2 * rows * m.hidden * v, m.hidden * v * DTYPES[dtype], tflops, g.hbm_tb_s,
                   ec, eff)


def _p2p_ms(nbytes: float, g: Gpu, eff: Efficiency) -> float:
    return g.allreduce_us / 2e3 + nbytes / (eff.link * g.link_gb_s / 2 * 1e9) * 1e3


def prefill_ms(m: ModelConfig, g: Gpu, lay: Layout, prompts: Sequence[int],
               dtype: str = "bf16", eff: Efficiency = EFF) -> float:
    """Time to prefill these prompts together, to the first token of the last."""
    prompts = [p for p in prompts if p > 0]
    if not prompts:
        return 0.0
    micro = min(len(prompts), lay.pp)  # prompts cut into PP micro-batches
    n = sum(prompts) / micro
    hq = m.heads / lay.tp
    attn_flops = 2 * sum(p * p for p in prompts) / micro * m.head_dim * hq  # causal
    attn = gemm_ms(attn_flops, n * 2 * (m.heads * m.head_dim / lay.tp + m.kv_width), g.bf16_tflops,
                   g.hbm_tb_s, eff.attention, eff)
    stage = _stage(m, lay) * (_linear_ms(m, g, lay, dtype, n, eff) + attn)
    head = _head_ms(m, g, lay, dtype, math.ceil(len(prompts) / micro), eff)
    p2p = (lay.pp - 1) * _p2p_ms(n * m.hidden * 2, g, eff)
    return (micro + lay.pp - 1) * stage + head + p2p + eff.step_ms


def decode_step_ms(m: ModelConfig, g: Gpu, lay: Layout, batch: int, context: int,
                   dtype: str = "bf16", eff: Efficiency = EFF) -> float:
    """One token for each of `batch` sequences of `context` tokens: the time between
    two tokens of one sequence (with PP, the batch runs as up to PP micro-batches)."""
    if batch <= 0:
        return 0.0
    micro = min(batch, lay.pp)
    b = batch / micro
    kv = b * context * kv_bytes_per_token(m, lay) / _stage(m, lay)  # per layer
    attn = kv / (eff.kv_read * g.hbm_tb_s * 1e12) * 1e3 + eff.kernel_us / 1e3
    stage = _stage(m, lay) * (_linear_ms(m, g, lay, dtype, b, eff) + attn)
    head = _head_ms(m, g, lay, dtype, math.ceil(b), eff)
    p2p = (lay.pp - 1) * _p2p_ms(b * m.hidden * 2, g, eff)
    return lay.pp * stage + head + p2p + eff.step_ms


# -- the answer ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Prediction:
    model: str
    gpu: str
    layout: str
    tp: int
    pp: int
    ep: int
    dtype: str
    batch: int
    prompt_tokens: int
    context_tokens: int
    prefill_ms: float  # the whole batch of prompts
    decode_step_ms: float  # one token for each of `batch` sequences at `context_tokens`
    tokens_per_s: float  # decode tokens/s per GPU at this batch and context
    prefill_tokens_per_s: float  # prompt tokens/s per GPU
    fits: bool  # weights fit and the KV cache holds the batch
    kv_tokens: int
    weights_gb: float  # per GPU
    kv_gb: float  # per GPU
    memory_headroom: float
    params_b: float
    active_params_b: float

    def to_json(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def predict(m: ModelConfig, g: Gpu, lay: Layout, *, batch: int, prompt_tokens: int,
            context_tokens: int | None = None, dtype: str = "bf16",
            eff: Efficiency = EFF) -> Prediction:
    """Everything `cplane plan predict` prints, for one layout."""
    check(m, g, lay, dtype)
    if batch < 1 or prompt_tokens < 1:
        raise ValueError("batch and prompt tokens must be >= 1")
    ctx = context_tokens if context_tokens is not None else prompt_tokens
    mem = memory(m, g, lay, dtype, eff=eff)
    pf = prefill_ms(m, g, lay, [prompt_tokens] * batch, dtype, eff)
    dec = decode_step_ms(m, g, lay, batch, ctx, dtype, eff)
    return Prediction(
        model=m.name, gpu=g.name, layout=lay.label(), tp=lay.tp, pp=lay.pp, ep=lay.ep,
        dtype=dtype, batch=batch, prompt_tokens=prompt_tokens, context_tokens=ctx,
        prefill_ms=pf, decode_step_ms=dec,
        tokens_per_s=batch / dec * 1e3 / lay.gpus,
        prefill_tokens_per_s=batch * prompt_tokens / pf * 1e3 / lay.gpus,
        fits=mem.fits and mem.kv_tokens >= batch * max(ctx, prompt_tokens),
        kv_tokens=mem.kv_tokens, weights_gb=mem.weights_gb, kv_gb=mem.kv_gb,
        memory_headroom=mem.headroom, params_b=m.params() / 1e9,
        active_params_b=m.active_params() / 1e9)


__all__ = ["DTYPES", "EFF", "Efficiency", "Layout", "Memory", "Prediction", "allreduce_ms",
           "check", "decode_step_ms", "gemm_ms", "kv_bytes_per_token", "kv_ms_per_token", "memory",
           "predict",
           "prefill_ms", "weight_bytes_per_gpu"]
