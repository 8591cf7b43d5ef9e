"""Running the backend as a separate process that a UI timer can poll without blocking.

The process starts without a shell, in its own session / process group (so a kill reaches every
child it spawned, e.g. data-loader workers or ``torchrun`` ranks). Two reader threads drain stdout
(events) and stderr (human log) into a queue; :meth:`BackendProcess.poll` — called from a
``qt.QTimer`` in Slicer — moves what arrived into a :class:`~.events.RunState` and never waits.

Cancel follows docs/method.md: :meth:`request_stop` asks (``STOP`` file in the run's working folder and
SIGTERM), the backend saves a resumable state and exits 130; :meth:`poll` escalates to
:meth:`kill_tree` when the backend is still alive ``grace_s`` seconds after the request.

Inside 3D Slicer the started program is often ``PythonSlicer``, which is CTKAppLauncher: it runs
``python-real`` as its child, shares its pipes and forwards no signal. So "the backend" is the whole
process group, not the started process: a run counts as running while any process of its group
lives (``/proc`` on Linux, ``killpg(pgid, 0)`` elsewhere), the kill reaches the group, and the
kill-after-grace keeps watching after the launcher itself is gone. Standard library only (this
file is imported inside Slicer, whose Python has no psutil).
"""

from __future__ import annotations

import collections
import enum
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Optional, Sequence

from MedTuningLib.slicer_bridge.events import EventReader, RunState

STOP_FILE_NAME = "STOP"  # same name as MedTuningLib.cancel.STOP_FILE_NAME (kept import-light)
#: Environment variable naming the folder in which a ``STOP`` file cancels a non-training command.
WORKDIR_ENV = "MEDTUNING_WORKDIR"
DEFAULT_GRACE_S = 20.0  # a training step on a busy CPU can take several seconds
STDERR_TAIL_LINES = 400
#: After the process exited, how long to wait for its pipes to close (a grandchild may hold them).
PIPE_DRAIN_S = 5.0
#: After SIGKILL to the group, how long to wait for its processes to disappear.
KILL_WAIT_S = 5.0


def _linux_group_members(pgid: int) -> Optional[list[int]]:
    """Live (not zombie) processes of process group ``pgid`` from ``/proc``; None where there is no /proc."""
    if not sys.platform.startswith("linux") or not os.path.isdir("/proc/self"):
        return None
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read().decode("utf-8", "replace")
        except OSError:  # ended meanwhile, or not ours to read
            continue
        fields = stat.rsplit(")", 1)[-1].split()  # after "pid (comm)": state ppid pgrp ...
        if len(fields) >= 3 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def group_alive(pgid: int) -> bool:
    """True while some process of the process group ``pgid`` runs (POSIX)."""
    members = _linux_group_members(pgid)
    if members is not None:
        return bool(members)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class ExitKind(str, enum.Enum):
    OK = "ok"
    BAD_INPUT = "bad_input"
    FAILURE = "failure"
    CANCELLED = "cancelled"
    KILLED = "killed"


def exit_kind(returncode: int, stop_requested: bool = False) -> ExitKind:
    """The meaning of an exit status (docs/method.md: 0 ok, 2 bad input, 3 failure, 130 cancelled)."""
    if returncode == 0:
        return ExitKind.OK
    if returncode == 2:
        return ExitKind.BAD_INPUT
    if returncode in (130, -signal.SIGINT):
        return ExitKind.CANCELLED
    if returncode < 0 or returncode == 137:  # ended by a signal (POSIX) / killed in a container
        return ExitKind.CANCELLED if stop_requested else ExitKind.KILLED
    if stop_requested and sys.platform == "win32" and returncode == 1:  # TerminateProcess exit code
        return ExitKind.CANCELLED
    return ExitKind.FAILURE


EXIT_TEXT = {
    ExitKind.OK: "Finished",
    ExitKind.BAD_INPUT: "The backend refused the input",
    ExitKind.FAILURE: "The backend failed",
    ExitKind.CANCELLED: "Cancelled",
    ExitKind.KILLED: "The backend process was killed",
}


def _pump(stream: IO[bytes], tag: str, out: "queue.Queue[tuple[str, bytes]]") -> None:
    """Reader thread: forward raw chunks as they arrive (partial lines included) until EOF."""
    fd = stream.fileno()
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            out.put((tag, chunk))
    except OSError:
        pass
    finally:
        out.put((tag, b""))  # EOF marker


