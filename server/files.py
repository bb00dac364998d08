"""Media handles in the OpenAI Files API's shape: a file uploaded once (`POST /v1/files`),
referenced by id in later requests, decoded and preprocessed once.

A handle belongs to the API key that made it (another key, or none, gets a 404, as if it did not
exist); each key has a quota of handles and of bytes, and a handle lives `ttl` seconds (or until
deleted). The store keeps the bytes in memory or, with a directory, in `<id>` and `<id>.json`
files there: a restart then keeps every handle that has not expired (its media decoded again at
first use); without a directory a restart keeps none. The directory is the truth, so servers
that share it (replicas on one volume) serve each other's handles. The prepared media (pixels,
log-mel features) stay in memory while the handle lives. Thread-safe; no HTTP types.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from xllm.model.config import Modality
from xllm.model.preprocess import PreparedMedia
from xllm.server.errors import ServingError

log = logging.getLogger("xllm.server")


@dataclass(frozen=True)
class FileLimits:
    ttl: float | None = 3600.0  # seconds a handle lives; None: until deleted
    max_files: int = 100  # handles per API key
    max_bytes: int = 256 * 2**20  # bytes of uploads per API key
    directory: Path | None = None  # None: in memory only


@dataclass
class StoredFile:
    id: str
    owner: str  # a digest of the API key that made it ("" when the server has no keys)
    filename: str
    purpose: str
    size: int  # bytes
    kind: Modality
    created_at: int  # Unix seconds
    expires_at: int | None
    prepared: PreparedMedia | None = field(default=None, repr=False)  # None: not decoded yet
    data: bytes | None = field(default=None, repr=False)  # in memory (no directory)

    def meta(self) -> dict:
        return {
            "id": self.id,
            "owner": self.owner,
            "filename": self.filename,
            "purpose": self.purpose,
            "size": self.size,
            "kind": self.kind,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
        }


def owner_of(api_key: str | None) -> str:
    """Who a request is, for handle ownership: a digest of its API key (never the key itself,
    which would otherwise sit in the files directory), "" without one."""
    if not api_key:
        return ""
    return hashlib.sha256(api_key.encode()).hexdigest()[:32]


class FileStore:
    def __init__(self, limits: FileLimits, clock: Callable[[], float] = time.time) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._files: dict[str, StoredFile] = {}
        # told the content digests no live handle has any more (the engine unpins their
        # encoder outputs)
        self.on_release: Callable[[list[str]], None] | None = None
        if limits.directory is not None:
            limits.directory.mkdir(parents=True, exist_ok=True)
        self._sync()

    def _sync(self) -> None:
        """With a directory: take in the handles found there (a previous run's, another
        server's), let go of those deleted there; then remove the expired ones."""
        directory = self.limits.directory
        if directory is not None:
            on_disk = {path.name.removesuffix(".json") for path in directory.glob("file-*.json")}
            with self._lock:
                gone = [f for file_id, f in self._files.items() if file_id not in on_disk]
                new = sorted(on_disk - set(self._files))
            self._remove(gone)
            for file_id in new:
                self._load(directory, file_id)
        self.sweep()

    def _load(self, directory: Path, file_id: str) -> StoredFile | None:
        meta_path = directory / f"{file_id}.json"
        try:
            stored = StoredFile(**json.loads(meta_path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            log.warning("unreadable media handle skipped", extra={"path": str(meta_path)})
            return None
        if stored.id != file_id or not (directory / file_id).is_file():
            return None  # being deleted, or not a handle's
        with self._lock:
            return self._files.setdefault(file_id, stored)

    # --- handles ---
    def check_quota(self, owner: str, size: int) -> None:
        """ServingError 429 (insufficient_quota) when one more file of `size` bytes would take
        the owner past its quota."""
        self._sync()
        with self._lock:
            mine = [f for f in self._files.values() if f.owner == owner]
        limits = self.limits
        if len(mine) + 1 > limits.max_files:
            raise ServingError(
                f"this API key holds {len(mine)} files, its quota (--files-max-count "
                f"{limits.max_files}); delete some first",
                429,
                "insufficient_quota",
            )
        used = sum(f.size for f in mine)
        if used + size > limits.max_bytes:
            raise ServingError(
                f"this API key's files would take {used + size} bytes, more than its quota of "
                f"{limits.max_bytes} (--files-max-mb); delete some first",
                429,
                "insufficient_quota",
            )

    def add(
        self,
        owner: str,
        filename: str,
        purpose: str,
        kind: Modality,
        data: bytes,
        prepared: PreparedMedia,
    ) -> StoredFile:
        """Store a new handle (quota checked again, under the lock)."""
        now = self._clock()
        ttl = self.limits.ttl
        stored = StoredFile(
            id=f"file-{uuid.uuid4().hex[:24]}",
            owner=owner,
            filename=filename,
            purpose=purpose,
            size=len(data),
            kind=kind,
            created_at=int(now),
            expires_at=None if ttl is None else int(now + ttl),
            prepared=prepared,
        )
        self.check_quota(owner, stored.size)
        directory = self.limits.directory
        if directory is None:
            stored.data = data
        else:
            (directory / stored.id).write_bytes(data)
            (directory / f"{stored.id}.json").write_text(json.dumps(stored.meta()))
        with self._lock:
            self._files[stored.id] = stored
        return stored

    def get(self, owner: str, file_id: str) -> StoredFile:
        """The owner's live handle; ServingError 404 for any other (missing, expired, deleted,
        another key's: all look the same)."""
        self.sweep()
        with self._lock:
            stored = self._files.get(file_id)
        directory = self.limits.directory
        if directory is not None and _is_handle_id(file_id):  # the directory is the truth
            if stored is None:
                stored = self._load(directory, file_id)
            elif not (directory / file_id).is_file():
                self._remove([stored])
                stored = None
        if stored is None or stored.owner != owner or self._expired(stored):
            raise ServingError(f"no file with id '{file_id}'", 404)
        return stored

    def data(self, stored: StoredFile) -> bytes:
        if stored.data is not None:
            return stored.data
        assert self.limits.directory is not None
        return (self.limits.directory / stored.id).read_bytes()

    def list(self, owner: str) -> list[StoredFile]:
        self._sync()
        with self._lock:
            return sorted(
                (f for f in self._files.values() if f.owner == owner),
                key=lambda f: (f.created_at, f.id),
            )

    def delete(self, owner: str, file_id: str) -> StoredFile:
        stored = self.get(owner, file_id)
        self._remove([stored])
        return stored

    def sweep(self) -> list[StoredFile]:
        """Remove the handles whose time is up; returns them."""
        with self._lock:
            expired = [f for f in self._files.values() if self._expired(f)]
        self._remove(expired)
        return expired

    def _expired(self, stored: StoredFile) -> bool:
        return stored.expires_at is not None and stored.expires_at <= self._clock()

    def _remove(self, files: list[StoredFile]) -> None:
        with self._lock:
            for stored in files:
                self._files.pop(stored.id, None)
            live = {f.prepared.digest for f in self._files.values() if f.prepared is not None}
        released = {f.prepared.digest for f in files if f.prepared is not None} - live
        if released and self.on_release is not None:
            self.on_release(sorted(released))
        directory = self.limits.directory
        if directory is not None:
            for stored in files:
                (directory / stored.id).unlink(missing_ok=True)
                (directory / f"{stored.id}.json").unlink(missing_ok=True)


def _is_handle_id(file_id: str) -> bool:
    """The shape of the ids `add` makes (so that no other name reaches the file system)."""
    return (
        file_id.startswith("file-")
        and len(file_id) == 29
        and all(c in "0123456789abcdef" for c in file_id[5:])
    )
