"""The planner's performance model: memory fit, monotonic predictions, config parsing."""

from __future__ import annotations

import pytest

from cplane.fleetsim.engine_model import sim_settings
from cplane.fleetsim.gpus import CATALOGUE, gpu, parse_budget
from cplane.fleetsim.model_config import parse
from cplane.fleetsim.perf_model import Layout, decode_step_ms, memory, predict, prefill_ms
from cplane.schemas.settings import SimSettings

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
             "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 8192}
LLAMA3_70B = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672,
              "num_attention_heads": 64, "num_hidden_layers": 80}
MIXTRAL = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
           "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 32000,
           "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768}
H100 = gpu("h100-80gb")


def test_parameter_counts_match_the_published_sizes() -> None:
    assert abs(parse(LLAMA3_8B).params() / 1e9 - 8.03) < 0.05
    assert abs(parse(LLAMA3_70B).params() / 1e9 - 70.6) < 0.3
    mix = parse(MIXTRAL)
    assert abs(mix.params() / 1e9 - 46.7) < 0.3  # Mixtral-8x7B: 46.7B total
    assert abs(mix.active_params() / 1e9 - 12.9) < 0.4  # 12.9B active


def test_llama3_8b_fits_one_80gb_gpu_with_16gb_of_weights() -> None:
    mem = memory(parse(LLAMA3_8B), H100, Layout())
    assert 15.5 < mem.weights_gb < 16.5
    assert mem.fits and mem.kv_tokens > 300_000
    # 128 KiB of KV per token: (0.9 * 80 - 16 - reserve) GB / 131072 B
    assert 380_000 < mem.kv_tokens < 440_000


def test_llama3_70b_needs_tp4_on_80gb() -> None:
    m = parse(LLAMA3_70B)
    assert not memory(m, H100, Layout(tp=1)).fits
    assert not memory(m, H100, Layout(tp=1)).kv_tokens
    assert memory(m, H100, Layout(tp=4)).fits
    assert memory(m, gpu("h200"), Layout(tp=2)).fits  # 141 GB holds half of 141 GB of weights
    assert memory(m, H100, Layout(tp=2, pp=2)).fits


def test_tp_speeds_up_prefill_and_decode_grows_with_batch_and_context() -> None:
    m = parse(LLAMA3_8B)
    p1 = prefill_ms(m, H100, Layout(tp=1), [1024] * 8)
    p2 = prefill_ms(m, H100, Layout(tp=2), [1024] * 8)
    assert p2 < p1
    assert prefill_ms(m, H100, Layout(), [2048]) > prefill_ms(m, H100, Layout(), [1024])
    steps = [decode_step_ms(m, H100, Layout(), b, 1024) for b in (1, 8, 64, 256)]
    assert steps == sorted(steps) and steps[0] < steps[-1]
    ctxs = [decode_step_ms(m, H100, Layout(), 16, c) for c in (128, 1024, 8192)]
    assert ctxs == sorted(ctxs) and ctxs[0] < ctxs[-1]


def test_more_bandwidth_means_faster_decode() -> None:
    m = parse(LLAMA3_70B)
    lay = Layout(tp=4)
    assert decode_step_ms(m, gpu("h200"), lay, 8, 2048) < decode_step_ms(m, H100, lay, 8, 2048)
    assert decode_step_ms(m, H100, lay, 8, 2048) < decode_step_ms(m, gpu("a100-80gb"), lay, 8,
                                                                   2048)


def test_sane_absolute_figures_for_llama3_8b_on_h100() -> None:
    pr = predict(parse(LLAMA3_8B), H100, Layout(), batch=8, prompt_tokens=1024)
    assert 100 < pr.prefill_ms < 300  # 8 x 1024 tokens: ~115 TFLOP at ~70 % of 989 TF/s
    assert 5 < pr.decode_step_ms < 15  # 16 GB of weights at ~2.7 TB/s + overheads
    assert pr.fits and pr.kv_tokens > 0
    assert pr.tokens_per_s == pytest.approx(8 / pr.decode_step_ms * 1000)


def test_pipeline_parallel_costs_a_bubble_at_batch_one() -> None:
    m = parse(LLAMA3_70B)
    one = decode_step_ms(m, H100, Layout(tp=4, pp=2), 1, 1024)
    two = decode_step_ms(m, H100, Layout(tp=4, pp=2), 2, 1024)
    assert two < 2 * one  # two micro-batches overlap in the pipeline


def test_moe_decode_reads_only_the_experts_in_use() -> None:
    m = parse(MIXTRAL)
    lay = Layout(tp=2)
    one = decode_step_ms(m, H100, lay, 1, 512)
    many = decode_step_ms(m, H100, lay, 64, 512)
    assert one < many < 4 * one  # 2 of 8 experts at batch 1, all of them at 64
    assert predict(m, H100, Layout(tp=2, ep=2), batch=4, prompt_tokens=512).fits


def test_bad_configs_and_layouts_give_one_line_reasons() -> None:
    with pytest.raises(ValueError, match="hidden_size"):
        parse({"num_hidden_layers": 2})
    with pytest.raises(ValueError, match="unknown GPU"):
        gpu("h900")
    with pytest.raises(ValueError, match="does not divide"):
        predict(parse(LLAMA3_8B), H100, Layout(tp=3), batch=1, prompt_tokens=10)
    with pytest.raises(ValueError, match="COUNTxNAME"):
        parse_budget("h100")
    assert parse_budget("16xh100-80gb") == (16, H100)


def test_catalogue_has_sources_and_prices() -> None:
    for name in ("a100-80gb", "h100-80gb", "h200", "b200", "l40s", "a10g"):
        g = CATALOGUE[name]
        assert g.source and g.price_source and g.price_per_hour > 0
        assert g.fp8_tflops >= g.bf16_tflops > 0 and g.hbm_tb_s > 0 and g.memory_gb > 0


def test_sim_settings_for_llama3_8b_tp1_are_near_the_simulator_defaults() -> None:
    s = sim_settings(parse(LLAMA3_8B), H100, Layout())
    d = SimSettings()
    # the defaults' own derivation (docs/sim-calibration.md) within tens of percent
    assert 0.5 < s.prefill_b_ms / d.prefill_b_ms < 1.5
    assert 0.5 < s.decode_a_ms / d.decode_a_ms < 1.6
    assert 0.5 < s.decode_b_ms / d.decode_b_ms < 1.5
    assert 0.8 < s.kv_tokens / d.kv_tokens < 1.2
    tp2 = sim_settings(parse(LLAMA3_8B), H100, Layout(tp=2))
    assert tp2.prefill_b_ms < s.prefill_b_ms and tp2.kv_tokens > s.kv_tokens
