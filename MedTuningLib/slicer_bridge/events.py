"""Reading the backend's ``--events jsonl`` stream into a progress state the UI can show.

:class:`EventReader` takes stdout in whatever chunks the pipe delivers (half a line, several
lines, a multi-byte letter split in two) and yields complete events. Lines that are not JSON
objects (a stray print from a library) are kept as ``noise`` instead of failing the run.
:class:`RunState` folds events into what the module displays: phase, progress fraction, ETA, last
loss, last validation Dice per region, a status line, the error (code, message, hint), outputs, and
the points of the training curves. Unknown event kinds and fields are ignored (docs/method.md: the
stream can grow).
"""

from __future__ import annotations

import codecs
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

#: Noise lines kept for the log; older ones are dropped.
MAX_NOISE_LINES = 200
#: A line longer than this without a newline is flushed as noise (a runaway print, not an event).
MAX_LINE_CHARS = 1 << 20


def parse_line(line: str) -> Optional[dict[str, Any]]:
    """One event from one line, or None when the line is not a JSON object with an ``event`` name."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("event"), str):
        return None
    return value


class EventReader:
    """Incremental line splitter: feed bytes or text chunks, get complete events back."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self.noise: list[str] = []

    def feed(self, chunk: Union[bytes, str]) -> list[dict[str, Any]]:
        """Add a chunk; return the events of every line it completed."""
        text = self._decoder.decode(chunk) if isinstance(chunk, bytes) else chunk
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        if len(self._buffer) > MAX_LINE_CHARS:
            lines.append(self._buffer)
            self._buffer = ""
        return self._parse(lines)

    def close(self) -> list[dict[str, Any]]:
        """End of stream: a last line without a newline still counts."""
        rest = self._buffer + self._decoder.decode(b"", final=True)
        self._buffer = ""
        return self._parse([rest]) if rest.strip() else []

    def _parse(self, lines: Iterable[str]) -> list[dict[str, Any]]:
        events = []
        for line in lines:
            line = line.rstrip("\r")
            event = parse_line(line)
            if event is not None:
                events.append(event)
            elif line.strip():
                self.noise.append(line)
                del self.noise[:-MAX_NOISE_LINES]
        return events


