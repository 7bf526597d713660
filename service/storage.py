"""Object storage for datasets, checkpoints and adapters: one small interface, two backends.

* ``LocalStore`` — a directory (the embedded default, ``file:///abs/dir``).
* ``S3Store`` — a bucket and key prefix (``s3://bucket/prefix``; MinIO or moto through
  ``s3_endpoint_url``). Credentials come from the standard AWS environment / config chain.

The API and the workers share this module, so it imports neither torch nor anything heavy.

Design points:

* Keys are built by the service from ids (``files/file-abc``,
  ``jobs/ftjob-x/step_10/adapter.tar.gz``), but every key is still validated: a bug or a hostile
  id must never become a path outside the store root. Invalid keys raise ``ValueError``.
* Objects are streamed in bounded chunks in both directions; uploads of datasets and downloads of
  checkpoints can be larger than the API process should hold in memory.
* Writes are atomic: a reader sees the old object or the whole new one, never a prefix of it
  (local: temp file + ``os.replace``; S3: a multipart upload only becomes visible on completion
  and is aborted on failure).
* A missing object raises ``ObjectNotFound`` (a ``KeyError``) in both backends, so callers can
  map it to a 404 without knowing which backend is configured.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, cast, runtime_checkable
from urllib.parse import unquote, urlparse

from service.settings import StorageSettings

__all__ = ["LocalStore", "ObjectNotFound", "ObjectStore", "S3Store", "open_store", "validate_key"]

CHUNK_SIZE = 1 << 20
# Objects at least this large go to S3 as multipart uploads: parts are retried individually and
# only ``MULTIPART_CHUNKSIZE * MAX_CONCURRENCY`` bytes are buffered at once.
MULTIPART_THRESHOLD = 8 << 20
MULTIPART_CHUNKSIZE = 8 << 20
MAX_CONCURRENCY = 4
# Top-level directory of a LocalStore that holds in-flight writes. It lives under the root so that
# ``os.replace`` never crosses a filesystem boundary, and keys may not start with it.
_STAGING = ".alignd-staging"


class ObjectNotFound(KeyError):
    """The key names no object. A ``KeyError`` so ``except KeyError`` callers keep working."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:  # KeyError's str() is repr(key); a message reads better in logs
        return f"object not found: {self.key}"


@runtime_checkable
class ObjectStore(Protocol):
    """What the service and workers need from object storage, and nothing more.

    (Annotations say ``builtins.list`` because the ``list`` method shadows the builtin in class
    bodies.)
    """

    def put_stream(self, key: str, stream: IO[bytes]) -> int:
        """Store everything ``stream.read()`` yields under ``key``; return the number of bytes."""
        ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def put_file(self, key: str, path: Path) -> None: ...

    def open_read(self, key: str) -> BinaryIO:
        """A readable binary stream (also a context manager); the caller closes it."""
        ...

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Chunks of the object, for streaming HTTP responses.

        Raises ``ObjectNotFound`` on the call itself (not on first iteration), so a handler can
        answer 404 before it starts a 200 response.
        """
        ...

    def get_bytes(self, key: str) -> bytes: ...

    def download_file(self, key: str, path: Path) -> None: ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error (retries are safe)."""
        ...

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under the directory ``prefix`` (``a/b`` means ``a/b/…``)."""
        ...

    def list(self, prefix: str) -> builtins.list[str]:
        """Sorted keys (relative to the store root) that start with the string ``prefix``."""
        ...

    def upload_dir(self, local_dir: Path, prefix: str) -> builtins.list[str]:
        """Store every file below ``local_dir`` under the directory ``prefix``; return the keys."""
        ...

    def download_prefix(self, prefix: str, local_dir: Path) -> None:
        """Recreate the directory ``prefix`` under ``local_dir``; ``ObjectNotFound`` if empty."""
        ...


# --------------------------------------------------------------------------------------------
# Key validation


def _check_text(value: str, what: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, not {type(value).__name__}")
    if "\x00" in value or "\\" in value:
        raise ValueError(f"{what} {value!r} contains a NUL or a backslash")
    if value.startswith("/"):
        raise ValueError(f"{what} {value!r} is absolute")


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise ``ValueError``.

    Segments must be non-empty and neither ``.`` nor ``..``: that rules out traversal, absolute
    paths and ambiguous spellings (``a//b``, ``a/``) that S3 and a filesystem would treat
    differently.
    """
    _check_text(key, "key")
    if not key:
        raise ValueError("key is empty")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"key {key!r} has an empty, '.' or '..' segment")
    if parts[0] == _STAGING:
        raise ValueError(f"key {key!r} uses the reserved name {_STAGING!r}")
    return key


