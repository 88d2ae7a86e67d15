"""A decoder-only transformer's shape, read from a Hugging Face `config.json`.

Dense (MHA / GQA) and mixture-of-experts: Mixtral (`num_local_experts`,
`num_experts_per_tok`), Qwen-MoE (`num_experts`, `moe_intermediate_size`,
`shared_expert_intermediate_size`), DeepSeek (`n_routed_experts`,
`n_shared_experts`, `first_k_dense_replace`, MLA's `kv_lora_rank`). What the
performance model needs is counts of parameters and of KV bytes per token; a
config it cannot read gives a ValueError naming the missing key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The shape of one model (what the performance model prices)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # dense MLP width (dense layers)
    vocab: int
    experts: int = 0  # routed experts per MoE layer (0 = dense)
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0  # shared experts' total width (always active)
    moe_layers: int = 0  # layers with experts (the rest are dense)
    kv_dim_per_layer: int = 0  # MLA: compressed KV width per token (0 = 2 * kv_heads * head_dim)
    tied_embeddings: bool = False
    max_context: int = 8192

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def kv_width(self) -> int:
        """KV values stored per token per layer (K and V together)."""
        return self.kv_dim_per_layer or 2 * self.kv_heads * self.head_dim

    @property
    def attn_params_per_layer(self) -> int:
        q = self.heads * self.head_dim
        return self.hidden * (q + 2 * self.kv_heads * self.head_dim) + q * self.hidden

    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up, down)."""
        return 3 * self.hidden * self.expert_intermediate

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden * self.intermediate

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def params(self) -> int:
        """All parameters (embeddings and every expert included)."""
        dense_layers = self.layers - self.moe_layers
        moe = self.moe_layers * (self.experts * self.expert_params()
                                 + 3 * self.hidden * self.shared_intermediate
                                 + self.hidden * self.experts)  # router
        return (self.layers * self.attn_params_per_layer + dense_layers * self.dense_mlp_params
                + moe + self.embedding_params)

    def active_params(self) -> int:
        """Parameters one token touches (k routed experts + shared ones)."""
        dense_layers = self.layers - self.moe_layers
        moe = self.moe_layers * (self.experts_per_token * self.expert_params()
                                 + 3 * self.hidden * self.shared_intermediate)
        return (self.layers * self.attn_params_per_layer + dense_layers * self.dense_mlp_params
                + moe + self.vocab * self.hidden)


def _get(cfg: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    if default is None:
        raise ValueError(f"config.json lacks {keys[0]!r}")
    return default


def parse(cfg: Mapping[str, Any], name: str = "model") -> ModelConfig:
    """A ModelConfig from the dict of a config.json (text_config of multimodal ones)."""
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    hidden = int(_get(cfg, "hidden_size", "n_embd", "d_model"))
    layers = int(_get(cfg, "num_hidden_layers", "n_layer", "num_layers"))
    heads = int(_get(cfg, "num_attention_heads", "n_head"))
    kv_heads = int(_get(cfg, "num_key_value_heads", "num_kv_heads", default=heads))
    head_dim = int(_get(cfg, "head_dim", default=hidden // heads))
    vocab = int(_get(cfg, "vocab_size"))
    experts = int(_get(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0))
    inter = int(_get(cfg, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden))
    moe_inter = int(_get(cfg, "moe_intermediate_size", default=inter)) if experts else 0
    shared = 0
    if experts:
        if cfg.get("shared_expert_intermediate_size"):  # Qwen-MoE
            shared = int(cfg["shared_expert_intermediate_size"])
        elif cfg.get("n_shared_experts"):  # DeepSeek
            shared = int(cfg["n_shared_experts"]) * moe_inter
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    every = int(cfg.get("moe_layer_freq") or cfg.get("decoder_sparse_step") or 1)
    # Layers with experts: from `first_k_dense_replace`, every `decoder_sparse_step`-th.
    moe_layers = sum(1 for i in range(first_dense, layers) if (i + 1) % every == 0
                     ) if experts else 0
    kv_dim = 0
    if cfg.get("kv_lora_rank"):  # DeepSeek MLA caches the compressed latent + rope key
        kv_dim = int(cfg["kv_lora_rank"]) + int(cfg.get("qk_rope_head_dim") or 0)
        head_dim = int(cfg.get("v_head_dim") or head_dim)
    for label, v in (("hidden_size", hidden), ("num_hidden_layers", layers),
                     ("num_attention_heads", heads), ("vocab_size", vocab)):
        if v <= 0:
            raise ValueError(f"config.json: {label} must be positive")
    if heads % kv_heads:
        raise ValueError("config.json: num_attention_heads is not a multiple of "
                         "num_key_value_heads")
    k = int(_get(cfg, "num_experts_per_tok", "moe_top_k", default=2)) if experts else 0
    return ModelConfig(
        name=name, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, intermediate=inter, vocab=vocab, experts=experts,
        experts_per_token=k, expert_intermediate=moe_inter, shared_intermediate=shared,
        moe_layers=moe_layers, kv_dim_per_layer=kv_dim,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_context=int(_get(cfg, "max_position_embeddings", "n_positions", default=8192)))


def load(path: str | Path) -> ModelConfig:
    """Read DIR/config.json (or the file itself); ValueError with a one-line reason."""
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    try:
        data = json.loads(f.read_text())
    except FileNotFoundError:
        raise ValueError(f"no config.json at {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{f}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{f}: not a JSON object")
    return parse(data, name=p.name if p.is_dir() else p.stem)


__all__ = ["ModelConfig", "load", "parse"]
