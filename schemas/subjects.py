"""Every NATS subject and default stream/consumer name, in one place.

Subjects (defaults; the prefix is configurable through `Subjects(prefix=...)`):

| subject                              | carries                      | stream   |
| ------------------------------------ | ---------------------------- | -------- |
| `llm.req.<priority>.<slo_class>`     | Request (JSON)               | LLM_REQ  |
| `llm.req.<tenant>.<priority>.<slo>`  | a tenant's Request           | LLM_REQ  |
| `llm.req.pool.<pool>.<priority>.<slo>` | a Request for one partition | LLM_REQ  |
| `llm.req.<tenant>.pool.<pool>.<prio>.<slo>` | a tenant's, the same     | LLM_REQ  |
| `llm.work.<role>.<target>`           | WorkBatch                    | LLM_WORK |
| `llm.s.out.<group>.<request_id>`     | TokenChunk (workers publish) | LLM_OUT  |
| `llm.out.<group>.<request_id>`       | TokenChunk, once stored      | (republished by LLM_OUT)  |
| `llm.s.done.<group>.<request_id>`    | Final or ErrorReply          | LLM_DONE |
| `llm.done.<group>.<request_id>`      | the same, once stored        | (republished by LLM_DONE) |
| `llm.sf.<group>.<request_id>.run.fence` | a run fence (worker id), not republished | LLM_OUT |
| `llm.hb.<worker_id>`                 | Heartbeat (core NATS)        | —        |
| `llm.cancel.<request_id>`            | Cancel (captured)            | LLM_CANCEL |
| `llm.dlq.<stream>.<seq>`             | DeadLetter                   | LLM_DLQ  |
| `llm.admin.<verb>`                   | request/reply control        | —        |
| `llm.admin.policy`                   | PolicyCommand -> AdminReply  | —        |

Readers see only what is stored: producers publish outputs to the store
subjects (`llm.s.out`, `llm.s.done`), and the streams republish each message
once it is stored (and not a duplicate) to `llm.out` / `llm.done`. So a chunk
or terminal lost in a broker crash reached no reader either, and a repeated
terminal publish reaches readers once. The store subjects have five tokens,
so `llm.*.i.<id>` never matches them.

`group` is `i` for interactive requests and the batch job id for batch ones.
A tenant's requests (docs/security.md) carry the tenant as the token after the
kind: `llm.req.<tenant>.<priority>.<slo>` in, `llm.out.<tenant>.<group>.<id>`,
`llm.done.<tenant>.<group>.<id>` and `llm.cancel.<tenant>.<id>`; the server maps
them to and from the tenant's own account, where they read as above without
the tenant. Inside the system the scoped group is the string `<tenant>.<group>`.
Undecodable requests (no request id recoverable) get their ErrorReply on
`llm.done.invalid.seq<stream_sequence>`.

Partitions (docs/replicas.md): a request for a model that is a configured
partition may name its pool, `llm.req.pool.<pool>.<priority>.<slo>` (a
tenant's: `llm.req.<tenant>.pool.<pool>...`), so that only that pool's
leader reads it. The forms differ in length (2, 3, 4 and 5 tokens after
`req`), never by a token's value, so no tenant name can make one read as
another. `<pool>` is `partition_token(model)`.

Work targets: `any` (the role's whole pool), `m-<model key>` (every worker
of the role that serves that model: hand-offs, hand-backs and mixed-model
pools keep the model), or one worker id.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from cplane.schemas.messages import PRIORITIES, Priority, Role

INTERACTIVE_GROUP = "i"
INVALID_GROUP = "invalid"
ANY_TARGET = "any"
DEFAULT_SLO_CLASS = "standard"
MODEL_TARGET_PREFIX = "m-"
# Groups a request may not name: they are the system's own output subjects.
RESERVED_GROUPS = frozenset({INVALID_GROUP, "any", "all", "admin", "sys"})

POOL_MARKER = "pool"  # the token before a request subject's pool (partition)
DEFAULT_PARTITION = ""  # requests without a pool token, and models no partition names
_SAFE_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,48}")

# Subject tokens cannot hold these; ids that do are refused at the door.
_BAD_TOKEN = re.compile(r"[\s.*>]")


def valid_token(token: str) -> bool:
    """True when `token` can be one subject token (non-empty, no dots or wildcards)."""
    return 0 < len(token) <= 256 and _BAD_TOKEN.search(token) is None


def scoped(tenant: str | None, group: str) -> str:
    """A tenant's output group `<tenant>.<group>` (the system-side view of its subjects)."""
    return f"{tenant}.{group}" if tenant else group


