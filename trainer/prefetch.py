"""Read the model's weight files into the page cache on a thread of their own while the trainer
imports torch, Unsloth and TRL and loads the data (about 25 s on a GPU host), so that loading the
model reads memory instead of disk. A model whose files are already cached costs a quick pass of
reads; one larger than half the host's available memory is left alone (it would evict itself)."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

CHUNK_BYTES = 16 * 1024 * 1024
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
# The most of the host's available memory the files may take.
MAX_SHARE_OF_AVAILABLE = 0.5


def weight_files(model: str) -> list[Path]:
    """A local model folder's weight files, or a Hub model's in the local Hugging Face cache
    (never downloaded here: the trainer's load does that)."""
    folder = Path(model)
    if not folder.is_absolute():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(model, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]))
        except Exception as exc:  # not cached yet
            logger.info("no cached weights of %s to read ahead (%s)", model, type(exc).__name__)
            return []
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Prefetch(threading.Thread):
    """Finds the files and reads each once, sequentially, into a reused buffer; `summary()` says
    what it did (so far)."""

    def __init__(self, model: str) -> None:
        super().__init__(name="weights-prefetch", daemon=True)
        self.model = model
        self.total = 0
        self.read_bytes = 0
        self.started = time.monotonic()
        self.finished: float | None = None
        self.skipped: str | None = None
        self.stop_flag = threading.Event()

    def run(self) -> None:
        try:
            self.read_all()
        finally:
            self.finished = time.monotonic()

    def read_all(self) -> None:
        files = weight_files(self.model)
        if not files:
            self.skipped = "no weight files found"
            return
        self.total = sum(p.stat().st_size for p in files)
        available = available_bytes()
        if available is not None and self.total > MAX_SHARE_OF_AVAILABLE * available:
            self.skipped = f"{size(self.total)} of weights, more than half the {size(available)} available"
            return
        view = memoryview(bytearray(CHUNK_BYTES))
        try:
            for path in files:
                with open(path, "rb", buffering=0) as f:
                    if hasattr(os, "posix_fadvise"):
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    while not self.stop_flag.is_set():
                        n = f.readinto(view)
                        if not n:
                            break
                        self.read_bytes += n
        except OSError as exc:
            self.skipped = f"stopped: {exc}"

    def summary(self) -> str:
        if self.skipped:
            return f"weights not read ahead ({self.skipped})"
        seconds = (self.finished or time.monotonic()) - self.started
        done = "" if self.finished is not None else f" of {size(self.total)} so far"
        return f"weights read ahead into the page cache: {size(self.read_bytes)}{done} in {seconds:.1f} s"


def size(count: int) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 10**8 else f"{count / 1e6:.1f} MB"


def start(model: str) -> Prefetch:
    prefetch = Prefetch(model)
    prefetch.start()
    return prefetch
