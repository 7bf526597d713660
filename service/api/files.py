"""``/v1/files``: upload, list, retrieve, content, delete."""

from __future__ import annotations

import contextlib
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
from service.db.repositories import OrgRepository
from service.errors import APIError
from service.files import create_file, ensure_analysis, present_file, upload_hash
from service.idempotency import run_idempotent
from service.jobs.service import validate_model
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
        digest = upload_hash(data.file.filename, data.purpose, stream) if idempotency_key else ""
        upload = data.file

        def create(repo: OrgRepository) -> tuple[str, dict[str, Any]]:
            row = create_file(repo, state.store, state.settings.limits, filename=upload.filename,
                              purpose=data.purpose, stream=stream)
            return row.id, present_file(row)

        body, _ = run_idempotent(state, principal, "files", idempotency_key, digest, create,
                                 lambda repo, object_id: present_file(repo.get_file(object_id)))
        return body

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

    @get("/{file_id:str}/analysis", sync_to_thread=True, summary="A file's dataset analysis")
    def analysis(self, request: Request, principal: Principal, file_id: str,  # type: ignore[type-arg]
                 model: Annotated[str | None, Parameter(max_length=512)] = None) -> dict[str, Any]:
        """Format, counts, estimated tokens, turns, duplicates, preference biases and a recommended method.

        With ``model``, exact token counts for that base model are asked for; they need the model's
        tokenizer, which the API process never loads, so the answer is 501 (the estimate is in ``tokens``).
        """
        state = app_state(request)
        with org_repo(state, principal) as repo:
            row = repo.get_file(file_id)
            if model is not None:
                validate_model(repo, state.settings, model)
                raise APIError(501, f"exact token counts for '{model}' need its tokenizer, which the API "
                               "process does not load; analysis.tokens holds the estimate (ceil(chars/4) "
                               "per message)", code="tokenizer_unavailable", param="model")
            analysis = ensure_analysis(row, state.store, state.settings.limits)
            if analysis is None:
                raise APIError(409, f"file '{file_id}' has no valid example to analyse "
                               f"({row.status_details or row.status})", code="analysis_unavailable")
            return {"object": "file.analysis", "file_id": row.id, **analysis}

    @delete("/{file_id:str}", status_code=200, sync_to_thread=True, summary="Delete a file")
    def remove(self, request: Request, principal: Principal, file_id: str) -> dict[str, Any]:  # type: ignore[type-arg]
        state = app_state(request)
        with org_repo(state, principal) as repo:
            row = repo.get_file(file_id)
            key = row.storage_key
            repo.delete_file(row)
        with contextlib.suppress(ObjectNotFound):  # already gone: delete is idempotent
            state.store.delete(key)
        return {"id": file_id, "object": "file", "deleted": True}
