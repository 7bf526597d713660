"""``/v1/files``: upload, list, retrieve, content, delete."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from litestar import Controller, Request, delete, get, post
from litestar.datastructures import UploadFile
from litestar.enums import RequestEncodingType
from litestar.params import Body, Parameter
from litestar.response import Stream

from service.api.deps import app_state, org_repo
from service.auth import Principal
from service.errors import APIError
from service.files import create_file, present_file, upload_hash
from service.storage import ObjectNotFound


@dataclass
class FileUpload:
    file: UploadFile
    purpose: str = "fine-tune"


Limit = Annotated[int, Parameter(ge=1, le=10000)]


class FilesController(Controller):
    path = "/v1/files"
    tags = ["files"]

    # No body limit here: upload_size_limit enforces ALIGND_MAX_UPLOAD_BYTES while the body streams.
    @post("/", status_code=200, sync_to_thread=True, summary="Upload a JSONL dataset", request_max_body_size=None)
    def upload(self, request: Request, principal: Principal,  # type: ignore[type-arg]
               data: Annotated[FileUpload, Body(media_type=RequestEncodingType.MULTI_PART)],
               idempotency_key: Annotated[str | None, Parameter(header="Idempotency-Key")] = None,
               ) -> dict[str, Any]:
        state = app_state(request)
        if not isinstance(data.file, UploadFile):
            raise APIError(400, "'file' must be a file part", code="invalid_request", param="file")
        stream = data.file.file
        with org_repo(state, principal) as repo:
            digest = upload_hash(data.file.filename, data.purpose, stream) if idempotency_key else ""
            if idempotency_key:
                seen = repo.idempotency("files", idempotency_key)
                if seen is not None:
                    if seen.request_hash != digest:
                        raise APIError(409, "Idempotency-Key was already used with a different request",
                                       code="idempotency_key_reused", param="Idempotency-Key")
                    return present_file(repo.get_file(seen.object_id or ""))
            row = create_file(repo, state.store, state.settings.limits, filename=data.file.filename,
                              purpose=data.purpose, stream=stream)
            if idempotency_key:
                repo.remember_idempotency("files", idempotency_key, digest, row.id)
            return present_file(row)

    @get("/", sync_to_thread=True, summary="List files")
    def list_files(self, request: Request, principal: Principal,  # type: ignore[type-arg]
                   purpose: str | None = None, after: str | None = None, limit: Limit = 100) -> dict[str, Any]:
        with org_repo(app_state(request), principal) as repo:
            rows, has_more = repo.list_files(purpose=purpose, after=after, limit=limit)
            return {"object": "list", "data": [present_file(r) for r in rows], "has_more": has_more}

    @get("/{file_id:str}", sync_to_thread=True, summary="Retrieve a file")
    def retrieve(self, request: Request, principal: Principal, file_id: str) -> dict[str, Any]:  # type: ignore[type-arg]
        with org_repo(app_state(request), principal) as repo:
            return present_file(repo.get_file(file_id))

    @get("/{file_id:str}/content", sync_to_thread=True, summary="Download a file's content",
         media_type="application/jsonl")
    def content(self, request: Request, principal: Principal, file_id: str) -> Stream:  # type: ignore[type-arg]
        state = app_state(request)
        with org_repo(state, principal) as repo:
            row = repo.get_file(file_id)
            key, name = row.storage_key, row.filename
        if not state.store.exists(key):
            raise APIError(404, f"content of file '{file_id}' is gone", code="file_not_found")
        chunks: Iterator[bytes] = state.store.iter_chunks(key)
        return Stream(chunks, media_type="application/jsonl",
                      headers={"Content-Disposition": f'attachment; filename="{file_id}.jsonl"',
                               "X-Filename": name.encode("ascii", "replace").decode()})

    @delete("/{file_id:str}", status_code=200, sync_to_thread=True, summary="Delete a file")
    def remove(self, request: Request, principal: Principal, file_id: str) -> dict[str, Any]:  # type: ignore[type-arg]
        state = app_state(request)
        with org_repo(state, principal) as repo:
            row = repo.get_file(file_id)
            key = row.storage_key
            repo.delete_file(row)
        try:
            state.store.delete(key)
        except ObjectNotFound:
            pass
        return {"id": file_id, "object": "file", "deleted": True}
