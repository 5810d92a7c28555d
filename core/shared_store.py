"""Storage that every host and the API share (STORAGE_URL): a shared folder or an S3-compatible
bucket, through fsspec (s3fs for `s3://`), so one code path serves both.

Each host trains in its own DATA_DIR as it always has; what a job makes is published here too,
and read from here by whichever host needs it next:

    <STORAGE_URL>/jobs/<job id>/checkpoints/<name>/...        the checkpoint's files
    <STORAGE_URL>/jobs/<job id>/checkpoints/<name>.manifest.json
    <STORAGE_URL>/files/<file id>.<ext>                         uploaded datasets

A checkpoint is committed by its manifest, written last and in one piece (one PUT on S3, a rename
on a shared folder): names, sizes and sha256 of every file, computed while they were copied. No
manifest, no checkpoint: a copy cut short by a crash or an unreachable store is never resumed
from or served, and the next publish of the same name removes the old manifest before a byte of
the new copy is written. Removal goes the other way: the manifest first.

Every operation retries (STORAGE_RETRIES, waits doubling from STORAGE_RETRY_WAIT_S) and then
raises StorageUnavailable with the figures, which a trainer turns into `storage_unavailable`."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, BinaryIO, TypeVar

from core.config import get_settings
from core.folders import folder_files

logger = logging.getLogger(__name__)

CHUNK_BYTES = 8 * 1024 * 1024
MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = 1
FETCH_PREFIX = ".partial-fetch-"  # a download into DATA_DIR, renamed when every file checked out
# Held (flock) by the rank of a host that downloads a checkpoint; the host's other ranks wait on it.
FETCH_LOCK = ".fetch.lock"
MAX_RETRY_WAIT_S = 60.0
_STEP_RE = re.compile(r"^checkpoint-(\d+)$")
T = TypeVar("T")


class StorageUnavailable(Exception):
    """The store did not answer (or kept failing) through every retry."""

    def __init__(self, what: str, attempts: int, seconds: float, cause: BaseException, url: str) -> None:
        detail = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"
        super().__init__(
            f"the shared store {url} could not {what}: {attempts} attempts over {seconds:.1f} s, the last "
            f"failing with {detail.rstrip(': ')}"
        )
        self.what, self.attempts, self.seconds, self.url = what, attempts, seconds, url


class StoreMismatch(Exception):
    """A file read back from the store does not match its manifest (size or sha256)."""


@dataclass(frozen=True)
class Manifest:
    job_id: int
    name: str
    step: int
    files: list[dict[str, Any]]  # path, size, sha256
    published_at: str

    @property
    def size_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files)

    def entry(self, path: str) -> dict[str, Any] | None:
        return next((f for f in self.files if f["path"] == path), None)

    def to_json(self) -> bytes:
        body = {"format": MANIFEST_FORMAT, **self.__dict__}
        return json.dumps(body, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        body = json.loads(data)
        return cls(
            job_id=int(body["job_id"]),
            name=str(body["name"]),
            step=int(body["step"]),
            files=list(body["files"]),
            published_at=str(body["published_at"]),
        )


def manifest_step(name: str) -> int | None:
    match = _STEP_RE.match(name)
    return int(match.group(1)) if match else None


class SharedStore:
    def __init__(self, url: str, *, retries: int, retry_wait_s: float) -> None:
        import fsspec

        self.url = url.rstrip("/")
        options: dict[str, Any] = {}
        if self.url.startswith(("s3://", "s3a://")):
            # Fail over to our retries quickly rather than botocore's 60 s connect timeout.
            options["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2}}
            # One client per store (get_store keeps one a process): fsspec's cache of instances
            # would hand back one made for other AWS_* variables.
            options["skip_instance_cache"] = True
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.retries = retries
        self.retry_wait_s = retry_wait_s

    # ---- keys ---------------------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def checkpoints_key(self, job_id: int) -> str:
        return self.key("jobs", str(job_id), "checkpoints")

    def checkpoint_key(self, job_id: int, name: str) -> str:
        return posixpath.join(self.checkpoints_key(job_id), name)

    def manifest_key(self, job_id: int, name: str) -> str:
        return self.checkpoint_key(job_id, name) + MANIFEST_SUFFIX

    def file_key(self, job_id: int, name: str, path: str) -> str:
        return posixpath.join(self.checkpoint_key(job_id, name), path)

    def upload_key(self, filename: str) -> str:
        return self.key("files", filename)

    # ---- retries ------------------------------------------------------------------------------

    def retrying(self, what: str, operation: Callable[[], T]) -> T:
        """`operation`, tried STORAGE_RETRIES times with doubling waits; StorageUnavailable after.
        A mismatch or a missing file is an answer, not an outage: raised at once."""
        started = time.monotonic()
        wait = self.retry_wait_s
        for attempt in range(1, self.retries + 1):
            try:
                return operation()
            except (StoreMismatch, FileNotFoundError):
                raise
            except Exception as exc:  # the store's client raises its own kinds (botocore, aiohttp, OSError)
                if attempt == self.retries:
                    raise StorageUnavailable(what, attempt, time.monotonic() - started, exc, self.url) from exc
                logger.warning(
                    "shared store: could not %s (attempt %d of %d: %s); again in %.1f s",
                    what,
                    attempt,
                    self.retries,
                    exc,
                    wait,
                )
                time.sleep(wait)
                wait = min(wait * 2, MAX_RETRY_WAIT_S)
        raise AssertionError("unreachable")

    # ---- low-level ----------------------------------------------------------------------------

    def _write_atomic(self, key: str, data: bytes) -> None:
        """The whole object or none of it: one PUT on S3; on a folder a rename after fsync."""
        if not self.local:
            self.fs.pipe_file(key, data)
            return
        path = Path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        fsync_path(path.parent)

    def _copy_up(self, source: Path, key: str) -> tuple[int, str]:
        """Copy a local file to `key`, hashing it on the way: (size, sha256)."""
        digest, size = hashlib.sha256(), 0
        if self.local:
            Path(key).parent.mkdir(parents=True, exist_ok=True)
            opened: IO[bytes] = open(key, "wb")  # noqa: SIM115 (closed by the with below)
        else:
            opened = self.fs.open(key, "wb", block_size=CHUNK_BYTES)
        with open(source, "rb") as src, opened as dst:
            while chunk := src.read(CHUNK_BYTES):
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
            if self.local:
                dst.flush()
                os.fsync(dst.fileno())
        return size, digest.hexdigest()

    def _copy_down(self, key: str, target: Path, size: int, sha256: str | None) -> None:
        digest, got = hashlib.sha256(), 0
        target.parent.mkdir(parents=True, exist_ok=True)
        with self.open_read(key) as src, open(target, "wb") as dst:
            while chunk := src.read(CHUNK_BYTES):
                digest.update(chunk)
                dst.write(chunk)
                got += len(chunk)
        if got != size or (sha256 is not None and digest.hexdigest() != sha256):
            raise StoreMismatch(f"{key}: {got} bytes read, sha256 {digest.hexdigest()}; its manifest says {size} bytes")

    def open_read(self, key: str) -> BinaryIO:
        """A file of the store, for reading (seekable): each read of the S3 object is one ranged
        GET of what was asked (no read-ahead cache of its own: the callers read big chunks)."""
        if self.local:
            return open(key, "rb")
        return self.fs.open(key, "rb", block_size=CHUNK_BYTES, cache_type="none")  # type: ignore[no-any-return]

    # ---- checkpoints --------------------------------------------------------------------------

    def publish_checkpoint(self, job_id: int, folder: Path, step: int) -> Manifest:
        """Copy a complete local checkpoint folder to the store, then commit it with its manifest."""
        name = folder.name
        files = folder_files(folder)

        def publish() -> Manifest:
            self._remove_manifest(job_id, name)  # the old copy of this name is not committed any more
            entries = []
            for path, _size in files:
                size, sha256 = self._copy_up(folder / path, self.file_key(job_id, name, path))
                entries.append({"path": path, "size": size, "sha256": sha256})
            manifest = Manifest(job_id, name, step, entries, datetime.now(UTC).isoformat())
            self._write_atomic(self.manifest_key(job_id, name), manifest.to_json())
            return manifest

        manifest = self.retrying(f"publish {name} of job {job_id}", publish)
        logger.info("job %s: %s published to %s (%d bytes)", job_id, name, self.url, manifest.size_bytes)
        return manifest

    def _remove_manifest(self, job_id: int, name: str) -> None:
        key = self.manifest_key(job_id, name)
        if self.fs.exists(key):
            self.fs.rm_file(key)

    def manifest(self, job_id: int, name: str) -> Manifest | None:
        def read() -> Manifest | None:
            try:
                return Manifest.from_json(self.fs.cat_file(self.manifest_key(job_id, name)))
            except FileNotFoundError:
                return None

        return self.retrying(f"read the manifest of {name} of job {job_id}", read)

    def committed(self, job_id: int) -> list[str]:
        """Names of the job's committed checkpoints (those with a manifest)."""

        def listing() -> list[str]:
            self.fs.invalidate_cache()
            try:
                found = self.fs.ls(self.checkpoints_key(job_id), detail=False)
            except FileNotFoundError:
                return []
            names = [posixpath.basename(str(p).rstrip("/")) for p in found]
            return sorted(n[: -len(MANIFEST_SUFFIX)] for n in names if n.endswith(MANIFEST_SUFFIX))

        return self.retrying(f"list the checkpoints of job {job_id}", listing)

    def intermediates(self, job_id: int) -> list[str]:
        """Committed checkpoint-N names, newest step first."""
        steps = [(step, n) for n in self.committed(job_id) if (step := manifest_step(n)) is not None]
        return [name for _step, name in sorted(steps, reverse=True)]

    def remove_checkpoint(self, job_id: int, name: str) -> None:
        """Uncommit (the manifest goes first), then delete the files."""

        def remove() -> None:
            self._remove_manifest(job_id, name)
            key = self.checkpoint_key(job_id, name)
            if self.fs.exists(key):
                self.fs.rm(key, recursive=True)

        self.retrying(f"remove {name} of job {job_id}", remove)

    def keep_newest(self, job_id: int, keep: int) -> list[str]:
        """save_total_limit in the store: remove all but the `keep` newest intermediate checkpoints."""
        removed = self.intermediates(job_id)[keep:]
        for name in removed:
            self.remove_checkpoint(job_id, name)
        return removed

    def remove_job(self, job_id: int) -> None:
        def remove() -> None:
            key = self.key("jobs", str(job_id))
            if self.fs.exists(key):
                self.fs.rm(key, recursive=True)

        self.retrying(f"remove job {job_id}'s folder", remove)

    def fetch_checkpoint(self, job_id: int, name: str, checkpoints_dir: Path) -> Path | None:
        """The committed checkpoint `name` as a local folder under `checkpoints_dir` (downloaded
        and checked against its manifest unless a complete copy with the manifest's sizes is
        there); None when the store has no such checkpoint."""
        manifest = self.manifest(job_id, name)
        if manifest is None:
            return None
        target = checkpoints_dir / name
        if _matches(target, manifest):
            return target
        staging = checkpoints_dir / f"{FETCH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"

        def fetch() -> None:
            shutil.rmtree(staging, ignore_errors=True)
            for entry in manifest.files:
                self._copy_down(
                    self.file_key(job_id, name, entry["path"]), staging / entry["path"], entry["size"], entry["sha256"]
                )

        try:
            self.retrying(f"download {name} of job {job_id}", fetch)
            if target.exists():  # an older or partial copy: the store's is the committed one
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("job %s: %s downloaded from %s (%d bytes)", job_id, name, self.url, manifest.size_bytes)
        return target

    def hash_object(self, key: str) -> tuple[int, str]:
        """(size, sha256) of an object of the store, read whole."""

        def read() -> tuple[int, str]:
            digest, size = hashlib.sha256(), 0
            for chunk in self.iter_file(key):
                digest.update(chunk)
                size += len(chunk)
            return size, digest.hexdigest()

        return self.retrying(f"read {key}", read)

    def iter_file(self, key: str, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        with self.open_read(key) as handle:
            handle.seek(start)
            left = length
            while left is None or left > 0:
                chunk = handle.read(CHUNK_BYTES if left is None else min(CHUNK_BYTES, left))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk

    # ---- uploads ------------------------------------------------------------------------------

    def put_upload(self, path: Path) -> None:
        self.retrying(f"store the upload {path.name}", lambda: self._copy_up(path, self.upload_key(path.name)))

    def fetch_upload(self, path: Path) -> bool:
        """Bring an uploaded file into the local files folder; False when the store has none."""
        key = self.upload_key(path.name)

        def fetch() -> bool:
            try:
                size = int(self.fs.info(key)["size"])
            except FileNotFoundError:
                return False
            partial = path.with_name(f"{FETCH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
            try:
                self._copy_down(key, partial, size, None)
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)
            return True

        return self.retrying(f"download the upload {path.name}", fetch)

    def remove_upload(self, filename: str) -> None:
        def remove() -> None:
            key = self.upload_key(filename)
            if self.fs.exists(key):
                self.fs.rm_file(key)

        self.retrying(f"remove the upload {filename}", remove)


def _matches(folder: Path, manifest: Manifest) -> bool:
    if not folder.is_dir():
        return False
    return dict(folder_files(folder)) == {f["path"]: int(f["size"]) for f in manifest.files}


@contextmanager
def host_lock(path: Path) -> Iterator[None]:
    """An exclusive lock among this host's processes (flock on `path`, made if missing)."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to the disk (a folder: the names renamed into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@lru_cache
def get_store() -> SharedStore | None:
    """The shared store of STORAGE_URL; None on a single host (the default: DATA_DIR alone)."""
    settings = get_settings()
    if not settings.storage_url:
        return None
    return SharedStore(
        settings.storage_url, retries=settings.storage_retries, retry_wait_s=settings.storage_retry_wait_s
    )