def _validate_prefix(prefix: str) -> str:
    """A string prefix for ``list``: like a key, but may be empty or end with ``/``."""
    _check_text(prefix, "prefix")
    if prefix:
        validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def _dir_prefix(prefix: str) -> str:
    """Directory form of a non-empty prefix: ``a/b`` and ``a/b/`` both mean ``a/b/``.

    Directory operations never use a bare string prefix, so ``jobs/ftjob-1`` cannot also hit
    ``jobs/ftjob-10``; an empty prefix is refused so that no call can wipe the whole store.
    """
    _validate_prefix(prefix)
    stripped = prefix.rstrip("/")
    if not stripped:
        raise ValueError("prefix is empty; refusing to operate on the whole store")
    return stripped + "/"


def _local_files(local_dir: Path) -> list[tuple[Path, str]]:
    """Files below ``local_dir`` with their relative POSIX paths, validated as key tails."""
    if not local_dir.is_dir():
        raise NotADirectoryError(local_dir)
    files = []
    for path in sorted(local_dir.rglob("*")):
        if path.is_file():
            rel = path.relative_to(local_dir).as_posix()
            files.append((path, validate_key(rel)))
    return files


def _upload_dir(store: ObjectStore, local_dir: Path, prefix: str) -> list[str]:
    base = _dir_prefix(prefix)
    keys = []
    for path, rel in _local_files(Path(local_dir)):
        store.put_file(base + rel, path)
        keys.append(base + rel)
    return keys


def _download_prefix(store: ObjectStore, prefix: str, local_dir: Path) -> None:
    """Empty is an error: a resume that finds no checkpoint files should fail here, clearly."""
    base = _dir_prefix(prefix)
    keys = store.list(base)
    if not keys:
        raise ObjectNotFound(base)
    for key in keys:
        store.download_file(key, Path(local_dir).joinpath(*key[len(base) :].split("/")))


