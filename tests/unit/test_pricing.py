"""Worker prices from the GPU catalogue (fleetsim/pricing.py) and `cplane worker --price-gpu`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cplane.cli import _catalogue_prices, build_parser
from cplane.fleetsim import gpus
from cplane.fleetsim.model_config import parse
from cplane.fleetsim.perf_model import Layout
from cplane.fleetsim.pricing import catalogue_prices

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
            "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "model_type": "llama"}


def test_prices_follow_gpu_price_and_throughput() -> None:
    m = parse(LLAMA_8B, "llama-3-8b")
    h100 = catalogue_prices(m, gpus.gpu("h100-80gb"), Layout())
    # decode is memory-bound: an output token costs more GPU time than a prompt token
    assert 0 < h100.in_per_1k < h100.out_per_1k < 1.0
    assert "h100-80gb" in h100.source and "TP1" in h100.source
    dear = catalogue_prices(m, gpus.gpu("h100-80gb", price_per_hour=20.0), Layout())
    ratio = 20.0 / gpus.gpu("h100-80gb").price_per_hour
    assert abs(dear.out_per_1k / h100.out_per_1k - ratio) < 1e-9  # linear in the price
    a10g = catalogue_prices(m, gpus.gpu("a10g"), Layout())  # a slower GPU: fewer tokens/s
    assert a10g.source != h100.source and a10g.out_per_1k > 0


def test_the_worker_flag_derives_prices_or_exits_with_a_reason(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    args = build_parser().parse_args(["worker", "--engine", "sim", "--price-gpu", "h100-80gb",
                                      "--price-model", str(tmp_path),
                                      "--tensor-parallel-size", "2"])
    w = _catalogue_prices(args)
    assert w["price_in_per_1k"] > 0 and "TP2" in w["price_source"]
    args = build_parser().parse_args(["worker", "--price-gpu", "h100-80gb"])
    with pytest.raises(SystemExit, match=r"config\.json"):
        _catalogue_prices(args)
    args = build_parser().parse_args(["worker", "--price-gpu", "no-such-gpu",
                                      "--price-model", str(tmp_path)])
    with pytest.raises(SystemExit, match="no-such-gpu"):
        _catalogue_prices(args)
