"""What the orchestrator counts: a plain stats object (the metrics module reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field

OTHER = "other"  # label value past a cap: names taken from subjects are unbounded
MAX_CLASSES = 32


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
    forwarded: int = 0  # requests moved to their model's partition (docs/replicas.md)
    # By label (bounded): rejections by error code (`overloaded` = shed), requests
    # held by "<priority>/<slo_class>", routing decisions by "<role>/<worker|pool>".
    rejections: dict[str, int] = field(default_factory=dict)
    accepted_by: dict[str, int] = field(default_factory=dict)
    routed: dict[str, int] = field(default_factory=dict)

    def reject(self, code: str) -> None:
        self.rejected += 1
        self.rejections[code] = self.rejections.get(code, 0) + 1

    def accept(self, priority: str, slo_class: str) -> None:
        self.accepted += 1
        key = f"{priority}/{slo_class}"
        if key not in self.accepted_by and len(self.accepted_by) >= 5 * MAX_CLASSES:
            key = f"{priority}/{OTHER}"
        self.accepted_by[key] = self.accepted_by.get(key, 0) + 1

    def route(self, role: str, to_worker: bool, n: int) -> None:
        key = f"{role}/{'worker' if to_worker else 'pool'}"
        self.routed[key] = self.routed.get(key, 0) + n