def _copy_to_file(stream: IO[bytes], dest: Path, chunk_size: int = CHUNK_SIZE) -> int:
    """Copy ``stream`` into ``dest`` via a temp file beside it, so ``dest`` is never partial."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            written = _copy(stream, out, chunk_size)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written


def _copy(stream: IO[bytes], out: IO[bytes], chunk_size: int) -> int:
    written = 0
    while chunk := stream.read(chunk_size):
        out.write(chunk)
        written += len(chunk)
    return written


# --------------------------------------------------------------------------------------------
# Local directory


class LocalStore:
    """Objects as files below ``root``; directories are created on demand."""

    def __init__(self, root: Path) -> None:
        # Resolved once so the containment check below compares real paths.
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        validate_key(key)
        path = self.root.joinpath(*key.split("/"))
        # Validation already excludes '..'; this catches symlinks inside the root that lead out.
        if not path.resolve().is_relative_to(self.root):
            raise ValueError(f"key {key!r} resolves outside the store root")
        return path

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path

    # writes ------------------------------------------------------------------------------

    def put_stream(self, key: str, stream: IO[bytes]) -> int:
        """Write to a staging file, fsync it, then ``os.replace`` it into place.

        The staging directory sits under the root (same filesystem, so the rename is atomic) and
        outside every key, so a half-written object is never listed or read, and a crash leaves
        garbage only there.
        """
        dest = self._path(key)
        staging = self.root / _STAGING
        staging.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=staging, prefix="put-", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                written = _copy(stream, out, CHUNK_SIZE)
                out.flush()
                os.fsync(out.fileno())
            self._commit(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return written

    def _commit(self, tmp: Path, dest: Path) -> None:
        # A concurrent delete may prune the (momentarily empty) parent between mkdir and replace.
        for attempt in range(3):
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(tmp, dest)
                return
            except FileNotFoundError:
                if attempt == 2 or not tmp.exists():
                    raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self.put_stream(key, io.BytesIO(data))

    def put_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as f:
            self.put_stream(key, f)

    def upload_dir(self, local_dir: Path, prefix: str) -> builtins.list[str]:
        return _upload_dir(self, local_dir, prefix)

    # reads -------------------------------------------------------------------------------

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        return _iter_stream(self.open_read(key), chunk_size)

    def get_bytes(self, key: str) -> bytes:
        with self.open_read(key) as f:
            return f.read()

    def download_file(self, key: str, path: Path) -> None:
        with self.open_read(key) as f:
            _copy_to_file(f, Path(path))

    def download_prefix(self, prefix: str, local_dir: Path) -> None:
        _download_prefix(self, prefix, local_dir)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._existing(key).stat().st_size

    def list(self, prefix: str) -> builtins.list[str]:
        _validate_prefix(prefix)
        # Walk only the deepest directory the prefix names, then filter by the string prefix.
        dir_part = prefix.rpartition("/")[0]
        base = self._path(dir_part) if dir_part else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            current = Path(dirpath)
            if current == self.root:
                dirnames[:] = [d for d in dirnames if d != _STAGING]
            rel_dir = current.relative_to(self.root).as_posix()
            for name in filenames:
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    # deletes -----------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
            path.unlink()
            self._prune(path.parent)

    def delete_prefix(self, prefix: str) -> None:
        base = _dir_prefix(prefix)
        for key in self.list(base):
            self.delete(key)

    def _prune(self, directory: Path) -> None:
        """Remove now-empty parent directories so deleted jobs leave no trail of empty dirs."""
        while directory != self.root and directory.is_relative_to(self.root):
            try:
                directory.rmdir()
            except OSError:  # not empty, already gone, or raced with a writer: stop here
                return
            directory = directory.parent


def _iter_stream(stream: IO[bytes], chunk_size: int) -> Iterator[bytes]:
    """Yield chunks and close the stream even if the consumer stops early (client hang-up)."""
    try:
        while chunk := stream.read(chunk_size):
            yield chunk
    finally:
        stream.close()


# --------------------------------------------------------------------------------------------
# S3


_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})


class _CountingReader:
    """Counts the bytes ``upload_fileobj`` pulls from a stream.

    It exposes only ``read`` on purpose: s3transfer then treats the stream as non-seekable and
    reads it part by part, so memory stays bounded however large the object is.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.count += len(data)
        return data


