"""Progress of long work, readable where it is shown: a tqdm bar on a terminal; otherwise (CI, nohup, a
cluster job's log file) one plain line on stderr every ``interval`` seconds and at the end, instead of a
stream of carriage-return redraws.

Used by evaluation, prediction and the up-front image check. Training passes ``interval=None``: without a
terminal it writes its own line every ``log_period`` iterations (:meth:`Progress.write`, see
:mod:`maskrcnn.engine.logs`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

__all__ = ["Progress", "format_duration", "format_seconds", "iterate_with_progress"]


def format_duration(seconds: float) -> str:
    """``seconds`` as ``45s``, ``3m07s`` or ``2h05m09s``."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """``total`` steps from ``initial``; :meth:`update` advances, with an optional status text (losses).

    On a terminal (``sys.stderr.isatty()``) a tqdm bar; otherwise a line such as
    ``evaluate: 120/1300 (9%), 1.05 s/it, eta 20m39s`` every ``interval`` seconds, and
    ``evaluate: 1300/1300 (100%), 1.02 s/it, done in 22m06s`` when the last step is done (``interval=None``:
    no lines of its own; the caller writes them with :meth:`write`). ``enabled=False`` shows nothing (e.g.
    on DDP ranks other than 0).
    """

    def __init__(
        self,
        total: int | None,
        *,
        desc: str,
        initial: int = 0,
        enabled: bool = True,
        interval: float | None = 30.0,
    ) -> None:
        self.total, self.desc, self.count, self.interval = total, desc, initial, interval
        self.enabled = enabled
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
        self._start = self._last = time.perf_counter()
        self._first = initial

    def update(self, n: int = 1, status: str = "") -> None:
        self.count += n
        if not self.enabled:
            return
        if self._bar is not None:
            if status:
                self._bar.set_postfix_str(status, refresh=False)
            self._bar.update(n)
            return
        if self.interval is None:
            return
        now = time.perf_counter()
        if now - self._last >= self.interval or self.count == self.total:
            self._last = now
            print(self._line(now, status), file=sys.stderr, flush=True)

    def _line(self, now: float, status: str) -> str:
        done = self.count - self._first
        per = (now - self._start) / max(done, 1)
        parts = [f"{self.desc}: {self.count}/{self.total if self.total else '?'}"]
        if self.total:
            parts[0] += f" ({100 * self.count // self.total}%)"
        parts.append(f"{format_seconds(per)} s/it")
        if self.total and self.count < self.total:
            parts.append(f"eta {format_duration(per * (self.total - self.count))}")
        elif self.total:
            parts.append(f"done in {format_duration(now - self._start)}")
        return ", ".join(parts + ([status] if status else []))

    @property
    def shows_bar(self) -> bool:
        """Whether a tqdm bar is shown (enabled, on a terminal)."""
        return self._bar is not None

    def write(self, line: str) -> None:
        """Print ``line`` on stderr where no bar is shown (enabled, not a terminal); nothing otherwise."""
        if self.enabled and self._bar is None:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def format_seconds(seconds: float) -> str:
    """A time per step: 2 decimals from 0.1 s (``1.05``), 4 below (``0.0123``)."""
    return f"{seconds:.2f}" if seconds >= 0.1 else f"{seconds:.4f}"


def iterate_with_progress(
    iterable: Iterable, *, total: int | None, desc: str, enabled: bool = True, interval: float = 30.0
) -> Iterator:
    """Yield from ``iterable`` with a :class:`Progress` of ``total`` steps."""
    progress = Progress(total, desc=desc, enabled=enabled, interval=interval)
    try:
        for item in iterable:
            yield item
            progress.update()
    finally:
        progress.close()
