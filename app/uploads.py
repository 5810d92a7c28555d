"""Receiving dataset uploads: stream to a temporary file with a size limit and a sha256, then
check the rows (format and count) without torch or datasets, which only the trainer imports."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from app.errors import InvalidFile, PayloadTooLarge

CHUNK_BYTES = 1024 * 1024
# The uploaded name's extension -> the stored file's (.json is read as JSON Lines, as `datasets` does).
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
NEEDED = "a row needs 'messages' (chat), 'prompt' and 'completion', or 'text'"


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


def row_format(keys: list[str]) -> str:
    if "messages" in keys:
        return "messages"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise InvalidFile(f"the rows have columns {sorted(keys)}; {NEEDED}")


def inspect(path: Path, ext: str) -> tuple[str, int]:
    """The row format (from the first row's keys) and the number of rows."""
    if ext == "parquet":
        return _inspect_parquet(path)
    found, rows = None, 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                raise InvalidFile(f"line {number} is not valid JSON ({reason})") from None
            if not isinstance(row, dict):
                raise InvalidFile(f"line {number} is not a JSON object (one row per line)")
            if found is None:
                found = row_format(list(row))
            rows += 1
    if found is None:
        raise InvalidFile("the file has no rows")
    return found, rows


def _inspect_parquet(path: Path) -> tuple[str, int]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow.ArrowInvalid and friends
        raise InvalidFile(f"not a readable Parquet file ({exc})") from None
    with parquet:
        rows = parquet.metadata.num_rows
        found = row_format(list(parquet.schema_arrow.names))
    if rows == 0:
        raise InvalidFile("the file has no rows")
    return found, rows