def tenant_of(group: str) -> str | None:
    """The tenant of a scoped group; None for the system's own."""
    tenant, dot, _ = group.rpartition(".")
    return tenant if dot else None


def model_target(model: str) -> str:
    """The work target of one model's pool: `m-<readable part>-<crc32>` (a valid token).

    Model names hold `/` and `.`; the readable part keeps what a subject token
    can carry, the checksum keeps distinct names apart.
    """
    if not model:
        return ANY_TARGET
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", model)[-48:]
    return f"{MODEL_TARGET_PREFIX}{readable}-{zlib.crc32(model.encode()):08x}"


def partition_token(name: str) -> str:
    """The subject token (and consumer name part) of a partition: the name itself
    when it is a plain token of letters, digits, `_` and `-`, else a readable
    part and a checksum as `model_target` makes (model names hold `/` and `.`)."""
    if _SAFE_TOKEN.fullmatch(name):
        return name
    return model_target(name)[len(MODEL_TARGET_PREFIX):]


def pool_of(model: str, partitions: tuple[str, ...] | list[str]) -> str:
    """The pool token a publisher puts in a request's subject: its model's, when that
    model is a configured partition (`orchestrator.partitions`); else none."""
    return partition_token(model) if model and model in partitions else DEFAULT_PARTITION


@dataclass(frozen=True, slots=True)
class RequestSubject:
    """What a request subject says: its tenant (None: the system's own principal),
    its partition's pool token (DEFAULT_PARTITION: none), priority and SLO class."""

    tenant: str | None
    pool: str
    priority: str
    slo_class: str


