"""Where batch jobs live: records in a KV bucket, files in an object store.

- KV `<prefix>_batches`: one `BatchJob` per job id. Every change goes through
  `update(job_id, fn)`: read, apply the pure `fn`, write if the revision is
  still the one read (else read again): a cancel and a collector never
  overwrite each other's changes.
- Object store `<prefix>_batch_files`: `<job>/input.jsonl` (the file as
  submitted, streamed in and out, never loaded whole) and
  `<job>/results/<n>` (terminals as JSON lines, written by collectors).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import (
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from cplane.bus.kv_keys import kv_keys
from cplane.bus.provision import open_batch_stores
from cplane.schemas.batch import BatchJob
from cplane.schemas.settings import Settings

_job_decoder = msgspec.json.Decoder(BatchJob)
_CAS_ATTEMPTS = 50


class UnknownJob(LookupError):
    """No record of this job id (never submitted, or expired with its results)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no batch job {job_id!r} (never submitted, or past its retention)")


def file_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line) for each non-blank line, read one at a time."""
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            line = raw.strip()
            if line:
                yield n, line


def input_object(job_id: str) -> str:
    return f"{job_id}/input.jsonl"


def part_object(job_id: str, n: int) -> str:
    return f"{job_id}/results/{n:06d}"


class JobStore:
    def __init__(self, kv: KeyValue, obs: ObjectStore, js: JetStreamContext,
                 bucket: str) -> None:
        self.kv = kv
        self.obs = obs
        self._js = js
        self._bucket = bucket

    @classmethod
    async def open(cls, js: JetStreamContext, settings: Settings) -> JobStore:
        """Open both stores; StoreMissingError when no orchestrator has provisioned them."""
        kv, obs = await open_batch_stores(js, settings)
        return cls(kv, obs, js, settings.subjects.batch_jobs_bucket)

    # -- records ------------------------------------------------------------------
    async def get(self, job_id: str) -> BatchJob | None:
        try:
            entry = await self.kv.get(job_id)
        except (KeyNotFoundError, NotFoundError):
            return None
        return _job_decoder.decode(entry.value) if entry.value else None

    async def require(self, job_id: str) -> BatchJob:
        job = await self.get(job_id)
        if job is None:
            raise UnknownJob(job_id)
        return job

    async def create(self, job: BatchJob) -> bool:
        """Store a new record; False when the job id exists already (nothing written)."""
        try:
            await self.kv.create(job.id, msgspec.json.encode(job))
        except KeyWrongLastSequenceError:
            return False
        return True

    async def update(self, job_id: str, fn: Callable[[BatchJob], BatchJob]) -> BatchJob:
        """Apply `fn` to the stored record and write it back unless someone wrote meanwhile
        (then again, on the newer record). `fn` may raise to refuse the change."""
        for _ in range(_CAS_ATTEMPTS):
            try:
                entry = await self.kv.get(job_id)
            except (KeyNotFoundError, NotFoundError):
                raise UnknownJob(job_id) from None
            new = fn(_job_decoder.decode(entry.value or b""))
            try:
                await self.kv.update(job_id, msgspec.json.encode(new), last=entry.revision)
                return new
            except KeyWrongLastSequenceError:
                continue
        raise RuntimeError(f"job {job_id}: {_CAS_ATTEMPTS} concurrent writers in a row")

    async def list(self) -> list[BatchJob]:
        """Every job record, oldest first.

        Keys from the bucket stream's subject counts (bus/kv_keys.py), not `kv.keys()`."""
        keys = await kv_keys(self._js, self._bucket)
        jobs = [job for k in keys if (job := await self.get(k)) is not None]
        return sorted(jobs, key=lambda j: j.created_ms)

    # -- files --------------------------------------------------------------------
    async def put_input(self, job_id: str, path: Path) -> str:
        """Store the input file (read in chunks); returns its object name."""
        name = input_object(job_id)
        with path.open("rb") as fh:
            await self.obs.put(name, fh)
        return name

    @contextlib.asynccontextmanager
    async def input_file(self, job_id: str) -> AsyncIterator[Path]:
        """The stored input, downloaded chunk by chunk to a temporary file."""
        with tempfile.TemporaryDirectory(prefix="cplane-batch-") as d:
            path = Path(d) / "input.jsonl"
            with path.open("wb") as fh:
                try:
                    await self.obs.get(input_object(job_id), writeinto=fh)
                except NotFoundError:
                    raise UnknownJob(job_id) from None
            yield path

    async def put_part(self, job_id: str, n: int, data: bytes) -> None:
        await self.obs.put(part_object(job_id, n), io.BytesIO(data))

    async def get_part(self, job_id: str, n: int) -> bytes | None:
        """A result part's bytes; None when it was reserved but never written (its
        collector died first: its terminals were not acked and come again)."""
        try:
            return (await self.obs.get(part_object(job_id, n))).data or b""
        except NotFoundError:
            return None


__all__ = ["JobStore", "UnknownJob", "file_lines", "input_object", "part_object"]
