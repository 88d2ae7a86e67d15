"""What the orchestrator counts: a plain stats object (the metrics module reads it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class OrchestratorStats:
    accepted: int = 0  # requests held (first time)
    rejected: int = 0  # ErrorReply published by the orchestrator (bad input, model absent)
    duplicates: int = 0  # the same request id published again: served once
    dispatched: int = 0  # requests whose work JetStream stored
    batches: int = 0  # work messages
    cancelled: int = 0  # cancelled before dispatch
    pd: int = 0  # dispatched as prefill -> decode
    publish_failures: int = 0  # work publishes refused (the requests stayed held)
    publish_retries: int = 0  # unanswered work publishes retried with the same id
    dead_letters: int = 0  # request messages delivered max_deliveries times
    redeliveries_settled: int = 0  # redelivered requests found finished or running
    reconciled: int = 0  # slots freed by an LLM_DONE lookup (terminal missed live)
