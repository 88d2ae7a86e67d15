"""Batch jobs and stored files as OpenAI's `batch` and `file` objects. Pure.

A job's state names are OpenAI's already (schemas/batch.py JobState). What
OpenAI's Batch object carries and BatchJob does not (the endpoint, the input
file id, metadata, the owner) the gateway keeps beside the job as a `BatchMeta`.
Owners are fields with defaults: a record written before them reads as owner
"" (gateway/ownership.py).
"""

from __future__ import annotations

from typing import Any

import msgspec

from cplane.schemas.batch import BatchJob, JobState

FILES_PREFIX = "files/"  # object names of uploaded and result files in `<prefix>_batch_files`
META_PREFIX = "batches/"  # object names of BatchMeta records


class BatchMeta(msgspec.Struct, frozen=True, kw_only=True):
    """What the gateway stores beside a job it created (object `batches/<job id>`)."""

    endpoint: str
    input_file_id: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None
    owner: str = ""  # the creating key's tenant ("": open gateway, or stored before owners)


class FileMeta(msgspec.Struct, frozen=True, kw_only=True):
    """A stored file's description (the object's `description`, as JSON)."""

    filename: str
    purpose: str
    created_at: int
    owner: str = ""  # the uploading key's tenant ("": open gateway, or stored before owners)


class CreateBatch(msgspec.Struct, frozen=True, kw_only=True):
    """The body of POST /v1/batches."""

    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


def output_file_id(job_id: str) -> str:
    return f"file-{job_id}-output"


def error_file_id(job_id: str) -> str:
    return f"file-{job_id}-errors"


def file_object(file_id: str, size: int, meta: FileMeta) -> dict[str, Any]:
    return {"id": file_id, "object": "file", "bytes": size, "created_at": meta.created_at,
            "filename": meta.filename, "purpose": meta.purpose}


def _s(ms: float) -> int | None:
    return int(ms / 1000) if ms else None


def batch_object(job: BatchJob, meta: BatchMeta | None, *, output_ready: bool,
                 errors_ready: bool) -> dict[str, Any]:
    """OpenAI's Batch object for a job (and its meta, when the gateway created it)."""
    done = job.finished_ms if job.state.terminal else 0.0
    errors = None
    if job.error:
        errors = {"object": "list", "data": [{"code": "batch_failed", "message": job.error,
                                              "param": None, "line": None}]}
    return {
        "id": job.id, "object": "batch",
        "endpoint": meta.endpoint if meta else "",
        "errors": errors,
        "input_file_id": meta.input_file_id if meta else job.input_file,
        "completion_window": meta.completion_window if meta else "24h",
        "status": job.state.value,
        "output_file_id": output_file_id(job.id) if output_ready else None,
        "error_file_id": error_file_id(job.id) if errors_ready else None,
        "created_at": _s(job.created_ms),
        "in_progress_at": _s(job.created_ms) if job.state is not JobState.VALIDATING else None,
        "completed_at": _s(done) if job.state is JobState.COMPLETED else None,
        "failed_at": _s(done) if job.state is JobState.FAILED else None,
        "cancelled_at": _s(done) if job.state is JobState.CANCELLED else None,
        "expires_at": None, "expired_at": None, "finalizing_at": None, "cancelling_at": None,
        "request_counts": {"total": job.total + job.invalid, "completed": job.completed,
                           "failed": job.failed + job.invalid},
        "metadata": meta.metadata if meta else None,
    }
