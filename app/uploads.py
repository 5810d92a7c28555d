"""Receiving dataset uploads: the multipart body is parsed as it streams in (python-multipart),
the file part written to a temporary name with its sha256 and the size limit enforced as bytes
arrive; then every row is read and checked (core.rows) without torch or datasets."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from app.errors import InsufficientStorage, InvalidFile, PayloadTooLarge
from core.config import get_settings
from core.diskspace import DiskSpace, disk_space, gib, is_disk_full_error
from core.rows import ALL_FORMATS, DataError, RowCheck, check_file, file_kind

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

logger = logging.getLogger(__name__)

# Room for the multipart framing around the file when a declared Content-Length is judged.
MULTIPART_OVERHEAD = 64 * 1024
INCOMING_PREFIX = ".incoming-"
# An unfinished upload younger than this is left alone by the sweeper, even unlocked: its
# receiver may be between creating the file and locking it.
SWEEP_MIN_AGE_S = 1.0
# Form fields beside the file (the /v1 upload's `purpose`): kept when asked for, this many at most,
# each this long at most.
FORM_FIELDS_MAX = 32
FORM_FIELD_BYTES_MAX = 4096
# While a file streams in, the free disk is looked at again every this many bytes written, and must
# hold MIN_FREE_DISK_BYTES and the next stretch.
DISK_CHECK_EVERY_BYTES = 1024**2


def clean_name(filename: str | None) -> str:
    """The client's file name without any folders."""
    return PurePosixPath((filename or "").replace("\\", "/")).name


def extension(filename: str) -> str:
    """The stored file's extension: jsonl (for .jsonl and .json) or parquet (core.rows.file_kind)."""
    try:
        return file_kind(Path(PurePosixPath(filename).name))
    except DataError:
        raise InvalidFile(f"{filename!r} is not a .jsonl, .json (JSON Lines) or .parquet file") from None


class _FilePart:
    """The multipart body's `file` part, written to disk with its size and sha256 as it arrives.
    Other parts are ignored, or kept in `fields` (text form fields, when given a dict); the part's
    file name decides the stored extension."""

    def __init__(
        self,
        dest_for: Callable[[str], Path],
        limit: int,
        fields: dict[str, str] | None = None,
        *,
        keep_free: int = 0,
    ) -> None:
        self.dest_for, self.limit = dest_for, limit
        self.keep_free = keep_free
        self.checked_at = 0  # the size at the last look at the free disk
        self.fields = fields
        self._form_name: str | None = None
        self._form_value = bytearray()
        self.headers: dict[bytes, bytes] = {}
        self._field, self._value = b"", b""
        self.out: BinaryIO | None = None
        self.dest: Path | None = None
        self.filename = ""
        self.size = 0
        self.digest = hashlib.sha256()
        self.ended = False
        self._in_file = False

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self.headers, self._in_file = {}, False
        self._form_name = None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self.headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        if options.get(b"name") != b"file" or self.out is not None:
            if self.fields is not None and b"filename" not in options and options.get(b"name"):
                if len(self.fields) >= FORM_FIELDS_MAX:
                    raise InvalidFile(f"the body has more than {FORM_FIELDS_MAX} form fields")
                self._form_name = options[b"name"].decode("utf-8", "replace")
                self._form_value = bytearray()
            return
        self.filename = clean_name(options.get(b"filename", b"").decode("utf-8", "replace"))
        if not self.filename:
            raise InvalidFile("the 'file' part has no file name (send it as a file: curl -F file=@data.jsonl)")
        self.dest = self.dest_for(self.filename)  # refuses an unknown extension before any data
        self.out = open(self.dest, "wb")  # noqa: SIM115  (closed in close())
        # Held while the upload streams: a file nobody holds is an upload whose API process died
        # (the kernel drops the lock with the process), which the sweeper removes.
        fcntl.flock(self.out.fileno(), fcntl.LOCK_EX)
        self._in_file = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._form_name is not None:
            self._form_value += data[start:end]
            if len(self._form_value) > FORM_FIELD_BYTES_MAX:
                raise InvalidFile(f"the form field {self._form_name!r} is longer than {FORM_FIELD_BYTES_MAX} bytes")
            return
        if not self._in_file or self.out is None:
            return
        self.size += end - start
        if self.size > self.limit:
            raise PayloadTooLarge(too_large(self.limit))
        if self.size - self.checked_at >= DISK_CHECK_EVERY_BYTES and self.dest is not None:
            self.checked_at = self.size
            space = disk_space(self.dest)
            if space.free_bytes < self.keep_free + DISK_CHECK_EVERY_BYTES:
                raise InsufficientStorage(
                    f"the upload was refused after {self.size:,} bytes: {eats_into_reserve(space, self.keep_free)}; "
                    "nothing was stored"
                )
        chunk = data[start:end]
        self.digest.update(chunk)
        self.out.write(chunk)  # small writes to the page cache; the event loop barely notices

    def _part_end(self) -> None:
        self._in_file = False
        if self._form_name is not None and self.fields is not None:
            self.fields[self._form_name] = self._form_value.decode("utf-8", "replace")
        self._form_name = None

    def _end(self) -> None:
        self.ended = True

    def close(self) -> None:
        if self.out is not None:
            self.out.close()


