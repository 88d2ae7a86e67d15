"""Prefill/decode disaggregation: per request, unified or prefill-then-decode. Pure.

Modes: `never`, `always` (whenever a prefill and a decode pool serve the
model), `auto` (when the prompt is at least `min_prompt_tokens` long) and
`adaptive` (a long prompt goes to PD only while the prefill pool has room
and the decode pool has KV headroom, as of the last heartbeats; otherwise
unified, so a saturated side never queues what the other could serve).
Without a unified pool, PD is used whatever the mode, and vice versa.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from cplane.orchestrator.fleet import FleetView
from cplane.orchestrator.plugin_types import NoParams, PdDecider, PluginSpec
from cplane.schemas.messages import Request, Role


@dataclass(frozen=True, slots=True)
class PdConfig:
    mode: str = "auto"  # never | always | auto
    min_prompt_tokens: int = 512


def estimate_prompt_tokens(req: Request) -> int:
    """Token count without a tokenizer: exact for ids, ~4 characters per token for text."""
    if req.prompt_token_ids is not None:
        return len(req.prompt_token_ids)
    if req.prompt is not None:
        return len(req.prompt) // 4 + 1
    if req.messages is not None:
        return sum(len(m.content) for m in req.messages) // 4 + len(req.messages)
    return 0


def choose_role(model: str, prompt_tokens: int, fleet: FleetView, cfg: PdConfig) -> Role | None:
    """The role to dispatch to, or None when no live pool serves the model now."""
    has_unified = bool(fleet.of_role(Role.UNIFIED, model))
    has_pd = bool(fleet.of_role(Role.PREFILL, model)) and bool(fleet.of_role(Role.DECODE, model))
    if not has_pd:
        return Role.UNIFIED if has_unified else None
    if not has_unified:
        return Role.PREFILL
    if cfg.mode == "always":
        return Role.PREFILL
    if cfg.mode == "auto" and prompt_tokens >= cfg.min_prompt_tokens:
        return Role.PREFILL
    return Role.UNIFIED


class LengthParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    min_prompt_tokens: int = 512


def decider(cfg: PdConfig) -> PdDecider:
    def decide_role(model: str, prompt_tokens: int, fleet: FleetView) -> Role | None:
        return choose_role(model, prompt_tokens, fleet, cfg)

    return PdDecider(cfg.mode, decide_role)


def _never(params: NoParams) -> PdDecider:
    """Unified whenever a unified pool serves the model."""
    return decider(PdConfig(mode="never"))


def _always(params: NoParams) -> PdDecider:
    """Prefill then decode whenever both pools serve the model."""
    return decider(PdConfig(mode="always"))


def _auto(params: LengthParams) -> PdDecider:
    """Prefill then decode for prompts of at least min_prompt_tokens."""
    return decider(PdConfig(mode="auto", min_prompt_tokens=params.min_prompt_tokens))


class AdaptiveParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    min_prompt_tokens: int = 512
    max_prefill_load: float = 0.9  # held items per slot of the prefill pool
    max_decode_kv: float = 0.8  # mean KV usage of the decode pool


def adaptive_role(model: str, prompt_tokens: int, fleet: FleetView, prm: AdaptiveParams
                  ) -> Role | None:
    role = choose_role(model, prompt_tokens, fleet, PdConfig("auto", prm.min_prompt_tokens))
    if role is not Role.PREFILL or not fleet.of_role(Role.UNIFIED, model):
        return role
    # Pool sums are taken once per fleet snapshot, not per request.
    load = fleet.held(Role.PREFILL, model) / max(1, fleet.capacity(Role.PREFILL, model))
    kv = fleet.kv_mean(Role.DECODE, model)
    if load >= prm.max_prefill_load or kv >= prm.max_decode_kv:
        return Role.UNIFIED
    return Role.PREFILL


def _adaptive(params: AdaptiveParams) -> PdDecider:
    """PD for long prompts while the prefill pool has room and decode has KV headroom."""

    def decide_role(model: str, prompt_tokens: int, fleet: FleetView) -> Role | None:
        return adaptive_role(model, prompt_tokens, fleet, params)

    return PdDecider("adaptive", decide_role)


PD_DECIDERS: tuple[PluginSpec[PdDecider], ...] = (
    PluginSpec("never", _never),
    PluginSpec("always", _always),
    PluginSpec("auto", _auto, LengthParams),
    PluginSpec("adaptive", _adaptive, AdaptiveParams),
)
