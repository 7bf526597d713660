"""Archives in the object store: where a job's checkpoints and result live, and ``.tar.gz`` in and out.

An archive's files sit at its top level, so extracting one gives a directory that
``peft.PeftModel.from_pretrained`` (or ``from_pretrained`` for a full fine-tune) loads directly. Keys
carry the claim's attempt number, so a worker that lost its job never overwrites the current
attempt's objects (see ``workers.checkpoints``).
"""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.storage import ObjectStore

STATE_FILE = "training_state.pt"


def checkpoint_key(job_id: str, step: int, *, attempt: int) -> str:
    return f"jobs/{job_id}/attempt_{attempt}/step_{step}/adapter.tar.gz"


def final_adapter_key(job_id: str, *, attempt: int) -> str:
    return f"jobs/{job_id}/attempt_{attempt}/adapter.tar.gz"


#: gzip level of every archive: 0, stored blocks (still a valid ``.tar.gz`` for every reader, downloads
#: included). Weights and optimizer state barely compress (level 9 saves ~7 % on fp32 weights), but
#: deflating them dominated checkpointing: of a 75 s two-step full fine-tune of a 135M model, 57 s went
#: into compressing its checkpoint at the default level 9, 49 s at level 1 and ~2 s at level 0
#: (``bench/memory_estimate.py --cases sft:full``). That time sits between two steps of a real job too.
COMPRESSLEVEL = 0


def archive_dir(directory: Path, archive: Path) -> Path:
    """Files at the archive's top level, so extracting gives a directory peft loads directly."""
    with tarfile.open(archive, "w:gz", compresslevel=COMPRESSLEVEL) as tar:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(directory)))
    return archive


def store_dir_archive(store: ObjectStore, directory: Path, key: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        archive = archive_dir(directory, Path(tmp) / "adapter.tar.gz")
        store.put_file(key, archive)
    return key


def extract_archive(archive: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(target, filter="data")
    return target


def fetch_adapter(store: ObjectStore, key: str, target: Path) -> Path:
    """The archive at ``key`` extracted into ``target`` (an adapter or a full model directory)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "adapter.tar.gz"
        store.download_file(key, local)
        return extract_archive(local, target)
