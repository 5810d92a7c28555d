"""Receiving dataset uploads: stream to a temporary file with a size limit and a sha256, then
read and check every row (app.rows) without torch or datasets, which only the trainer imports."""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from app.errors import InvalidFile, PayloadTooLarge
from app.rows import DataError, RowCheck, check_file

CHUNK_BYTES = 1024 * 1024
# The uploaded name's extension -> the stored file's (.json is read as JSON Lines, as `datasets` does).
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def clean_name(filename: str | None) -> str:
    """The client's file name without any folders."""
    return PurePosixPath((filename or "").replace("\\", "/")).name


def extension(filename: str) -> str:
    ext = EXTENSIONS.get(PurePosixPath(filename).suffix.lower())
    if ext is None:
        raise InvalidFile(f"{filename!r} is not a .jsonl, .json (JSON Lines) or .parquet file")
    return ext


def receive(source: BinaryIO, dest: Path, *, limit: int) -> tuple[int, str]:
    """Copy `source` to `dest` in chunks, hashing as it goes; its size and sha256. The caller
    deletes `dest` when this raises."""
    digest, size = hashlib.sha256(), 0
    with open(dest, "wb") as out:
        while chunk := source.read(CHUNK_BYTES):
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the file is larger than this server's upload limit of {limit} bytes "
                                      "(MAX_UPLOAD_BYTES)")
            digest.update(chunk)
            out.write(chunk)
    return size, digest.hexdigest()


def inspect(path: Path, name: str) -> RowCheck:
    """Read and check every row. A file with no readable row is refused; one whose columns fit no
    row format is kept (a job's dataset.columns can map them), as are bad rows, which are
    counted and shown with the file."""
    try:
        check = check_file(path)
    except DataError as exc:  # named after the temporary file: show the client's name
        raise InvalidFile(str(exc).replace(path.name, repr(name))) from None
    if check.rows == 0:
        raise InvalidFile("the file has no rows")
    if not check.columns:  # columns come from the first readable row
        shown = "; ".join(check.problems[:5])
        raise InvalidFile(f"no row of the file could be read: {shown}")
    return check
