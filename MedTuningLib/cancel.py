"""Cooperative cancellation: SIGINT / SIGTERM or a ``STOP`` file in the run's working folder.

A long run calls :meth:`CancelToken.check` at every step; on a request it raises
:class:`~MedTuningLib.errors.Cancelled` after the caller has written a resumable state. The
command then exits with status 130. A caller (the Slicer module) first asks (STOP file or
SIGTERM), waits a few seconds, and only then kills the process tree.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from MedTuningLib.errors import Cancelled

STOP_FILE_NAME = "STOP"


class CancelToken:
    def __init__(self, watch_dir: Path | None = None) -> None:
        self.watch_dir = Path(watch_dir) if watch_dir is not None else None
        self._event = threading.Event()
        self.reason = ""
        self._previous: dict[int, object] = {}
        # Commands that never poll the token (short, all-or-nothing ones such as 'cases add') stop at once:
        # the signal raises Cancelled where the command is, and its staging / atomic writes clean up.
        self.immediate = False

    def install_signal_handlers(self) -> "CancelToken":
        """Turn SIGINT / SIGTERM into a cancel request (only possible in the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore_signal_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.request(f"signal {signal.Signals(signum).name}")
        if self.immediate:
            raise Cancelled(self.reason)

    def request(self, reason: str = "requested") -> None:
        self.reason = reason
        self._event.set()

    @property
    def requested(self) -> bool:
        if not self._event.is_set() and self.watch_dir is not None:
            if (self.watch_dir / STOP_FILE_NAME).exists():
                self.request(f"{STOP_FILE_NAME} file")
        return self._event.is_set()

    def check(self) -> None:
        if self.requested:
            raise Cancelled(self.reason)
