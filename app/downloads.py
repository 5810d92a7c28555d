"""Serving checkpoint folders safely: path checks and a tar stream built on the fly."""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import stat
import tarfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import anyio.to_thread
from starlette.responses import FileResponse

from app.db import limiter_of
from app.errors import NotFound
from core.shared_store import Manifest, SharedStore

# Read size for downloads: Starlette's 64 KiB means a thread hop per 64 KiB, a quarter of what
# the disk gives; a few MiB per read runs at about sendfile's speed (docs/benchmarks.md).
CHUNK_BYTES = 4 * 1024 * 1024
TAR_BLOCK = tarfile.BLOCKSIZE  # 512
PAGE_BYTES = mmap.PAGESIZE
# Downloads read on threads of their own, never more than this many at once, so that many
# downloads cannot take the threads the API's database work runs on.
FILE_READ_THREADS = 8


def file_reader_limiter() -> anyio.CapacityLimiter:
    """Download reads run on threads of their own (never the API's database threads)."""
    return limiter_of("file reads", FILE_READ_THREADS)


class _ThreadedFile:
    """The two calls FileResponse makes on a file, run on the download threads, reading one chunk
    ahead: the next chunk comes off the disk while this one goes out on the socket, instead of
    the socket waiting for each read and the disk for each send."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self._ahead: asyncio.Task[bytes] | None = None
        self._left = b""  # read ahead but not asked for yet (a shorter last read of a range)

    def _read_in_thread(self, size: int) -> asyncio.Task[bytes]:
        return asyncio.ensure_future(anyio.to_thread.run_sync(self.handle.read, size, limiter=file_reader_limiter()))

    async def read(self, size: int) -> bytes:
        ahead, self._ahead = self._ahead, None
        data = await ahead if ahead is not None else b""
        if self._left:
            data, self._left = self._left + data, b""
        if len(data) < size:  # nothing read ahead, or less than asked (then only at the end of the file)
            more = await self._read_in_thread(size - len(data))
            data = data + more if data else more
        chunk, self._left = (data, b"") if len(data) <= size else (data[:size], data[size:])
        if len(chunk) == size and not self._left:  # more may follow: read it while this is sent
            self._ahead = self._read_in_thread(size)
        return chunk

    async def seek(self, offset: int) -> int:
        await self.settle()
        return self.handle.seek(offset)  # no I/O: the next read goes there

    async def settle(self) -> None:
        """Wait for a read ahead to finish and drop it (it moves the file position, holds the file)."""
        self._left = b""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await ahead


class _MappedFile:
    """A file mapped into memory and handed to the socket chunk by chunk, as views of the mapping:
    the kernel copies each chunk from the page cache straight into the socket, with no read into
    a buffer of our own first (half the copying; what nginx's sendfile avoids altogether). So that
    a send never waits for the disk on the event loop, each chunk's pages are faulted in on a
    download thread first, the next one while this one is sent."""

    def __init__(self, handle: BinaryIO) -> None:
        size = os.fstat(handle.fileno()).st_size
        # The mapping keeps the file open on its own; the socket may still hold views of it after
        # the response is done, so it is never closed here: it goes when the last view does.
        self.view = memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)) if size else memoryview(b"")
        self.position = 0
        self._ahead: tuple[int, int, asyncio.Task[None]] | None = None

    def _fault_in(self, start: int, end: int) -> asyncio.Task[None]:
        def touch() -> None:
            for offset in range(start, end, PAGE_BYTES):
                self.view[offset]  # a read of each page: the disk is read here, on this thread

        return asyncio.ensure_future(anyio.to_thread.run_sync(touch, limiter=file_reader_limiter()))

    async def read(self, size: int) -> memoryview:
        start, end = self.position, min(self.position + size, len(self.view))
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:2] == (start, end):
            await ahead[2]
        else:
            if ahead is not None:
                await ahead[2]
            await self._fault_in(start, end)
        self.position = end
        if end < len(self.view):
            following = min(end + size, len(self.view))
            self._ahead = (end, following, self._fault_in(end, following))
        return self.view[start:end]

    async def seek(self, offset: int) -> int:
        self.position = offset
        return offset

    async def settle(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await ahead[2]


class CheckpointFileResponse(FileResponse):
    """Starlette's FileResponse (Range, If-Range, multipart ranges, HEAD) sending CHUNK_BYTES at a
    time from a memory mapping of the file (see _MappedFile)."""

    chunk_size = CHUNK_BYTES

    # Starlette's hook for opening the file (a private method of the pinned version).
    @asynccontextmanager
    async def _open_file(self) -> AsyncIterator[_MappedFile]:  # type: ignore[override]
        with open(self.path, "rb") as handle:
            mapped = _MappedFile(handle)
        try:
            yield mapped
        finally:
            await mapped.settle()


def resolve_inside(base: Path, relative: str) -> Path:
    """The real path of `relative` under `base`, refusing anything that leaves `base`: `..`
    segments (decoded or not), absolute paths, and symlinks pointing outside."""
    if not relative or "\x00" in relative or relative.startswith(("/", "\\")):
        raise NotFound(f"no file {relative!r} in this checkpoint")
    real_base = base.resolve(strict=True)
    candidate = (real_base / relative).resolve()
    if not candidate.is_relative_to(real_base) or candidate == real_base:
        raise NotFound(f"no file {relative!r} in this checkpoint")
    try:
        mode = candidate.stat().st_mode
    except FileNotFoundError:
        raise NotFound(f"no file {relative!r} in this checkpoint") from None
    if not stat.S_ISREG(mode):
        raise NotFound(f"{relative!r} is not a file in this checkpoint")
    return candidate


class StoreFileResponse(CheckpointFileResponse):
    """A file of the shared store (STORAGE_URL), served like a local one (Range, If-Range,
    multipart ranges, HEAD): the file is opened in the store, and each CHUNK_BYTES read of it, one
    ranged GET of an S3 object, is made on a download thread one chunk ahead of the socket. `path`
    is the store's key; `stat_result` carries the size and mtime from its manifest."""

    def __init__(self, store: SharedStore, key: str, **kwargs: Any) -> None:
        super().__init__(key, **kwargs)
        self.store = store

    @asynccontextmanager
    async def _open_file(self) -> AsyncIterator[_ThreadedFile]:  # type: ignore[override]
        handle = await anyio.to_thread.run_sync(self.store.open_read, str(self.path), limiter=file_reader_limiter())
        reader = _ThreadedFile(handle)
        try:
            yield reader
        finally:
            await reader.settle()
            await anyio.to_thread.run_sync(handle.close, limiter=file_reader_limiter())


def stored_stat(size: int, mtime: float) -> os.stat_result:
    """What FileResponse needs of a stat (size, mtime for Last-Modified and the ETag) for a file
    of the shared store."""
    return os.stat_result((stat.S_IFREG | 0o644, 0, 0, 1, 0, 0, size, int(mtime), int(mtime), int(mtime)))


@dataclass(frozen=True)
class TarMember:
    header: bytes
    path: Path
    size: int
    store: SharedStore | None = None  # then `path` is the file's key in the shared store

    @property
    def padded_size(self) -> int:
        return len(self.header) + -(-self.size // TAR_BLOCK) * TAR_BLOCK


def tar_members(base: Path, arcname: str, relative_paths: list[str]) -> list[TarMember]:
    """Headers for each file, computed up front so the archive's length is known before a byte
    is sent (clients get Content-Length and a real progress bar)."""
    members = []
    for relative in sorted(relative_paths):
        path = resolve_inside(base, relative)
        st = path.stat()
        info = tarfile.TarInfo(f"{arcname}/{relative}")
        info.size = st.st_size
        info.mtime = int(st.st_mtime)
        info.mode = 0o644
        # PAX headers hold sizes past 8 GiB and long names; a 16 GB shard is ordinary here.
        members.append(TarMember(info.tobuf(format=tarfile.PAX_FORMAT), path, st.st_size))
    return members


def store_tar_members(store: SharedStore, manifest: Manifest, arcname: str) -> list[TarMember]:
    """tar_members for a checkpoint in the shared store, from its manifest (no request to the store)."""
    mtime = int(datetime.fromisoformat(manifest.published_at).timestamp())
    members = []
    for entry in sorted(manifest.files, key=lambda f: str(f["path"])):
        info = tarfile.TarInfo(f"{arcname}/{entry['path']}")
        info.size, info.mtime, info.mode = int(entry["size"]), mtime, 0o644
        key = store.file_key(manifest.job_id, manifest.name, str(entry["path"]))
        members.append(TarMember(info.tobuf(format=tarfile.PAX_FORMAT), Path(key), info.size, store))
    return members


def tar_length(members: list[TarMember]) -> int:
    return sum(m.padded_size for m in members) + 2 * TAR_BLOCK


async def stream_tar(members: list[TarMember]) -> AsyncIterator[bytes]:
    """The archive, one chunk at a time, read on the download threads; nothing is built on disk
    or held whole in memory."""
    for member in members:
        yield member.header
        remaining = member.size
        store = member.store
        if store is None:
            opened: BinaryIO = open(member.path, "rb")  # noqa: SIM115 (closed by the with below)
        else:
            opened = await anyio.to_thread.run_sync(store.open_read, str(member.path), limiter=file_reader_limiter())
        with opened as handle:
            reader = _ThreadedFile(handle)
            try:
                while remaining > 0:
                    chunk = await reader.read(CHUNK_BYTES)
                    if not chunk:
                        raise OSError(f"{member.path.name} shrank while being sent")
                    chunk = chunk[:remaining]  # a file that grew: its size when the headers were made
                    remaining -= len(chunk)
                    yield chunk
            finally:
                await reader.settle()
        padding = -member.size % TAR_BLOCK
        if padding:
            yield b"\0" * padding
    yield b"\0" * (2 * TAR_BLOCK)
