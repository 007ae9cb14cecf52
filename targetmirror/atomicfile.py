"""Small state files written so that a crash leaves the old content or the new, never a mix
(temp file in the same directory, fsync, rename, fsync of the directory), mode 0600."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from typing import Any


def write_json(path: str, data: Any, *, dir_mode: int = 0o700) -> None:
    """Replace ``path`` by ``data`` as JSON, atomically and durably."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=dir_mode, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"  # two writers never share one
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