def too_large(limit: int) -> str:
    return f"the file is larger than this server's upload limit of {limit} bytes (MAX_UPLOAD_BYTES)"


def eats_into_reserve(space: DiskSpace, keep_free: int) -> str:
    return (
        f"storing it would eat into the space kept free for the job database and logs: {space.describe()}, "
        f"of which {gib(keep_free)} stays free (MIN_FREE_DISK_BYTES); free space under DATA_DIR "
        "(DELETE /jobs/{id}, DELETE /files/{id}; GET /storage shows where it went) and upload again"
    )


async def receive(
    request: Request,
    dest_for: Callable[[str], Path],
    *,
    limit: int,
    fields: dict[str, str] | None = None,
    folder: Path,
    keep_free: int = 0,
) -> tuple[str, Path, int, str]:
    """Stream a multipart/form-data body's `file` part to `dest_for(filename)` (a file in `folder`),
    checking the size limit as bytes arrive: (file name, path, size, sha256). The disk must keep
    `keep_free` bytes free (MIN_FREE_DISK_BYTES): a declared length that would eat into them is
    refused before a byte is read, and the free space is looked at again as the file grows. A body
    that breaks off before its closing boundary is refused; the caller deletes the path when this
    raises. Given `fields`, the body's text form fields are put there as they arrive (those before
    the file part are there when `dest_for` is called)."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise InvalidFile(
            "send the dataset as multipart/form-data with the file in field 'file' (curl -F file=@data.jsonl)"
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD:
        raise PayloadTooLarge(too_large(limit))  # before reading a byte
    space = disk_space(folder)
    needs = int(declared) if declared.isdigit() else 0
    if space.free_bytes - needs < keep_free:  # before reading a byte, too
        said = f"the request declares {needs:,} bytes; " if needs else ""
        raise InsufficientStorage(f"the upload was refused: {said}{eats_into_reserve(space, keep_free)}")
    part = _FilePart(dest_for, limit, fields, keep_free=keep_free)
    parser = MultipartParser(boundary, part.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidFile(f"the multipart body is malformed ({exc})") from None
    except OSError as exc:
        if not is_disk_full_error(exc):
            raise
        raise InsufficientStorage(
            f"the upload could not be stored: the disk under DATA_DIR is full after "
            f"{part.size} bytes ({disk_space(part.dest or Path('.')).describe()})"
        ) from None
    finally:
        part.close()
    if part.dest is None:
        raise InvalidFile("the body has no multipart field 'file' with a file (curl -F file=@data.jsonl)")
    if not part.ended:
        raise InvalidFile(
            f"the upload of {part.filename!r} ended after {part.size} bytes, before the multipart "
            "body was complete (a broken-off upload?); nothing was stored"
        )
    return part.filename, part.dest, part.size, part.digest.hexdigest()


def inspect(path: Path, name: str) -> RowCheck:
    """Read and check every row. A file with no readable row is refused; one whose columns fit no
    row format is kept (a job's dataset.columns can map them), as are bad rows, which are
    counted and shown with the file."""
    try:
        check = check_file(path, max_row_bytes=get_settings().max_row_bytes, formats=ALL_FORMATS)
    except DataError as exc:  # named after the temporary file: show the client's name
        raise InvalidFile(str(exc).replace(path.name, repr(name))) from None
    if check.rows == 0:
        raise InvalidFile("the file has no rows")
    if not check.columns:  # columns come from the first readable row
        shown = "; ".join(check.problems[:5])
        raise InvalidFile(f"no row of the file could be read: {shown}")
    return check


def sweep_unfinished(files_dir: Path) -> tuple[int, int]:
    """Remove the temporary files of uploads whose API process died mid-upload (killed, crashed,
    restarted). An upload in progress holds a lock on its file, so another API process running
    beside this one never loses its upload. Returns (files, bytes) removed."""
    removed = freed = 0
    if not files_dir.is_dir():
        return removed, freed
    for path in files_dir.glob(f"{INCOMING_PREFIX}*"):
        try:
            with open(path, "rb") as handle:
                stat = path.stat()
                if time.time() - stat.st_mtime < SWEEP_MIN_AGE_S:
                    continue
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # an upload in progress
                path.unlink()
        except FileNotFoundError:
            continue
        removed, freed = removed + 1, freed + stat.st_size
    if removed:
        logger.warning(
            "removed %d unfinished upload(s) left by a stopped API process (%d bytes) from %s",
            removed,
            freed,
            files_dir,
        )
    return removed, freed


def upload_body(file_description: str, **form_fields: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI request body of a streamed multipart upload (FastAPI cannot derive it: the
    route reads the raw request): `file`, plus the named form fields, all required."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", *form_fields],
                        "properties": {
                            "file": {"type": "string", "format": "binary", "description": file_description},
                            **form_fields,
                        },
                    }
                }
            },
        }
    }
