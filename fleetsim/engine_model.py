"""A simulated engine's latency model from the performance model of a layout.

The sim engine (`workers.engines.stepcore.StepCore`) prices a step with
DistServe's form: prefill `a + b*sum(l) + c*sum(l^2)`, decode
`a + b*sum(ctx) + c*batch`. `sim_settings` fits those six coefficients to
`perf_model` for one (model, GPU, layout, dtype), and sizes the KV cache from
its memory model, so that a simulated fleet can run any layout, and mix them
(`FleetSpec.worker_engines`). Without it the simulator keeps its defaults
(Llama-3-8B, TP1, H100: docs/sim-calibration.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from cplane.fleetsim.gpus import Gpu
from cplane.fleetsim.model_config import ModelConfig
from cplane.fleetsim.perf_model import (
    EFF,
    Efficiency,
    Layout,
    decode_step_ms,
    kv_ms_per_token,
    memory,
    prefill_ms,
)
from cplane.schemas.settings import SimSettings

PREFILL_POINTS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
KV_LINK_GB_S = 64.0  # PD hand-off per GPU (the simulator's default: one 400 Gb/s NIC)


def _solve(rows: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float]:
    """Least squares by the normal equations (a handful of unknowns), relative error:
    each row is weighted by 1/y so short and long prompts count alike."""
    k = len(rows[0])
    a = [[0.0] * k for _ in range(k)]
    v = [0.0] * k
    for x, y in zip(rows, ys, strict=True):
        w = 1.0 / (y * y) if y > 0 else 1.0
        for i in range(k):
            v[i] += w * x[i] * y
            for j in range(k):
                a[i][j] += w * x[i] * x[j]
    for col in range(k):  # Gauss-Jordan with partial pivoting
        piv = max(range(col, k), key=lambda r: abs(a[r][col]))
        a[col], a[piv], v[col], v[piv] = a[piv], a[col], v[piv], v[col]
        if abs(a[col][col]) < 1e-300:
            continue
        for r in range(k):
            if r != col and a[r][col]:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col], strict=True)]
                v[r] -= f * v[col]
    return [v[i] / a[i][i] if abs(a[i][i]) > 1e-300 else 0.0 for i in range(k)]


def _fit_nonneg(rows: list[list[float]], ys: list[float]) -> list[float]:
    """Least squares with every coefficient >= 0 (drop a negative one and refit)."""
    keep = list(range(len(rows[0])))
    while True:
        coef = _solve([[r[i] for i in keep] for r in rows], ys)
        if all(c >= 0 for c in coef) or len(keep) == 1:
            out = [0.0] * len(rows[0])
            for i, c in zip(keep, coef, strict=True):
                out[i] = max(0.0, c)
            return out
        keep.pop(min(range(len(coef)), key=lambda i: coef[i]))


def sim_settings(m: ModelConfig, g: Gpu, lay: Layout, dtype: str = "bf16", *,
                 max_num_seqs: int = 256, max_batched_tokens: int = 8192,
                 eff: Efficiency = EFF, base: SimSettings | None = None) -> SimSettings:
    """The sim engine's settings for one engine of this layout (fields not priced
    here, such as the prefix block size, come from `base`)."""
    base = base or SimSettings()
    ls = [p for p in PREFILL_POINTS if p <= max(64, m.max_context)]
    pre = [prefill_ms(m, g, lay, [p], dtype, eff) for p in ls]
    pa, pb, pc = _fit_nonneg([[1.0, float(p), float(p * p)] for p in ls], pre)
    bs = [b for b in DECODE_BATCHES if b <= max(1, max_num_seqs)]
    dec = [decode_step_ms(m, g, lay, b, 0, dtype, eff) for b in bs]
    da, dc = _fit_nonneg([[1.0, float(b)] for b in bs], dec)
    ctx = 4096
    db = max(0.0, (decode_step_ms(m, g, lay, 16, ctx, dtype, eff)
                   - decode_step_ms(m, g, lay, 16, 0, dtype, eff)) / (16 * ctx))
    mem = memory(m, g, lay, dtype, max_batched_tokens, eff)
    kv_tokens = max(1, mem.kv_tokens)
    return SimSettings(
        prefill_a_ms=pa, prefill_b_ms=pb, prefill_c_ms=pc,
        decode_a_ms=da, decode_b_ms=db, decode_c_ms=dc,
        kv_tokens=kv_tokens, max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens,
        vocab_size=m.vocab, eos_probability=base.eos_probability,
        kv_transfer_a_ms=base.kv_transfer_a_ms,
        kv_transfer_b_ms=kv_ms_per_token(m, lay, KV_LINK_GB_S, efficiency=1.0),
        prefix_block_tokens=base.prefix_block_tokens,
        prefix_cache_tokens=kv_tokens if base.prefix_cache_tokens else 0,
        kv_events=base.kv_events)


__all__ = ["sim_settings"]