class S3Store:
    """Objects as ``s3://bucket/prefix/<key>``."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if not bucket:
            raise ValueError("S3 bucket name is empty")
        stripped = prefix.strip("/")
        if stripped:
            validate_key(stripped)
        self.bucket = bucket
        self.prefix = stripped + "/" if stripped else ""
        self.endpoint_url = endpoint_url
        session = boto3.session.Session()
        self.client: Any = session.client(
            "s3",
            region_name=session.region_name or "us-east-1",
            endpoint_url=endpoint_url,
            config=Config(
                retries={"max_attempts": 5, "mode": "standard"},
                # MinIO and moto serve buckets by path, not by virtual host name.
                s3={"addressing_style": "path"} if endpoint_url else None,
            ),
        )
        self._transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_CHUNKSIZE,
            max_concurrency=MAX_CONCURRENCY,
            preferred_transfer_client="classic",
        )
        self._bucket_ready = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store(s3://{self.bucket}/{self.prefix}, endpoint_url={self.endpoint_url!r})"

    def _key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _ensure_bucket(self) -> None:
        """Create the bucket on first use (MinIO / moto set-ups); at most one check per store.

        A 403 on ``HeadBucket`` means the bucket exists but the credentials may only touch
        objects, which is fine: object calls will report any real permission problem.
        """
        if self._bucket_ready:
            return
        from botocore.exceptions import ClientError

        with self._lock:
            if self._bucket_ready:
                return
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                code = _error_code(exc)
                if code in ("404", "NoSuchBucket", "NotFound"):
                    self._create_bucket()
                elif code not in ("403", "AccessDenied"):
                    raise
            self._bucket_ready = True

    def _create_bucket(self) -> None:
        from botocore.exceptions import ClientError

        region = self.client.meta.region_name
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(**kwargs)
        except ClientError as exc:
            if _error_code(exc) != "BucketAlreadyOwnedByYou":  # a concurrent first use won
                raise

    @contextlib.contextmanager
    def _not_found_as(self, key: str) -> Iterator[None]:
        from botocore.exceptions import ClientError

        try:
            yield
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                raise ObjectNotFound(key) from None
            raise

    # writes ------------------------------------------------------------------------------

    def put_stream(self, key: str, stream: IO[bytes]) -> int:
        """Upload with ``upload_fileobj``: multipart above 8 MiB, aborted if the stream fails."""
        full = self._key(key)
        self._ensure_bucket()
        reader = _CountingReader(stream)
        self.client.upload_fileobj(reader, self.bucket, full, Config=self._transfer)
        return reader.count

    def put_bytes(self, key: str, data: bytes) -> None:
        full = self._key(key)
        self._ensure_bucket()
        self.client.put_object(Bucket=self.bucket, Key=full, Body=data)

    def put_file(self, key: str, path: Path) -> None:
        full = self._key(key)
        self._ensure_bucket()
        self.client.upload_file(str(path), self.bucket, full, Config=self._transfer)

    def upload_dir(self, local_dir: Path, prefix: str) -> builtins.list[str]:
        return _upload_dir(self, local_dir, prefix)

    # reads -------------------------------------------------------------------------------

    def open_read(self, key: str) -> BinaryIO:
        full = self._key(key)
        self._ensure_bucket()
        with self._not_found_as(key):
            response = self.client.get_object(Bucket=self.bucket, Key=full)
        # botocore's StreamingBody is an io.IOBase: readable, closeable, a context manager.
        return cast(BinaryIO, response["Body"])

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        return _iter_stream(self.open_read(key), chunk_size)

    def get_bytes(self, key: str) -> bytes:
        with self.open_read(key) as body:
            return body.read()

    def download_file(self, key: str, path: Path) -> None:
        """s3transfer writes to a temp name and renames, so ``path`` is never left partial."""
        full = self._key(key)
        self._ensure_bucket()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._not_found_as(key):
            self.client.download_file(self.bucket, full, str(path), Config=self._transfer)

    def download_prefix(self, prefix: str, local_dir: Path) -> None:
        _download_prefix(self, prefix, local_dir)

    def _head(self, key: str) -> dict[str, Any]:
        full = self._key(key)
        self._ensure_bucket()
        with self._not_found_as(key):
            return cast(dict[str, Any], self.client.head_object(Bucket=self.bucket, Key=full))

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def list(self, prefix: str) -> builtins.list[str]:
        _validate_prefix(prefix)
        self._ensure_bucket()
        paginator = self.client.get_paginator("list_objects_v2")
        keys = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            for item in page.get("Contents", ()):
                keys.append(item["Key"][len(self.prefix) :])
        return sorted(keys)

    # deletes -----------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        full = self._key(key)
        self._ensure_bucket()
        self.client.delete_object(Bucket=self.bucket, Key=full)  # S3 deletes are idempotent

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list(_dir_prefix(prefix))
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self.prefix + key} for key in keys[start : start + 1000]]
            response = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
            )
            if errors := response.get("Errors"):
                first = errors[0]
                raise OSError(f"S3 delete of {first.get('Key')} failed: {first.get('Message')}")


def _error_code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


# --------------------------------------------------------------------------------------------


def open_store(settings: StorageSettings) -> ObjectStore:
    """Build the store that ``settings.url`` names: ``file:///abs/dir`` or ``s3://bucket/prefix``."""
    url = settings.url
    if url.startswith("file://"):
        path = Path(unquote(url[len("file://") :]))
        if not path.is_absolute():
            raise ValueError(f"storage URL {url!r} must name an absolute directory (file:///dir)")
        return LocalStore(path)
    if url.startswith("s3://"):
        parsed = urlparse(url)
        if not parsed.netloc:
            raise ValueError(f"storage URL {url!r} names no bucket")
        return S3Store(parsed.netloc, unquote(parsed.path), endpoint_url=settings.s3_endpoint_url)
    raise ValueError(f"storage URL {url!r} is neither file:// nor s3://")
