"""nvidia-smi's own view of GPU memory, to hold the job record's figures against: one reading,
or a sampler that logs it ten times a second while a job runs. One implementation for the GPU
scripts and the service benchmark."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import TracebackType

MIB = 1024**2
QUERY = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]


def used_bytes(index: int = 0) -> int:
    """Memory in use on GPU `index` now, all processes together, in bytes."""
    out = subprocess.run([*QUERY, "-i", str(index)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) * MIB


class MemorySampler:
    """`with MemorySampler(csv_path) as smi: ...` logs GPU `index`'s used memory every
    `interval_ms` into csv_path (kept for the record); peak_bytes() is the largest reading."""

    def __init__(self, csv_path: Path, index: int = 0, interval_ms: int = 100) -> None:
        self.csv_path = csv_path
        self.args = [*QUERY, "-i", str(index), "-lms", str(interval_ms)]
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> MemorySampler:
        with open(self.csv_path, "wb") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(self.args, stdout=log)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def readings_bytes(self) -> list[int]:
        return [int(line) * MIB for line in self.csv_path.read_text().split() if line.isdigit()]

    def peak_bytes(self) -> int:
        readings = self.readings_bytes()
        if not readings:
            raise RuntimeError(f"nvidia-smi logged no readings into {self.csv_path}")
        return max(readings)
