"""Serving checkpoint folders safely: path checks and a tar stream built on the fly."""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.to_thread
from starlette.responses import FileResponse

from app.errors import NotFound

# Read size for downloads: Starlette's 64 KiB means a thread hop per 64 KiB, a quarter of what
# the disk gives; a few MiB per read runs at about sendfile's speed (docs/benchmarks.md).
CHUNK_BYTES = 4 * 1024 * 1024
TAR_BLOCK = tarfile.BLOCKSIZE  # 512
# Downloads read on threads of their own, never more than this many at once, so that many
# downloads cannot take the threads the API's database work runs on.
FILE_READ_THREADS = 8
_file_readers: dict[object, anyio.CapacityLimiter] = {}


def file_reader_limiter() -> anyio.CapacityLimiter:
    """The limiter for download reads of the running event loop (one per loop: tests run many)."""
    from anyio.lowlevel import current_token

    token = current_token()
    if token not in _file_readers:
        _file_readers.clear()
        _file_readers[token] = anyio.CapacityLimiter(FILE_READ_THREADS)
    return _file_readers[token]


class _ThreadedFile:
    """The two calls FileResponse makes on a file, run on the download threads."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle

    async def read(self, size: int) -> bytes:
        return await anyio.to_thread.run_sync(self.handle.read, size, limiter=file_reader_limiter())

    async def seek(self, offset: int) -> int:
        return self.handle.seek(offset)  # no I/O: the next read goes there


class CheckpointFileResponse(FileResponse):
    """Starlette's FileResponse (Range, If-Range, multipart ranges, HEAD) reading CHUNK_BYTES at
    a time on the download threads."""

    chunk_size = CHUNK_BYTES

    # Starlette's hook for opening the file (a private method of the pinned version).
    @asynccontextmanager
    async def _open_file(self) -> AsyncIterator[_ThreadedFile]:  # type: ignore[override]
        handle = open(self.path, "rb")  # noqa: SIM115  (closed below, even when cancelled)
        try:
            yield _ThreadedFile(handle)
        finally:
            handle.close()


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


@dataclass(frozen=True)
class TarMember:
    header: bytes
    path: Path
    size: int

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


def tar_length(members: list[TarMember]) -> int:
    return sum(m.padded_size for m in members) + 2 * TAR_BLOCK


async def stream_tar(members: list[TarMember]) -> AsyncIterator[bytes]:
    """The archive, one chunk at a time, read on the download threads; nothing is built on disk
    or held whole in memory."""
    for member in members:
        yield member.header
        remaining = member.size
        with open(member.path, "rb") as handle:
            reader = _ThreadedFile(handle)
            while remaining > 0:
                chunk = await reader.read(min(CHUNK_BYTES, remaining))
                if not chunk:
                    raise OSError(f"{member.path.name} shrank while being sent")
                remaining -= len(chunk)
                yield chunk
        padding = -member.size % TAR_BLOCK
        if padding:
            yield b"\0" * padding
    yield b"\0" * (2 * TAR_BLOCK)


def folder_files(folder: Path) -> list[tuple[str, int]]:
    """Regular files under `folder` (no symlinks followed), as (relative path, size)."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                found.append((path.relative_to(folder).as_posix(), st.st_size))
    return found
