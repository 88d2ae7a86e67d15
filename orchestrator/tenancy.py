"""Tenants' ceilings at intake: rate and in-flight caps, and ids in use elsewhere.

A tenant's request arrives on `llm.req.<tenant>.<priority>.<slo>` (the server
maps the tenant's own publish there from its credentials: docs/security.md).
`intake.admit` checks what one message shows (the body's tenant, the priority
ceiling); this checks what needs the orchestrator's state: how many of the
tenant's requests are held or running, how fast it has been sending, and
whether its request id is held for another tenant. Pure apart from the clock
the caller passes in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field

from cplane.orchestrator.intake import Rejection, admit, scoped_key
from cplane.orchestrator.ledger import Entry
from cplane.schemas.messages import ErrorCode, WorkItem
from cplane.schemas.settings import LimitsSettings, OrchestratorSettings, TenantPolicy
from cplane.schemas.subjects import Subjects, tenant_of

MAX_BUCKETS = 100_000  # tenants with a rate bucket kept (beyond: the oldest are dropped)


def known_in_scope(entry: Entry[WorkItem] | None, seen: Container[str], request_id: str,
                   group: str) -> bool:
    """A live (`entry`, the ledger's under this id) or recently finished request of the
    scope of `group`: a rejection published there must not become its terminal."""
    return (entry is not None and tenant_of(entry.item.request.group) == tenant_of(group)) or (
        Subjects.scoped_id(group, request_id) in seen)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


@dataclass(slots=True)
class TenantGate:
    settings: OrchestratorSettings
    subjects: Subjects
    limits: LimitsSettings
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def admit(self, subject: str, data: bytes, stored_ms: float, now_ms: float,
              deliveries: int, orchestrator_id: str,
              held_of: Callable[[str], Entry[WorkItem] | None], in_flight: Mapping[str, int],
              seen: Container[str]) -> tuple[WorkItem | Rejection, Entry[WorkItem] | None, bool]:
        """`intake.admit` with the subject's tenant and its ceilings, then `check`;
        returns the answer, the ledger's entry under its id (None if refused) and
        whether its scoped id is in `seen` (dispatched or finished recently)."""
        admitted, tenant = self._admit(subject, data, stored_ms, now_ms, orchestrator_id)
        if not isinstance(admitted, WorkItem):
            return admitted, None, False
        held = held_of(admitted.request.request_id)
        refused = None if tenant is None else self.check(
            admitted, held_group=held.item.request.group if held else None,
            in_flight=in_flight.get(tenant, 0), new=deliveries == 1, now_s=time.monotonic())
        if refused is not None:
            return refused, None, False
        return admitted, held, scoped_key(admitted.request) in seen

    def refuse_overloaded(self, subject: str, data: bytes, now_ms: float,
                          orchestrator_id: str) -> Rejection:
        """The rejection of a request that cannot be taken now (LLM_REQ full while it
        waited to be forwarded to its partition): overloaded, retryable; or what
        `intake.admit` says is wrong with it."""
        admitted, _ = self._admit(subject, data, now_ms, now_ms, orchestrator_id)
        if isinstance(admitted, Rejection):
            return admitted
        req = admitted.request
        return Rejection(req.request_id, req.group, ErrorCode.OVERLOADED,
                         "the request stream is full: publish again later",
                         retryable=True, retry_after_ms=1000.0)

    def _admit(self, subject: str, data: bytes, stored_ms: float, now_ms: float,
               orchestrator_id: str) -> tuple[WorkItem | Rejection, str | None]:
        """`intake.admit` under the subject's tenant and its ceilings; and that tenant."""
        parsed = self.subjects.parse_request_subject(subject)
        return admit(data, parsed.priority, parsed.slo_class, stored_ms, now_ms,
                     orchestrator_id, self.limits, parsed.tenant,
                     self.policy(parsed.tenant)), parsed.tenant

    def policy(self, tenant: str | None) -> TenantPolicy:
        if tenant is None:
            return TenantPolicy()
        return self.settings.tenants.get(tenant, self.settings.tenant_policy)

    def check(self, item: WorkItem, *, held_group: str | None, in_flight: int,
              new: bool, now_s: float) -> Rejection | None:
        """Why a tenant's admitted request may not be held now, or None.

        `held_group`: the output group of the request the ledger holds under this
        id (None: none); `in_flight`: the tenant's requests held or running; `new`:
        a first delivery (a redelivery was counted when it first came)."""
        req = item.request
        tenant = req.tenant or ""
        if held_group is not None and tenant_of(held_group) != tenant_of(req.group):
            return Rejection(req.request_id, req.group, ErrorCode.FORBIDDEN,
                             f"request_id {req.request_id!r} is in use by another request; "
                             "give each request a unique id (the SDK's are random)")
        if not new or held_group is not None:
            return None
        pol = self.policy(tenant)
        if pol.max_in_flight is not None and in_flight >= pol.max_in_flight:
            return Rejection(req.request_id, req.group, ErrorCode.RATE_LIMITED,
                             f"tenant {tenant!r} has {in_flight} requests in flight; its cap "
                             f"is {pol.max_in_flight}", retryable=True, retry_after_ms=1000.0)
        if pol.max_rps is not None and not self._take(tenant, pol.max_rps, now_s):
            return Rejection(req.request_id, req.group, ErrorCode.RATE_LIMITED,
                             f"tenant {tenant!r} sends above its {pol.max_rps:g} requests/s",
                             retryable=True, retry_after_ms=1000.0 / max(pol.max_rps, 1e-3))
        return None

    def _take(self, tenant: str, rate: float, now_s: float) -> bool:
        """One token from the tenant's bucket (refilled at `rate`/s, holding one second's)."""
        b = self._buckets.get(tenant)
        if b is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._buckets.pop(next(iter(self._buckets)))
            b = self._buckets[tenant] = _Bucket(max(rate, 1.0), now_s)
        b.tokens = min(max(rate, 1.0), b.tokens + (now_s - b.at) * rate)
        b.at = now_s
        if b.tokens < 1.0:
            return False
        b.tokens -= 1.0
        return True