class BackendProcess:
    """One backend run: start, poll (non-blocking), request a stop, kill the tree.

    ``workdir`` is where a ``STOP`` file asks the run to stop: ``OUT.partial`` for training, a
    scratch folder for other commands (passed to the backend as ``MEDTUNING_WORKDIR``).
    """

    def __init__(self, argv: Sequence[str], workdir: Optional[os.PathLike | str] = None,
                 env: Optional[Mapping[str, str]] = None, cwd: Optional[os.PathLike | str] = None,
                 grace_s: float = DEFAULT_GRACE_S, pythonpath: Optional[os.PathLike | str] = None) -> None:
        if not argv:
            raise ValueError("empty command")
        self.argv = [os.fspath(a) for a in argv]
        self.workdir = Path(workdir) if workdir is not None else None
        self.cwd = os.fspath(cwd) if cwd is not None else None
        self.grace_s = grace_s
        self.env = dict(os.environ if env is None else env)
        if pythonpath is not None:  # make MedTuningLib importable in the backend interpreter
            parts = [os.fspath(pythonpath)] + [p for p in self.env.get("PYTHONPATH", "").split(os.pathsep) if p]
            self.env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
        if self.workdir is not None:
            self.env[WORKDIR_ENV] = os.fspath(self.workdir)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.env.setdefault("PYTHONIOENCODING", "utf-8")
        self.state = RunState()
        self.reader = EventReader()
        self.stderr_lines: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.returncode: Optional[int] = None
        self.exit: Optional[ExitKind] = None
        self.stop_requested_at: Optional[float] = None
        self.killed = False
        self.started_at: Optional[float] = None
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._queue: "queue.Queue[tuple[str, bytes]]" = queue.Queue()
        self._open_streams = 0
        self._stderr_reader = EventReader()  # only for its line splitting
        self._threads: list[threading.Thread] = []
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._exited_at: Optional[float] = None

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True from start until the backend ended and its output was read."""
        return self._proc is not None and self.returncode is None

    @property
    def backend_alive(self) -> bool:
        """True while the started process or any process of its group lives (a launcher's child too)."""
        if self._proc is None:
            return False
        if self._proc.poll() is None:
            return True
        return sys.platform != "win32" and group_alive(self._proc.pid)

    @property
    def finished(self) -> bool:
        return self.returncode is not None

    def start(self) -> "BackendProcess":
        if self._proc is not None:
            raise RuntimeError("this run was already started")
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            stale = self.workdir / STOP_FILE_NAME
            if stale.exists():  # a STOP left by an earlier cancelled run would stop this one at once
                stale.unlink()
        kwargs: dict[str, Any] = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # own process group: killpg reaches every child
        self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, cwd=self.cwd, env=self.env, **kwargs)
        self.started_at = time.monotonic()
        for stream, tag in ((self._proc.stdout, "out"), (self._proc.stderr, "err")):
            thread = threading.Thread(target=_pump, args=(stream, tag, self._queue), daemon=True,
                                      name=f"medtuning-{tag}-{self._proc.pid}")
            thread.start()
            self._threads.append(thread)
        self._open_streams = 2
        return self

    def poll(self) -> list[dict[str, Any]]:
        """Take in what arrived, without waiting; returns the new events. Call from a UI timer."""
        if self._proc is None:
            return []
        new_events: list[dict[str, Any]] = []
        while True:
            try:
                tag, chunk = self._queue.get_nowait()
            except queue.Empty:
                break
            if tag == "out":
                new_events += self.reader.feed(chunk) if chunk else self.reader.close()
            else:
                self._take_stderr(chunk)
            if not chunk:
                self._open_streams -= 1
        for event in new_events:
            self.state.apply(event)
            for listener in self.listeners:
                listener(event)
        # The grace period is checked against the whole group: a launcher may be gone already
        # while the real backend it started keeps running.
        if (self.stop_requested_at is not None and not self.killed and self.returncode is None
                and time.monotonic() - self.stop_requested_at > self.grace_s and self.backend_alive):
            self.kill_tree()
        # Finished only once the process exited, nothing of its group lives and both pipes were
        # read to the end, so the last events (done / error) are never lost.
        if self.returncode is None and self._proc.poll() is not None:
            group = sys.platform != "win32" and group_alive(self._proc.pid)
            pipes_open = self._open_streams > 0
            if group and pipes_open and not self.killed:
                self._exited_at = None  # a launcher's child still works and writes: keep reading
            else:
                if self._exited_at is None:
                    self._exited_at = time.monotonic()
                # A stray process that holds a pipe (or a group that will not die) is given up on.
                if (not pipes_open and not group) or time.monotonic() - self._exited_at > PIPE_DRAIN_S:
                    new_events += self._drain_remaining()
                    self._finish(self._proc.returncode)
        return new_events

    def _drain_remaining(self) -> list[dict[str, Any]]:
        """A last line without a newline still counts when the stream is given up on."""
        events = self.reader.close() if self._open_streams > 0 else []
        self.state.apply_all(events)
        return events

    def _take_stderr(self, chunk: bytes) -> None:
        self._stderr_reader.feed(chunk) if chunk else self._stderr_reader.close()
        # EventReader keeps non-event lines as noise: that is exactly the stderr text.
        self.stderr_lines.extend(self._stderr_reader.noise)
        self._stderr_reader.noise.clear()

    def _finish(self, returncode: int) -> None:
        self.returncode = returncode
        self.exit = exit_kind(returncode, self.stop_requested_at is not None)
        if self.exit is ExitKind.CANCELLED and not self.state.done_status:
            self.state.done_status = "cancelled"
            self.state.status_text = "Cancelled"
        elif self.exit is not ExitKind.OK:
            self.state.finish_without_events(f"{EXIT_TEXT[self.exit]} (exit status {returncode})",
                                             self.stderr_tail())
        elif not self.state.finished:  # exit 0 without a done event: trust the status
            self.state.done_status = "ok"
            self.state.progress = 1.0

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> Optional[int]:
        """Poll until the run finished (tests, scripts); returns the exit status or None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            self.poll()
            if self.finished:
                break
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(interval)
        return self.returncode

    def stderr_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self.stderr_lines)[-lines:])

    # -- cancel ----------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the run to stop: ``STOP`` file and SIGTERM. :meth:`poll` kills after ``grace_s``."""
        if self._proc is None or self.finished:
            return
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
            self.state.status_text = "Stopping…"
        if self.workdir is not None:
            try:
                self.workdir.mkdir(parents=True, exist_ok=True)
                (self.workdir / STOP_FILE_NAME).write_text("stop requested by MedTuning (3D Slicer)\n", encoding="utf-8")
            except OSError:
                pass  # the signal still asks; the kill follows after the grace period
        if sys.platform != "win32" and self._proc.poll() is None:
            # Only the started process: it stops its children itself, and workers killed first
            # would turn a clean cancel into a crash report. Behind a launcher (which forwards no
            # signal) the STOP file asks the real backend, and the group kill follows the grace.
            try:
                os.kill(self._proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def kill_tree(self) -> None:
        """Kill the started process and everything in its process group (also re-parented children)."""
        if self._proc is None:
            return
        self.killed = True
        if sys.platform == "win32":
            if self._proc.poll() is None:  # /T: the tree below the started process, while it lives
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._proc.pid)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, check=False)
        else:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        # The root is reaped through Popen only: reaped elsewhere, Popen would report exit status 0.
        if self._proc.poll() is None:
            self._proc.kill()
        try:
            self._proc.wait(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + KILL_WAIT_S
        while sys.platform != "win32" and group_alive(self._proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self, timeout: float = 10.0) -> None:
        """Make sure nothing keeps running (Slicer closing, module reloaded): kill, then read the end."""
        if self._proc is None:
            return
        if self.backend_alive:
            self.kill_tree()
        self.wait(timeout=timeout)


class CommandChain:
    """Backend runs one after another (e.g. ``cases add`` for each scene case, then ``train``).

    Each step is a factory returning a ready (not started) :class:`BackendProcess`, so a later step
    can depend on what earlier ones wrote. The chain stops at the first run that does not end ok.
    """

    def __init__(self, steps: Sequence[Callable[[], BackendProcess]]) -> None:
        self._steps = list(steps)
        self.index = -1
        self.current: Optional[BackendProcess] = None
        self.completed: list[BackendProcess] = []
        self.stopped = False

    @property
    def total(self) -> int:
        return len(self._steps)

    @property
    def finished(self) -> bool:
        return self.current is None and (self.index >= len(self._steps) - 1 or self.stopped) and self.index >= 0

    @property
    def ok(self) -> bool:
        return self.finished and not self.stopped and all(p.state.ok for p in self.completed) \
            and len(self.completed) == len(self._steps)

    def start(self) -> "CommandChain":
        self._advance()
        return self

    def _advance(self) -> None:
        self.index += 1
        if self.index < len(self._steps) and not self.stopped:
            self.current = self._steps[self.index]().start()
        else:
            self.current = None

    def poll(self) -> list[dict[str, Any]]:
        if self.current is None:
            return []
        events = self.current.poll()
        if self.current.finished:
            run = self.current
            self.completed.append(run)
            if not run.state.ok:
                self.stopped = True
                self.current = None
            else:
                self._advance()
        return events

    def request_stop(self) -> None:
        self.stopped = True
        if self.current is not None:
            self.current.request_stop()

    def wait(self, timeout: Optional[float] = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            self.poll()
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return self.ok

    @property
    def last(self) -> Optional[BackendProcess]:
        return self.current or (self.completed[-1] if self.completed else None)
