"""`/v1/files` and `/v1/batches` onto cplane's batch jobs (client/batch*.py).

Files live in the batch object store (`<prefix>_batch_files`) as `files/<id>`,
their name and purpose in the object's description. POST /v1/batches checks
the whole input file at once (an invalid line is a 400 naming every bad line,
as `cplane batch submit` without --skip-invalid), creates the job record
(client/batch.py start_job), answers, and then, in this gateway process,
publishes the lines, collects the results and stores the output and error
files as `file-<batch>-output` / `file-<batch>-errors`. Status, counts and
cancel read and write the job record, so `cplane batch` sees the same jobs.

Every file and batch belongs to the tenant of the key that created it
(gateway/ownership.py): a caller lists only its own, and another tenant's id
answers 404 exactly as a missing one. Uploads are counted as they arrive
(gateway/guard.py) and go to the store from the parser's spooled file;
downloads go out one stored chunk at a time (gateway/objects.py).

A gateway that stops mid-job leaves it `in_progress`: its lines already
published still run and their results stay in LLM_DONE; the batch tool's way
to go on is `cplane batch submit FILE --job-id <batch id>` with the same file
(not tested through the gateway).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import BinaryIO

import msgspec
from nats.js.api import ObjectInfo, ObjectMeta
from nats.js.errors import NotFoundError
from starlette.datastructures import UploadFile
from starlette.requests import Request as HttpRequest
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from cplane.client.batch import (
    InvalidFile,
    SubmitOptions,
    cancel_job,
    publish_lines,
    start_job,
    validate_file,
)
from cplane.client.batch_collect import Collector, write_results
from cplane.client.batch_lines import LineChecker
from cplane.client.batch_run import PLACEHOLDER_JOB
from cplane.client.batch_store import JobStore
from cplane.client.sdk import Client
from cplane.gateway import batch_map as bm
from cplane.gateway.guard import caller_of
from cplane.gateway.objects import chunks
from cplane.gateway.openai_map import ApiError
from cplane.gateway.ownership import own_only, owns
from cplane.schemas.batch import BATCH_URLS, BatchJob
from cplane.schemas.settings import Settings

log = logging.getLogger("cplane.gateway")
_encode = msgspec.json.Encoder().encode
_meta_decoder = msgspec.json.Decoder(bm.BatchMeta)
_file_decoder = msgspec.json.Decoder(bm.FileMeta)
_create_decoder = msgspec.json.Decoder(bm.CreateBatch)


def _json(obj: object, status: int = 200) -> Response:
    return Response(_encode(obj), status_code=status, media_type="application/json")


def _error(e: ApiError) -> Response:
    return _json(e.body(), e.status)


def _not_found(what: str, param: str) -> Response:
    return _error(ApiError(404, f"no {what}", type="NotFoundError", param=param,
                           code="not_found"))


class BatchApi:
    """The files and batches endpoints over the gateway's shared connection."""

    def __init__(self, client: Client, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self._store: JobStore | None = None
        self._jobs: set[asyncio.Task[None]] = set()  # jobs this process publishes and collects

    def routes(self) -> list[Route]:
        return [
            Route("/v1/files", self.upload, methods=["POST"]),
            Route("/v1/files", self.list_files, methods=["GET"]),
            Route("/v1/files/{file_id}", self.file_info, methods=["GET"]),
            Route("/v1/files/{file_id}", self.delete_file, methods=["DELETE"]),
            Route("/v1/files/{file_id}/content", self.file_content, methods=["GET"]),
            Route("/v1/batches", self.create, methods=["POST"]),
            Route("/v1/batches", self.list_batches, methods=["GET"]),
            Route("/v1/batches/{batch_id}", self.get, methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", self.cancel, methods=["POST"]),
        ]

    async def store(self) -> JobStore:
        if self._store is None:
            self._store = await JobStore.open(self.client.js, self.settings)
        return self._store

    async def close(self) -> None:
        for task in list(self._jobs):
            task.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)

    # -- files ---------------------------------------------------------------------
    async def upload(self, request: HttpRequest) -> Response:
        """The guard has counted the body against max_file_bytes (plus the multipart
        framing); the file spools to disk past 1 MiB and streams into the store."""
        limit = self.settings.gateway.max_file_bytes
        async with request.form(max_part_size=64 << 10) as form:
            file, purpose = form.get("file"), form.get("purpose")
            if not isinstance(file, UploadFile):
                return _error(ApiError(400, "a multipart field 'file' is required", param="file"))
            if not isinstance(purpose, str) or not purpose:
                return _error(ApiError(400, "a field 'purpose' is required", param="purpose"))
            size = file.size or 0
            if size > limit:
                return _error(ApiError(413, f"the file exceeds {limit} bytes", code="too_large"))
            file_id = f"file-{uuid.uuid4().hex}"
            meta = bm.FileMeta(filename=file.filename or "upload.jsonl", purpose=purpose,
                               created_at=int(time.time()), owner=caller_of(request).owner)
            await file.seek(0)
            await self._put_file(file_id, file.file, meta)
        return _json(bm.file_object(file_id, size, meta))

    async def _put_file(self, file_id: str, data: BinaryIO, meta: bm.FileMeta) -> None:
        store = await self.store()
        await store.obs.put(bm.FILES_PREFIX + file_id, data,  # type: ignore[arg-type]
                            meta=ObjectMeta(description=_encode(meta).decode()))

    async def _owned_file(self, file_id: str, owner: str) -> tuple[ObjectInfo, bm.FileMeta] | None:
        """The file's info and meta when it exists and is `owner`'s; None otherwise."""
        store = await self.store()
        try:
            info = await store.obs.get_info(bm.FILES_PREFIX + file_id)
        except NotFoundError:
            return None
        if info.deleted or not info.description:
            return None
        try:
            meta = _file_decoder.decode(info.description)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        return (info, meta) if owns(meta.owner, owner) else None

    async def file_info(self, request: HttpRequest) -> Response:
        file_id = request.path_params["file_id"]
        found = await self._owned_file(file_id, caller_of(request).owner)
        if found is None:
            return _not_found(f"file {file_id!r}", "file_id")
        info, meta = found
        return _json(bm.file_object(file_id, info.size or 0, meta))

    async def file_content(self, request: HttpRequest) -> Response:
        """The file, one stored chunk at a time (never whole in memory)."""
        file_id = request.path_params["file_id"]
        found = await self._owned_file(file_id, caller_of(request).owner)
        if found is None:
            return _not_found(f"file {file_id!r}", "file_id")
        info = found[0]
        return StreamingResponse(chunks(self.client.js, info), media_type="application/jsonl",
                                 headers={"content-length": str(info.size or 0)})

    async def delete_file(self, request: HttpRequest) -> Response:
        file_id = request.path_params["file_id"]
        if await self._owned_file(file_id, caller_of(request).owner) is None:
            return _not_found(f"file {file_id!r}", "file_id")
        store = await self.store()
        try:
            await store.obs.delete(bm.FILES_PREFIX + file_id)
        except NotFoundError:
            return _not_found(f"file {file_id!r}", "file_id")
        return _json({"id": file_id, "object": "file", "deleted": True})

    async def list_files(self, request: HttpRequest) -> Response:
        store = await self.store()
        try:
            infos = await store.obs.list(ignore_deletes=True)
        except NotFoundError:
            infos = []
        found = []
        for i in infos:
            if not i.name.startswith(bm.FILES_PREFIX) or not i.description:
                continue
            try:
                found.append((i, _file_decoder.decode(i.description)))
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
        mine = own_only(found, lambda f: f[1].owner, caller_of(request).owner)
        data = [bm.file_object(i.name.removeprefix(bm.FILES_PREFIX), i.size or 0, meta)
                for i, meta in mine]
        return _json({"object": "list", "data": data})

    # -- batches -------------------------------------------------------------------
    async def create(self, request: HttpRequest) -> Response:
        owner = caller_of(request).owner
        try:
            body = _create_decoder.decode(await request.body())
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return _error(ApiError(400, f"invalid body: {exc}"))
        if body.endpoint not in BATCH_URLS:
            return _error(ApiError(400, f"endpoint must be one of {list(BATCH_URLS)}",
                                   param="endpoint"))
        if await self._owned_file(body.input_file_id, owner) is None:
            return _not_found(f"file {body.input_file_id!r}", "input_file_id")
        store = await self.store()
        job_id = f"batch_{uuid.uuid4().hex}"
        # The meta (with the owner) goes first: no reader ever sees the job unowned.
        meta = bm.BatchMeta(endpoint=body.endpoint, input_file_id=body.input_file_id,
                            completion_window=body.completion_window, metadata=body.metadata,
                            owner=owner)
        await store.obs.put(bm.META_PREFIX + job_id, _encode(meta))
        tmp = Path(tempfile.mkdtemp(prefix="cplane-gw-batch-"))
        try:
            path = tmp / "input.jsonl"
            with path.open("wb") as fh:
                await store.obs.get(bm.FILES_PREFIX + body.input_file_id, writeinto=fh)
            job = await self._start(store, path, job_id, owner)
        except (InvalidFile, NotFoundError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            await _forget(store, job_id)
            if isinstance(exc, NotFoundError):  # deleted meanwhile
                return _not_found(f"file {body.input_file_id!r}", "input_file_id")
            return _error(ApiError(400, str(exc), param="input_file_id"))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        task = asyncio.create_task(self._run(store, job.id, tmp, owner))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return _json(bm.batch_object(job, meta, output_ready=False, errors_ready=False))

    async def _start(self, store: JobStore, path: Path, job_id: str, owner: str) -> BatchJob:
        nc = self.client.nc
        checker = LineChecker(PLACEHOLDER_JOB, limits=self.settings.limits,
                              max_bytes=nc.max_payload)
        checked = await asyncio.to_thread(validate_file, path, checker)
        job, _ = await start_job(store, path, checked,
                                 SubmitOptions(job_id=job_id, tenant=owner or None),
                                 nc.max_payload)
        return job

    async def _run(self, store: JobStore, job_id: str, tmp: Path, owner: str) -> None:
        """Publish and collect the job, then store its output and error files (its owner's)."""
        js, s = self.client.js, self.settings
        try:
            input_path = tmp / "input.jsonl"
            await asyncio.gather(Collector(js, store, s, job_id).run(),
                                 publish_lines(js, store, s, job_id, input_path))
            out, err = tmp / "output.jsonl", tmp / "errors.jsonl"
            await write_results(store, s, job_id, out, err)
            now = int(time.time())
            for file_id, path in ((bm.output_file_id(job_id), out),
                                  (bm.error_file_id(job_id), err)):
                meta = bm.FileMeta(filename=path.name, purpose="batch_output", created_at=now,
                                   owner=owner)
                with path.open("rb") as fh:
                    await self._put_file(file_id, fh, meta)
        except Exception:
            log.exception("batch %s: the gateway could not finish it", job_id)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    async def _meta(self, job_id: str) -> bm.BatchMeta | None:
        store = await self.store()
        try:
            return _meta_decoder.decode((await store.obs.get(bm.META_PREFIX + job_id)).data or b"")
        except (NotFoundError, msgspec.DecodeError, msgspec.ValidationError):
            return None

    async def _object(self, job: BatchJob, meta: bm.BatchMeta | None, owner: str
                      ) -> dict[str, object]:
        ready = [await self._owned_file(f(job.id), owner) is not None
                 for f in (bm.output_file_id, bm.error_file_id)] if job.state.terminal else [
            False, False]
        return bm.batch_object(job, meta, output_ready=ready[0], errors_ready=ready[1])

    async def _owned_job(self, job_id: str, owner: str
                         ) -> tuple[BatchJob, bm.BatchMeta | None] | None:
        """The job and its meta when it exists and is `owner`'s (no meta: owner "")."""
        job = await (await self.store()).get(job_id)
        if job is None:
            return None
        meta = await self._meta(job_id)
        return (job, meta) if owns(meta.owner if meta else None, owner) else None

    async def get(self, request: HttpRequest) -> Response:
        batch_id = request.path_params["batch_id"]
        owner = caller_of(request).owner
        found = await self._owned_job(batch_id, owner)
        if found is None:
            return _not_found(f"batch {batch_id!r}", "batch_id")
        return _json(await self._object(*found, owner))

    async def list_batches(self, request: HttpRequest) -> Response:
        owner = caller_of(request).owner
        jobs = [(j, await self._meta(j.id)) for j in await (await self.store()).list()]
        mine = own_only(jobs, lambda jm: jm[1].owner if jm[1] else None, owner)
        data = [await self._object(j, m, owner) for j, m in reversed(mine)]  # newest first
        return _json({"object": "list", "data": data, "has_more": False})

    async def cancel(self, request: HttpRequest) -> Response:
        batch_id = request.path_params["batch_id"]
        owner = caller_of(request).owner
        found = await self._owned_job(batch_id, owner)
        if found is None:
            return _not_found(f"batch {batch_id!r}", "batch_id")
        job, _ = await cancel_job(self.client.nc, await self.store(), self.settings, batch_id)
        return _json(await self._object(job, found[1], owner))


async def _forget(store: JobStore, job_id: str) -> None:
    """Drop the meta of a job that never started (best effort: it names no job)."""
    try:
        await store.obs.delete(bm.META_PREFIX + job_id)
    except Exception as exc:  # the store is away: the meta is orphaned, harmless
        log.warning("batch %s: could not drop its meta: %r", job_id, exc)