@dataclass(frozen=True, slots=True)
class Subjects:
    """Builds and parses subject names. Nothing else in the project formats subjects."""

    prefix: str = "llm"

    # -- requests -------------------------------------------------------
    def request(self, priority: Priority | str, slo_class: str = DEFAULT_SLO_CLASS,
                tenant: str | None = None, pool: str = DEFAULT_PARTITION) -> str:
        """Where a request is published; with `tenant`, the system-side subject of
        that tenant's requests (what a tenant's own publish is mapped to); with
        `pool` (a `partition_token`), the subject only that partition's leader reads."""
        prio = priority.value if isinstance(priority, Priority) else priority
        head = f"{self.prefix}.req.{tenant}" if tenant else f"{self.prefix}.req"
        if pool:
            return f"{head}.{POOL_MARKER}.{pool}.{prio}.{slo_class}"
        return f"{head}.{prio}.{slo_class}"

    def requests_of(self, priority: Priority) -> str:
        """Filter for one priority's durable consumer (every SLO class)."""
        return f"{self.prefix}.req.{priority.value}.*"

    def tenant_requests_of(self, priority: Priority) -> str:
        """Every tenant's requests of one priority (`llm.req.<tenant>.<priority>.<slo>`)."""
        return f"{self.prefix}.req.*.{priority.value}.*"

    def pool_requests_of(self, pool: str, priority: Priority) -> str:
        """Filter of one partition's requests of one priority (system principals')."""
        return f"{self.prefix}.req.{POOL_MARKER}.{pool}.{priority.value}.*"

    def tenant_pool_requests_of(self, pool: str, priority: Priority) -> str:
        """Every tenant's requests of one partition and priority."""
        return f"{self.prefix}.req.*.{POOL_MARKER}.{pool}.{priority.value}.*"

    def parse_request_subject(self, subject: str) -> RequestSubject:
        """Any of the four request forms, told apart by their length."""
        tokens = subject[len(self.prefix) + len(".req."):].split(".")
        if len(tokens) == 3:
            return RequestSubject(tokens[0], DEFAULT_PARTITION, tokens[1], tokens[2])
        if len(tokens) == 4:
            return RequestSubject(None, tokens[1], tokens[2], tokens[3])
        if len(tokens) == 5:
            return RequestSubject(tokens[0], tokens[2], tokens[3], tokens[4])
        return RequestSubject(None, DEFAULT_PARTITION, tokens[-2], tokens[-1])

    def tenant_of_request(self, subject: str) -> str | None:
        """The tenant token of a request subject (None for the system's own forms)."""
        return self.parse_request_subject(subject).tenant

    @property
    def requests_all(self) -> str:
        return f"{self.prefix}.req.>"

    def parse_request(self, subject: str) -> tuple[str, str]:
        """`llm.req.high.interactive` -> ("high", "interactive")."""
        parts = subject.split(".")
        return parts[-2], parts[-1]

    # -- work -----------------------------------------------------------
    def work(self, role: Role, target: str = ANY_TARGET) -> str:
        return f"{self.prefix}.work.{role.value}.{target}"

    @property
    def work_all(self) -> str:
        return f"{self.prefix}.work.>"

    # -- output -----------------------------------------------------------
    def out(self, group: str, request_id: str) -> str:
        return f"{self.prefix}.out.{group}.{request_id}"

    def done(self, group: str, request_id: str) -> str:
        return f"{self.prefix}.done.{group}.{request_id}"

    def outputs_of(self, group: str, request_id: str) -> str:
        """One wildcard covering a request's chunks and its terminal message.

        A single subscription keeps the publisher's order (chunks before Final).
        """
        return f"{self.prefix}.*.{group}.{request_id}"

    @property
    def out_all(self) -> str:
        return f"{self.prefix}.out.>"

    def out_store(self, group: str, request_id: str) -> str:
        """Where a worker publishes a chunk (LLM_OUT stores it, then republishes it on `out`)."""
        return f"{self.prefix}.s.out.{group}.{request_id}"

    def done_store(self, group: str, request_id: str) -> str:
        """Where a terminal is published (LLM_DONE stores it, then republishes it on `done`)."""
        return f"{self.prefix}.s.done.{group}.{request_id}"

    def fence_store(self, group: str, request_id: str) -> str:
        """Where a run that takes a request over writes its fence (workers/run_fence.py).
        Outside `llm.s.*.>` (never republished) and six tokens or more, so no reader's
        `llm.*.<group>.<id>` or `llm.*.<tenant>.<group>.<id>` matches it."""
        return f"{self.prefix}.sf.{group}.{request_id}.run.fence"

    @property
    def fence_store_all(self) -> str:
        return f"{self.prefix}.sf.>"

    @property
    def out_store_all(self) -> str:
        return f"{self.prefix}.s.out.>"

    @property
    def done_store_all(self) -> str:
        return f"{self.prefix}.s.done.>"

    @property
    def done_all(self) -> str:
        return f"{self.prefix}.done.>"

    # -- control ----------------------------------------------------------
    def heartbeat(self, worker_id: str) -> str:
        return f"{self.prefix}.hb.{worker_id}"

    @property
    def heartbeats_all(self) -> str:
        return f"{self.prefix}.hb.*"

    @property
    def heartbeat_request(self) -> str:
        """Core subject: every worker answers with a heartbeat at once (orchestrator start)."""
        return f"{self.prefix}.admin.heartbeat"

    def fin(self, publisher: str) -> str:
        """Core subject: the terminals of the requests its body names (space-separated
        ids) are stored. Orchestrators count in-flight work by it (not by the
        terminals, which carry the text). An empty body names the last token."""
        return f"{self.prefix}.fin.{publisher}"

    @property
    def fin_all(self) -> str:
        return f"{self.prefix}.fin.*"

    def kv_events(self, worker_id: str) -> str:
        """Core subject: the worker's prefix-cache events (schemas/messages.py KvEvents)."""
        return f"{self.prefix}.kv.{worker_id}"

    @property
    def kv_events_all(self) -> str:
        return f"{self.prefix}.kv.*"

    def kv_snapshot(self, worker_id: str) -> str:
        """Core request/reply: every block the worker holds now, as one KvEvents."""
        return f"{self.prefix}.admin.kv.{worker_id}"

    def cancel(self, request_id: str, tenant: str | None = None) -> str:
        if tenant:
            return f"{self.prefix}.cancel.{tenant}.{request_id}"
        return f"{self.prefix}.cancel.{request_id}"

    @property
    def cancel_all(self) -> str:
        return f"{self.prefix}.cancel.>"

    def cancel_key(self, subject: str) -> str:
        """`llm.cancel.<id>` -> `<id>`; a tenant's `llm.cancel.<tenant>.<id>` ->
        `<tenant>.<id>`: it cancels that tenant's request only (`scoped_id`)."""
        return subject[len(self.prefix) + len(".cancel."):]

    def dead_letter(self, stream: str, seq: int) -> str:
        return f"{self.prefix}.dlq.{stream}.{seq}"

    @property
    def dead_letters_all(self) -> str:
        return f"{self.prefix}.dlq.>"

    def is_own(self, subject: str) -> bool:
        """True for any subject of this system (`<prefix>.` ...): never a reply_to."""
        return subject == self.prefix or subject.startswith(self.prefix + ".")

    @property
    def leases_bucket(self) -> str:
        """KV bucket of the orchestrator leader lease."""
        return f"{self.prefix}_leases"

    @property
    def config_bucket(self) -> str:
        """KV bucket of fleet-wide runtime choices (keys `policy` and `router`)."""
        return f"{self.prefix}_config"

    @property
    def admin_policy(self) -> str:
        """Request/reply: get or set the dispatch policy (schemas/admin.py)."""
        return self.admin("policy")

    @property
    def admin_router(self) -> str:
        """Request/reply: get or set the router (schemas/admin.py)."""
        return self.admin("router")

    def admin(self, verb: str) -> str:
        return f"{self.prefix}.admin.{verb}"

    @staticmethod
    def scoped_id(group: str, request_id: str) -> str:
        """The cancel key that names one tenant's request (`cancel_key`): `<tenant>.<id>`
        for a scoped group `<tenant>.<group>`, else the plain id."""
        return scoped(tenant_of(group), request_id)

    @staticmethod
    def last_token(subject: str) -> str:
        return subject.rpartition(".")[2]

    # -- batch jobs and streaming consumers (client/batch*.py, client/results.py) --
    def done_of(self, group: str = "*") -> str:
        """Live terminals of one output group (`*`: every group), once stored."""
        return f"{self.prefix}.done.{group}.*"

    def out_of(self, group: str = "*") -> str:
        """Live token chunks of one output group (`*`: every group), once stored."""
        return f"{self.prefix}.out.{group}.*"

    def done_store_of(self, group: str = "*") -> str:
        """Filter of one group's terminals in LLM_DONE (durable consumers: batch collectors)."""
        return f"{self.prefix}.s.done.{group}.*"

    @staticmethod
    def group_of(subject: str) -> str:
        """`llm.done.<group>.<id>` / `llm.s.done.<group>.<id>` -> group."""
        return subject.rsplit(".", 2)[-2]

    @property
    def batch_jobs_bucket(self) -> str:
        """KV bucket of batch job records (schemas/batch.py BatchJob), key = job id."""
        return f"{self.prefix}_batches"

    @property
    def batch_files_bucket(self) -> str:
        """Object store of batch inputs and collected results (`<job>/input.jsonl`, ...)."""
        return f"{self.prefix}_batch_files"


def consumer_for_priority(priority: Priority, pool: str = DEFAULT_PARTITION) -> str:
    """Durable pull consumer name of one priority level on LLM_REQ (of one partition's
    pool token: `orch-<pool>-<priority>`)."""
    return f"orch-{pool}-{priority.value}" if pool else f"orch-{priority.value}"


def consumer_for_work(role: Role, target: str) -> str:
    """Durable pull consumer of one work subject (pool `any` or one worker)."""
    return f"work-{role.value}-{target}"


__all__ = [
    "ANY_TARGET",
    "DEFAULT_PARTITION",
    "DEFAULT_SLO_CLASS",
    "INTERACTIVE_GROUP",
    "INVALID_GROUP",
    "MODEL_TARGET_PREFIX",
    "POOL_MARKER",
    "PRIORITIES",
    "RESERVED_GROUPS",
    "RequestSubject",
    "Subjects",
    "consumer_for_priority",
    "consumer_for_work",
    "model_target",
    "partition_token",
    "pool_of",
    "scoped",
    "tenant_of",
    "valid_token",
]
