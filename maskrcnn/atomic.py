"""Atomic file writes: a reader (or a crash, or an interruption) sees the old file or the complete new one.

Every file the project writes next to a user's work (checkpoints, configs, metrics, plots, predictions)
goes through :func:`atomic_write`: the data goes to ``{path}.tmp.{pid}.{thread}`` (a name of its own for
each process and thread: two threads may write one path, the last rename wins), is flushed to disk, then
renamed over ``path`` (``os.replace`` is atomic on POSIX and Windows). On any exit path that does not reach
the rename (an exception, KeyboardInterrupt, SystemExit) the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import IO

__all__ = ["atomic_write"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """``with atomic_write(path, "wb") as fh: ...`` writes ``path`` atomically (``mode``: "w" or "wb")."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_native_id()}"
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
