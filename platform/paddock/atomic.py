"""Files and directories written whole or not at all, and one run at a time per output directory.

Everything paddock writes as state or output (pipeline state, datasets, the rejection-sampling pool, model
directories, the model cache, the Serve config) goes to a temporary sibling first and is renamed into place, so a
kill or a full disk leaves the old version or the whole new one, never half of one; a reader on a shared
``PADDOCK_HOME`` never sees a partial file. ``locked`` makes a second run of the same stage on the same output
directory fail at once, naming the run that holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def writing_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; what was written there replaces ``path`` when the block ends
    without an exception (flushed to disk first), and is removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with writing_file(path) as tmp:
        tmp.write_text(text)


def write_parquet(table: Any, path: str | Path) -> None:
    """``pyarrow.parquet.write_table`` through a temporary file."""
    import pyarrow.parquet as pq

    with writing_file(path) as tmp:
        pq.write_table(table, tmp)


# A stage's sampled data (rejection sampling's scored samples, GAtt's and context distillation's datasets) is
# written with the digest of everything it depends on in the file's metadata: a rerun of the stage after a kill
# (in its fine-tune, say) reads it back instead of sampling again, and anything changed samples again.
KEY = b"paddock.key"


def key_of(parts: Mapping[str, Any]) -> str:
    """The digest of what an output depends on (JSON values; anything else by its ``str``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def write_keyed(table: Any, path: str | Path, key: str, **meta: str) -> None:
    """``write_parquet`` with ``key`` (and ``meta``, read back by ``read_keyed``) in the file's metadata."""
    extra = {KEY: key.encode(), **{f"paddock.{k}".encode(): v.encode() for k, v in meta.items()}}
    write_parquet(table.replace_schema_metadata({**(table.schema.metadata or {}), **extra}), path)


def read_keyed(path: str | Path, key: str, stage: str) -> tuple[Any, dict[str, str]] | None:
    """The table at ``path`` and its ``meta`` when it was written under ``key``; None (saying why) otherwise."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        return None
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    if meta.get(KEY) != key.encode():
        print(f"[{stage}] {path} is from other models, settings or inputs: sampling again", flush=True)
        return None
    print(
        f"[{stage}] reusing {path} ({table.num_rows} rows from an earlier run with the same inputs)",
        flush=True,
    )
    found = {k.decode()[len("paddock.") :]: v.decode() for k, v in meta.items() if k.startswith(b"paddock.")}
    found.pop("key")
    return table, found


@contextlib.contextmanager
def writing_dir(path: str | Path) -> Iterator[Path]:
    """Yields a temporary directory beside ``path``; it takes ``path``'s place when the block ends without an
    exception (the old directory is moved aside, then removed), and is removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        old = _sibling(path, "old")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_dir(src: str | Path, dst: str | Path) -> Path:
    """``dst`` becomes a copy of ``src`` in one rename (``src`` may be inside a checkpoint being cleaned up)."""
    with writing_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return Path(dst)


class LockedError(RuntimeError):
    """Another run holds the output directory."""


class Lock:
    """An exclusive lock on a directory (``.paddock.lock`` in it), held by this process until released."""

    def __init__(self, directory: Path, file: IO[str], previous: str = ""):
        self.directory, self.file = directory, file
        self.previous = previous  # what the last holder noted (``tracking.claim`` reads its run id)

    def note(self, holder: str) -> None:
        """Say who holds it (e.g. the MLflow run id, once known): a refused run prints this."""
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{holder} ({socket.gethostname()}, pid {os.getpid()})\n")
        self.file.flush()


_held: dict[
    Path, Lock
] = {}  # this process's locks: a stage inside a stage (GAtt's fine-tune) shares its lock


@contextlib.contextmanager
def locked(directory: str | Path, what: str) -> Iterator[Lock]:
    """Hold ``directory`` for one run of ``what`` (a stage's name); another process's attempt fails at once with
    ``LockedError`` naming the holder. The lock is the kernel's (``flock``), so a killed holder releases it; within
    one process it is reentrant."""
    directory = Path(directory).resolve()
    if directory in _held:
        yield _held[directory]
        return
    directory.mkdir(parents=True, exist_ok=True)
    file = open(directory / ".paddock.lock", "a+")  # noqa: SIM115 (held open for the lock's life)
    try:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            file.seek(0)
            holder = file.read().strip() or "another process"
            raise LockedError(
                f"{directory} is in use by another run of {what}: {holder}. Wait for it to finish or stop it; "
                "two runs writing one stage's checkpoints and outputs would overwrite each other"
            ) from None
        file.seek(0)
        lock = Lock(directory, file, previous=file.read())
        lock.note(f"{what}, starting")
        _held[directory] = lock
        try:
            yield lock
        finally:
            del _held[directory]
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)
    finally:
        file.close()
