"""Stopping a training run cleanly on SIGINT (Ctrl-C) and SIGTERM (what schedulers send before preemption).

The first signal only asks to stop: the loop finishes the current iteration, writes a checkpoint and
raises :class:`TrainingInterrupted`. A second SIGINT stops at once (``KeyboardInterrupt``, which the atomic
writers survive without leaving partial files). Under DDP every process learns of a request made to any of
them at the same iteration, so all stop together: each process's request travels as values
(:meth:`StopRequest.votes`) in the all-reduce the loop already makes for its losses, and
:meth:`StopRequest.agreed` reads the reduced result (no collective of its own).
"""

from __future__ import annotations

import signal
import threading

__all__ = ["StopRequest", "TrainingInterrupted"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after a checkpoint was written. ``exit_code`` is 128 + the signal
    number (the shell's convention: 130 for SIGINT, 143 for SIGTERM); ``checkpoint`` the file written."""

    def __init__(self, message: str, *, signum: int, iteration: int, checkpoint: str) -> None:
        super().__init__(message)
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        self.exit_code = 128 + int(signum)


class StopRequest:
    """``with StopRequest() as stop:`` installs the handlers (main thread only; elsewhere it does nothing)
    and restores the previous ones on exit. ``stop.signum`` is the first signal received, or None."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def votes(self) -> dict[str, float]:
        """This process's request, ``{"stop_SIGINT": 0 or 1, "stop_SIGTERM": 0 or 1}``, to be averaged over
        the processes together with the losses."""
        return {f"stop_{s.name}": float(self.signum == s) for s in SIGNALS}

    @staticmethod
    def agreed(reduced: dict[str, float]) -> int | None:
        """The signal to stop on (the same on every process), from averaged :meth:`votes`, which are
        removed from ``reduced``; None to go on."""
        votes = {s: reduced.pop(f"stop_{s.name}") for s in SIGNALS}
        return next((s for s in SIGNALS if votes[s] > 0), None)
