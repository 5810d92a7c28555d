"""The files of a model folder, as checkpoints are recorded and downloaded."""

from __future__ import annotations

import os
import stat
from pathlib import Path


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
