"""Both object-store backends behave the same: the local directory and S3 (moto's real server).

The S3 parameter starts moto only when an S3 test runs, so ``-k local`` needs no server.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.settings import StorageSettings
from service.storage import (
    LocalStore,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    open_store,
)

pytest_plugins = ["tests.s3_server"]

MiB = 1 << 20


class GeneratedStream:
    """A non-seekable stream of deterministic pseudo-random bytes that is never held whole.

    It records every ``read`` size so tests can prove the store streamed it in bounded chunks,
    and can raise after ``fail_after`` bytes to simulate a client that drops mid-upload.
    """

    def __init__(self, total: int, seed: int = 0, fail_after: int | None = None) -> None:
        self.total = total
        self.fail_after = fail_after
        self.position = 0
        self.read_sizes: list[int] = []
        self.sha256 = hashlib.sha256()
        self._rng = random.Random(seed)
        self._buffer = b""

    def read(self, size: int = -1) -> bytes:
        self.read_sizes.append(size)
        if size is None or size < 0:
            size = self.total - self.position
        size = min(size, self.total - self.position)
        if self.fail_after is not None and self.position + size > self.fail_after:
            raise ConnectionResetError("client went away mid-upload")
        while len(self._buffer) < size:
            self._buffer += self._rng.randbytes(MiB)
        chunk, self._buffer = self._buffer[:size], self._buffer[size:]
        self.position += len(chunk)
        self.sha256.update(chunk)
        return chunk


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "local":
        settings = StorageSettings(url=f"file://{tmp_path / 'objects'}")
    else:
        settings = request.getfixturevalue("s3_settings")
    yield open_store(settings)


def _sha256_of(chunks: Iterator[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def test_open_store_picks_backend(tmp_path: Path, s3_settings: StorageSettings) -> None:
    local = open_store(StorageSettings(url=f"file://{tmp_path}"))
    assert isinstance(local, LocalStore) and local.root == tmp_path.resolve()
    s3 = open_store(s3_settings)
    assert isinstance(s3, S3Store) and s3.bucket == "alignd-test" and s3.prefix.endswith("/")
    for bad in ("ftp://x/y", "file://relative/dir", "s3:///prefix-without-bucket"):
        with pytest.raises(ValueError):
            open_store(StorageSettings(url=bad))


def test_bytes_round_trip(store: ObjectStore) -> None:
    store.put_bytes("files/file-abc", b"hello\nworld\n")
    assert store.exists("files/file-abc")
    assert store.size("files/file-abc") == 12
    assert store.get_bytes("files/file-abc") == b"hello\nworld\n"
    with store.open_read("files/file-abc") as f:
        assert f.read(5) == b"hello"
    assert b"".join(store.iter_chunks("files/file-abc", chunk_size=4)) == b"hello\nworld\n"
    store.put_bytes("files/file-abc", b"replaced")
    assert store.get_bytes("files/file-abc") == b"replaced"
    store.put_bytes("files/empty", b"")
    assert store.size("files/empty") == 0 and store.get_bytes("files/empty") == b""


def test_large_object_is_streamed(store: ObjectStore, tmp_path: Path) -> None:
    total = 20 * MiB + 12345
    stream = GeneratedStream(total, seed=1)
    assert store.put_stream("jobs/ftjob-x/big.bin", stream) == total  # type: ignore[arg-type]
    # Never one read of the whole object: the store pulls bounded chunks.
    assert all(0 < size <= 8 * MiB for size in stream.read_sizes[:-1]), stream.read_sizes
    assert store.size("jobs/ftjob-x/big.bin") == total
    assert _sha256_of(store.iter_chunks("jobs/ftjob-x/big.bin")) == stream.sha256.hexdigest()
    target = tmp_path / "download" / "big.bin"
    store.download_file("jobs/ftjob-x/big.bin", target)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == stream.sha256.hexdigest()
    if isinstance(store, S3Store):  # a multipart upload's ETag ends in "-<number of parts>"
        head = store.client.head_object(Bucket=store.bucket, Key=store.prefix + "jobs/ftjob-x/big.bin")
        assert head["ETag"].strip('"').endswith("-3"), head["ETag"]


def test_put_file_and_download_file(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "train.jsonl"
    source.write_bytes(b'{"prompt": "a", "completion": "b"}\n' * 100)
    store.put_file("files/file-1", source)
    target = tmp_path / "out" / "nested" / "train.jsonl"
    store.download_file("files/file-1", target)
    assert target.read_bytes() == source.read_bytes()


def test_list_by_prefix(store: ObjectStore) -> None:
    for key in ("jobs/ftjob-1/step_10/a", "jobs/ftjob-1/step_20/a", "jobs/ftjob-10/b", "files/f"):
        store.put_bytes(key, key.encode())
    assert store.list("jobs/ftjob-1/") == ["jobs/ftjob-1/step_10/a", "jobs/ftjob-1/step_20/a"]
    assert store.list("jobs/ftjob-1") == [
        "jobs/ftjob-1/step_10/a",
        "jobs/ftjob-1/step_20/a",
        "jobs/ftjob-10/b",
    ]
    assert store.list("jobs/ftjob-1/step_") == ["jobs/ftjob-1/step_10/a", "jobs/ftjob-1/step_20/a"]
    assert store.list("") == sorted(
        ["files/f", "jobs/ftjob-1/step_10/a", "jobs/ftjob-1/step_20/a", "jobs/ftjob-10/b"]
    )
    assert store.list("nothing/here/") == []


def test_upload_dir_download_prefix_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "adapter"
    files = {
        "adapter_config.json": b'{"r": 8}',
        "adapter_model.safetensors": bytes(range(256)) * 1000,
        "tokenizer/vocab.json": b"{}",
        "tokenizer/deeper/merges.txt": b"a b\n",
    }
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    keys = store.upload_dir(src, "jobs/ftjob-x/step_10")
    assert sorted(keys) == sorted(f"jobs/ftjob-x/step_10/{rel}" for rel in files)
    store.put_bytes("jobs/ftjob-x/step_100/other", b"sibling with a longer name")

    dest = tmp_path / "restored"
    store.download_prefix("jobs/ftjob-x/step_10/", dest)
    restored = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert restored == files

    with pytest.raises(ObjectNotFound):
        store.download_prefix("jobs/ftjob-x/step_999", tmp_path / "none")


def test_delete_is_idempotent(store: ObjectStore) -> None:
    store.put_bytes("files/file-1", b"x")
    store.delete("files/file-1")
    assert not store.exists("files/file-1")
    store.delete("files/file-1")
    store.delete("never/existed")


def test_delete_prefix_stays_in_its_directory(store: ObjectStore) -> None:
    for key in ("jobs/ftjob-1/a", "jobs/ftjob-1/deep/b", "jobs/ftjob-10/c"):
        store.put_bytes(key, b"x")
    store.delete_prefix("jobs/ftjob-1")
    assert store.list("jobs/") == ["jobs/ftjob-10/c"]
    store.delete_prefix("jobs/ftjob-1/")  # again: nothing left, no error
    with pytest.raises(ValueError):
        store.delete_prefix("")


def test_missing_key_raises_object_not_found(store: ObjectStore, tmp_path: Path) -> None:
    key = "files/missing"
    assert not store.exists(key)
    for call in (
        lambda: store.get_bytes(key),
        lambda: store.size(key),
        lambda: store.open_read(key),
        lambda: store.iter_chunks(key),  # raises on the call, before a response would start
        lambda: store.download_file(key, tmp_path / "x"),
    ):
        with pytest.raises(ObjectNotFound) as info:
            call()
        assert isinstance(info.value, KeyError) and info.value.key == key
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "key",
    ["", "../x", "/etc/passwd", "a/../../b", "a/./b", "a//b", "a/", "a\\..\\b", "a\x00b", "..", "."],
)
def test_unsafe_keys_are_rejected(store: ObjectStore, key: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        store.get_bytes(key)
    with pytest.raises(ValueError):
        store.exists(key)
    with pytest.raises(ValueError):
        store.delete(key)


@pytest.mark.parametrize("prefix", ["../", "/etc/", "a/../../", "a\\b"])
def test_unsafe_prefixes_are_rejected(store: ObjectStore, prefix: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        store.list(prefix)
    with pytest.raises(ValueError):
        store.delete_prefix(prefix)
    with pytest.raises(ValueError):
        store.upload_dir(tmp_path, prefix)


def test_failed_stream_leaves_no_object(store: ObjectStore) -> None:
    with pytest.raises(ConnectionResetError):
        store.put_stream("files/partial", GeneratedStream(20 * MiB, fail_after=10 * MiB))  # type: ignore[arg-type]
    assert not store.exists("files/partial")
    assert store.list("") == []
    if isinstance(store, S3Store):  # the multipart upload was aborted, not left dangling
        uploads = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix)
        assert uploads.get("Uploads", []) == []

    store.put_bytes("files/kept", b"old content")
    with pytest.raises(ConnectionResetError):
        store.put_stream("files/kept", GeneratedStream(3 * MiB, fail_after=2 * MiB))  # type: ignore[arg-type]
    assert store.get_bytes("files/kept") == b"old content"


def test_local_failed_put_cleans_staging(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    with pytest.raises(ConnectionResetError):
        store.put_stream("files/partial", GeneratedStream(3 * MiB, fail_after=MiB + 1))  # type: ignore[arg-type]
    leftovers = [p for p in (tmp_path / "objects").rglob("*") if p.is_file()]
    assert leftovers == []


def test_local_symlink_escape_is_rejected(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    root = tmp_path / "objects"
    root.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    store = LocalStore(root)
    with pytest.raises(ValueError):
        store.get_bytes("link/secret")
    with pytest.raises(ValueError):
        store.put_bytes("link/new", b"x")
    assert not (outside / "new").exists()


def test_local_reserved_staging_name(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(ValueError):
        store.put_bytes(".alignd-staging/x", b"x")
    store.put_bytes("a/b", b"x")
    assert store.list("") == ["a/b"]  # the staging directory is never listed
