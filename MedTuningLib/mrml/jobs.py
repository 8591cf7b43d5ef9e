"""Backend jobs: one or more backend commands in a row, their folder, and what to do at the end.

A :class:`Job` wraps a :class:`~MedTuningLib.slicer_bridge.process.CommandChain`. Its temporary
folder is deleted only after every backend process of the job is gone (a ``PythonSlicer``
launcher may have died while the real backend still writes there), and :class:`JobSlot` refuses a
second job while the backend of the first still lives. ``on_success`` runs once, in the caller's
thread (a UI timer), when the last command ended ok.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, List, Optional

from MedTuningLib.slicer_bridge.events import RunState
from MedTuningLib.slicer_bridge.process import CommandChain

log = logging.getLogger("MedTuning")


class JobBusy(RuntimeError):
    """A job's backend still runs; a new job would run beside it."""


class Job:
    """A backend run (one or more commands) in progress, and what to do with its result."""

    def __init__(self, kind: str, chain: CommandChain, temp_dir: Optional[Path],
                 on_success: Callable[[RunState], Any]) -> None:
        self.kind = kind
        self.chain = chain
        self.temp_dir = temp_dir
        self.on_success = on_success
        self.result: Any = None
        self.failure = ""
        self.completed = False
        self.cancel_requested = False

    @property
    def state(self) -> RunState:
        """The state of the command now running (or the last one)."""
        last = self.chain.last
        return last.state if last is not None else RunState()

    @property
    def ok(self) -> bool:
        return self.completed and self.chain.ok and not self.failure

    @property
    def backend_alive(self) -> bool:
        """True while any process of the current command lives (a launcher's child included)."""
        current = self.chain.current
        return current is not None and current.backend_alive

    def step_text(self) -> str:
        """``"[2/3] "`` for chains of several commands, else empty."""
        return f"[{self.chain.index + 1}/{self.chain.total}] " if self.chain.total > 1 else ""

    def poll(self) -> List[dict]:
        """Take in new events (never waits); completes the job when its last command ended."""
        events = self.chain.poll()
        if self.chain.finished and not self.completed:
            self._complete()
        return events

    def cancel(self) -> None:
        """Ask the running command to stop (STOP file + signal); the kill follows after its grace."""
        self.cancel_requested = True
        self.chain.request_stop()

    def close(self, timeout: float = 15.0) -> bool:
        """Stop now (scene closed, module reloaded): kill, wait, clean up. False if a backend still lives."""
        self.chain.request_stop()
        current = self.chain.current
        if current is not None:
            current.close(timeout=timeout)
        deadline = time.monotonic() + timeout
        while not self.chain.finished and time.monotonic() < deadline:
            self.chain.poll()
            time.sleep(0.05)
        if self.backend_alive:
            log.error("MedTuning: the backend of the %s job is still running; its folder %s is kept",
                      self.kind, self.temp_dir)
            return False
        self.completed = True
        self._cleanup()
        return True

    def _complete(self) -> None:
        self.completed = True
        try:
            if self.chain.ok:
                self.result = self.on_success(self.state)
        except Exception as exc:  # noqa: BLE001 - shown to the user, logged with the traceback
            log.exception("MedTuning: loading the results failed")
            self.failure = str(exc)
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        if self.temp_dir is not None and not self.backend_alive:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def wait(self, timeout: Optional[float] = None, interval: float = 0.1) -> bool:
        """Poll until completed (scripts, tests); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.completed:
            self.poll()
            if self.completed:
                break
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(interval)
        return True


class JobSlot:
    """At most one job at a time: a new one is refused while the previous backend lives."""

    def __init__(self) -> None:
        self.job: Optional[Job] = None

    @property
    def busy(self) -> bool:
        job = self.job
        return job is not None and (not job.completed or job.backend_alive)

    def start(self, factory: Callable[[], Job]) -> Job:
        """Run ``factory`` (which starts the job) unless a job is busy (raises :class:`JobBusy`)."""
        if self.busy:
            raise JobBusy(f"a {self.job.kind} job is still running: cancel it or wait until it ended")  # type: ignore[union-attr]
        self.job = factory()
        return self.job

    def poll(self) -> List[dict]:
        return self.job.poll() if self.job is not None else []

    def close(self) -> bool:
        """Stop the job (if any); False when its backend could not be stopped."""
        if self.job is None:
            return True
        stopped = self.job.close()
        if stopped:
            self.job = None
        return stopped
