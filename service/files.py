"""Uploaded datasets: validate while streaming, store by id, present OpenAI's file object."""

from __future__ import annotations

import hashlib
from typing import IO, Any

from service.datasets.analysis import analyze_jsonl
from service.datasets.validation import ValidationReport, validate_jsonl
from service.db.models import File, new_id
from service.db.repositories import OrgRepository
from service.errors import APIError
from service.settings import LimitSettings
from service.storage import ObjectStore

PURPOSES = ("fine-tune",)
_CHUNK = 1 << 20


def file_storage_key(file_id: str) -> str:
    """Derived from the id only: a user-supplied filename never reaches a storage path."""
    return f"files/{file_id}.jsonl"


def present_file(f: File) -> dict[str, Any]:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": int(f.created_at),
        "filename": f.filename,
        "purpose": f.purpose,
        "status": f.status,
        "status_details": f.status_details,
        "format": f.kind,
        "examples": f.n_examples,
        "analysis": file_analysis(f),
    }


def file_analysis(f: File) -> dict[str, Any] | None:
    """Kept in the ``validation`` JSON column under ``analysis`` (see service/datasets/analysis.py)."""
    return (f.validation or {}).get("analysis")


def _chunks(stream: IO[bytes]) -> Any:
    while chunk := stream.read(_CHUNK):
        yield chunk


def upload_hash(filename: str, purpose: str, stream: IO[bytes]) -> str:
    digest = hashlib.sha256(f"{filename}\0{purpose}\0".encode())
    for chunk in _chunks(stream):
        digest.update(chunk)
    stream.seek(0)
    return digest.hexdigest()


def create_file(repo: OrgRepository, store: ObjectStore, limits: LimitSettings, *, filename: str,
                purpose: str, stream: IO[bytes]) -> File:
    if purpose not in PURPOSES:
        raise APIError(400, f"purpose must be one of {', '.join(PURPOSES)}", code="invalid_purpose",
                       param="purpose")
    safe_name = (filename or "upload.jsonl").replace("\x00", "")[-255:]
    report: ValidationReport = validate_jsonl(_chunks(stream), max_line_bytes=limits.max_line_bytes,
                                              max_depth=limits.max_json_depth)
    stream.seek(0)
    validation = report.to_dict()
    if report.kind is not None:
        validation["analysis"] = analyze_jsonl(_chunks(stream), kind=report.kind.value,
                                               variant=report.variant, max_line_bytes=limits.max_line_bytes,
                                               max_depth=limits.max_json_depth)
        stream.seek(0)
    file_id = new_id("file")
    key = file_storage_key(file_id)
    size = store.put_stream(key, stream)
    if size > limits.max_upload_bytes:
        store.delete(key)
        raise APIError(413, f"file is {size} bytes; the limit is {limits.max_upload_bytes}",
                       code="file_too_large", param="file")
    row = File(
        id=file_id, organization_id=repo.org, filename=safe_name, purpose=purpose, bytes=size,
        status="processed" if report.ok else "error", status_details=report.status_details(),
        kind=report.kind.value if report.kind else None, n_examples=report.n_examples,
        validation=validation, storage_key=key,
    )
    repo.add(row)
    return row


def ensure_analysis(row: File, store: ObjectStore, limits: LimitSettings) -> dict[str, Any] | None:
    """The file's analysis; computed from the stored content (and kept) for files stored before analysis."""
    found = file_analysis(row)
    if found is not None or not row.kind:
        return found
    variant = (row.validation or {}).get("variant")
    analysis = analyze_jsonl(store.iter_chunks(row.storage_key), kind=row.kind, variant=variant,
                             max_line_bytes=limits.max_line_bytes, max_depth=limits.max_json_depth)
    row.validation = {**(row.validation or {}), "analysis": analysis}
    return analysis