def _number(value: Any) -> Optional[float]:
    """A finite float, or None (the backend writes NaN as null; strings are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _int(value: Any) -> Optional[int]:
    number = _number(value)
    return int(number) if number is not None else None


def format_duration(seconds: Optional[float]) -> str:
    """``85`` -> ``"1:25"``, ``4000`` -> ``"1:06:40"``; empty for unknown."""
    if seconds is None or seconds < 0:
        return ""
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


PHASE_WORDS = {"prepare": "Preparing", "train": "Training", "validate": "Validating", "infer": "Segmenting",
               "write": "Writing results"}


@dataclass
class CurvePoint:
    x: float  # epoch where the event has one, else the event's time
    value: float


@dataclass
class RunState:
    """What the UI shows about one backend run, built from its events."""

    command: str = ""
    version: str = ""
    device: str = ""
    phase: str = ""
    step: Optional[int] = None
    total: Optional[int] = None
    epoch: Optional[int] = None
    epochs: Optional[int] = None
    progress: float = 0.0  # 0..1 of the current phase; never goes back within a phase
    eta_s: Optional[float] = None
    last_loss: Optional[float] = None
    val_dice: dict[str, float] = field(default_factory=dict)
    status_text: str = ""
    warnings: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    error_code: str = ""
    error_message: str = ""
    error_hint: str = ""
    done_status: str = ""  # "ok" / "cancelled" once the done event arrived
    outputs: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    curves: dict[str, list[CurvePoint]] = field(default_factory=dict)
    events_seen: int = 0
    _epoch_base: int = 1  # epochs are 1-based unless the stream shows an epoch 0
    _bar_phase: str = ""

    # -- results ---------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return bool(self.done_status or self.error_code)

    @property
    def ok(self) -> bool:
        return self.done_status == "ok" and not self.error_code

    @property
    def cancelled(self) -> bool:
        return self.done_status == "cancelled"

    def curve_names(self) -> list[str]:
        return sorted(self.curves)

    # -- folding events --------------------------------------------------------------------------
    def apply_all(self, events: Iterable[dict[str, Any]]) -> None:
        for event in events:
            self.apply(event)

    def apply(self, event: dict[str, Any]) -> None:
        """Fold one event into the state; unknown kinds are ignored."""
        handler = getattr(self, f"_on_{event.get('event')}", None)
        if handler is None:
            return
        self.events_seen += 1
        handler(event)

    def _on_start(self, e: dict[str, Any]) -> None:
        self.command = str(e.get("command") or self.command)
        self.version = str(e.get("version") or "")
        self.device = str(e.get("device") or "")
        self.status_text = f"Started {self.command}" + (f" on {self.device}" if self.device else "")

    def _on_progress(self, e: dict[str, Any]) -> None:
        self.phase = str(e.get("phase") or self.phase)
        self.step, self.total = _int(e.get("step")), _int(e.get("total"))
        epoch, epochs = _int(e.get("epoch")), _int(e.get("epochs"))
        if epoch == 0:
            self._epoch_base = 0
        self.epoch, self.epochs = epoch, epochs if epochs is not None else self.epochs
        self.eta_s = _number(e.get("eta_s"))
        fraction = self._fraction()
        if fraction is not None:
            fraction = min(1.0, max(0.0, fraction))
            if self.phase == "validate" and self._bar_phase == "train":
                pass  # validation inside training: the bar keeps showing training progress
            elif self.phase != self._bar_phase:
                self._bar_phase, self.progress = self.phase, fraction  # each phase fills the bar anew
            else:
                self.progress = max(self.progress, fraction)
        self.status_text = self._progress_text()

    def _fraction(self) -> Optional[float]:
        within = (self.step / self.total) if (self.step is not None and self.total) else None
        if self.epoch is not None and self.epochs:
            done_epochs = self.epoch - self._epoch_base
            return (done_epochs + (within if within is not None else 0.0)) / self.epochs
        return within

    def _progress_text(self) -> str:
        words = [PHASE_WORDS.get(self.phase, self.phase.capitalize() or "Working")]
        if self.epoch is not None:
            shown = self.epoch + (1 - self._epoch_base)
            words.append(f"epoch {shown}/{self.epochs}" if self.epochs else f"epoch {shown}")
        if self.step is not None:
            words.append(f"step {self.step}/{self.total}" if self.total else f"step {self.step}")
        if self.last_loss is not None and self.phase == "train":
            words.append(f"loss {self.last_loss:.4f}")
        if self.val_dice:
            words.append("Dice " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(self.val_dice.items())))
        if self.eta_s is not None:
            words.append(f"{format_duration(self.eta_s)} left")
        return " · ".join(words)

    def _on_metric(self, e: dict[str, Any]) -> None:
        name, value = e.get("name"), _number(e.get("value"))
        if not isinstance(name, str) or value is None:
            return
        phase = str(e.get("phase") or "")
        if name == "loss" and phase in ("train", ""):
            self.last_loss = value
        if name.startswith("dice/") and phase in ("validate", ""):
            self.val_dice[name.split("/", 1)[1]] = value
        x = _number(e.get("epoch"))
        if x is None:
            x = _number(e.get("t")) or float(len(self.curves.get(name, ())))
        key = f"{phase}/{name}" if phase else name
        self.curves.setdefault(key, []).append(CurvePoint(x, value))
        if self.phase:
            self.status_text = self._progress_text()

    def _on_log(self, e: dict[str, Any]) -> None:
        message = str(e.get("message") or "")
        self.logs.append(message)
        if e.get("level") == "warning":
            self.warnings.append(message)

    def _on_checkpoint(self, e: dict[str, Any]) -> None:
        self.checkpoints.append({k: e.get(k) for k in ("path", "epoch", "best")})

    def _on_error(self, e: dict[str, Any]) -> None:
        self.error_code = str(e.get("code") or "INTERNAL_ERROR")
        self.error_message = str(e.get("message") or "")
        self.error_hint = str(e.get("hint") or "")
        self.status_text = f"Error [{self.error_code}]: {self.error_message}"

    def _on_done(self, e: dict[str, Any]) -> None:
        self.done_status = str(e.get("status") or "ok")
        outputs = e.get("outputs")
        self.outputs = dict(outputs) if isinstance(outputs, dict) else {}
        if self.done_status == "ok":
            self.progress = 1.0
            self.status_text = "Done"
        elif self.done_status == "cancelled":
            self.status_text = "Cancelled (the run can be resumed)" if self.command == "train" else "Cancelled"
        else:
            self.status_text = f"Finished: {self.done_status}"

    # -- after the process ended -----------------------------------------------------------------
    def finish_without_events(self, exit_text: str, stderr_tail: str = "") -> None:
        """The process ended without an error or done event (crash, kill): say so."""
        if self.finished:
            return
        self.error_code = self.error_code or "PROCESS_ENDED"
        self.error_message = exit_text
        self.error_hint = stderr_tail.strip()[-2000:]
        self.status_text = exit_text
