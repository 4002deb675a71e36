"""Writing files so that a kill at any instant leaves the old version or the new one, never a mix.

A file is written to a temporary name beside it, flushed to disk (fsync), and renamed over the old
one: a rename within a folder is atomic on POSIX file systems. The folder is fsynced too, so the
rename itself survives a power cut. JSONL files grow by appends of whole lines; a line torn by a kill
has no final newline, and whoever reads the file next (run_state.truncate_jsonl) drops it.
"""

import json
import os
from pathlib import Path


def fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes):
    """Replace `path` by `data`: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def append_line(path: Path, record: dict):
    """Append one JSON object as one line, flushed to disk before returning."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
