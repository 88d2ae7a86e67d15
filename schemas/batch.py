"""Batch jobs: the OpenAI batch file format and a job's state in the KV bucket.

An input line (`BatchInputLine`) is one OpenAI batch request:

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "sim", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6}}

Each valid line becomes one `Request` of the job (group = job id, request id
derived from job id and custom_id, so a re-submit is deduplicated). Its
terminal on `llm.done.<job>.<request_id>` becomes one `BatchOutputLine`:
a success goes to the output file, anything else (an ErrorReply, a
cancellation, an invalid line) to the errors file. Unlike the other wire
structs these keep their null fields on the wire (`response: null`,
`error: null`), as OpenAI's files do.

A job's `BatchJob` record lives in the KV bucket `<prefix>_batches` under
its id; its input file and its collected results live in the object store
`<prefix>_batch_files` (`<job>/input.jsonl`, `<job>/results/<n>`).
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from cplane.schemas.messages import Base

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
BATCH_URLS = (CHAT_URL, COMPLETIONS_URL)


class BatchInputLine(msgspec.Struct, frozen=True, kw_only=True):
    """One line of an OpenAI batch input file (fields checked by client/batch_lines.py)."""

    custom_id: str
    method: str
    url: str
    body: dict[str, Any]


class BatchResponse(msgspec.Struct, frozen=True, kw_only=True):
    status_code: int
    request_id: str
    body: dict[str, Any]


class BatchError(msgspec.Struct, frozen=True, kw_only=True):
    code: str
    message: str


class BatchOutputLine(msgspec.Struct, frozen=True, kw_only=True):
    """One line of the output or errors file, in OpenAI's shape (nulls kept)."""

    id: str
    custom_id: str | None
    response: BatchResponse | None = None
    error: BatchError | None = None


class JobState(enum.StrEnum):
    """A job's life, as OpenAI names it. Terminal: completed, failed, cancelled."""

    VALIDATING = "validating"  # the file is being checked and stored
    IN_PROGRESS = "in_progress"  # lines are published and running
    FINALIZING = "finalizing"  # every expected result is in; closing the job
    COMPLETED = "completed"
    FAILED = "failed"  # the job could not run (nothing valid, the store refused...)
    CANCELLING = "cancelling"  # no more lines go out; those sent are being cancelled
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


class BatchJob(Base, frozen=True, kw_only=True):
    """A job's record in the KV bucket `<prefix>_batches` (key: the job id).

    Counts: `total` valid lines (those published or to publish), `invalid`
    lines refused at validation and skipped, `published` lines JetStream has
    acked so far, `completed` / `failed` results collected so far (cancelled
    lines count as failed). `parts` result objects were reserved in the
    object store (`<job>/results/0` ...).
    """

    id: str
    state: JobState
    input_file: str = ""  # the name the submitter gave (informational)
    input_object: str = ""  # object name in `<prefix>_batch_files`
    model: str = ""  # --model override ("" = each line's body.model)
    priority: str = "background"
    slo_class: str = "batch"
    # Whose requests these are (the gateway: its API key's tenant): published on that
    # tenant's subjects, so its ceilings, fairness and metrics count them; None = none.
    tenant: str | None = None
    # Lines whose Request encoded above this were refused (the server's max_payload at
    # submit): kept so that reading the input again classifies every line the same way.
    max_request_bytes: int = 1 << 20
    total: int = 0
    invalid: int = 0
    published: int = 0
    publishing_done: bool = False  # the submitter stopped publishing (all sent, or cancelled)
    completed: int = 0
    failed: int = 0
    parts: int = 0
    error: str = ""  # why the job failed
    created_ms: float = 0.0
    updated_ms: float = 0.0
    finished_ms: float = 0.0

    @property
    def expected(self) -> int:
        """Results the job waits for: every valid line, or once a cancel stopped
        publishing, the lines that were sent."""
        return self.published if self.publishing_done else self.total


BATCH_TYPES: dict[str, type[Any]] = {
    "BatchInputLine": BatchInputLine,
    "BatchOutputLine": BatchOutputLine,
    "BatchJob": BatchJob,
}

__all__ = [
    "BATCH_TYPES",
    "BATCH_URLS",
    "CHAT_URL",
    "COMPLETIONS_URL",
    "BatchError",
    "BatchInputLine",
    "BatchJob",
    "BatchOutputLine",
    "BatchResponse",
    "JobState",
]
