"""The event stream every sub-command writes (docs/method.md, "Contracts").

With ``--events jsonl`` each event is one JSON object on one line of stdout and nothing else is
written to stdout; otherwise events are shown as human-readable lines and a progress bar on stderr.
Every event carries ``t``, seconds since the command started. Readers ignore unknown fields and
event kinds, so the stream can grow.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from typing import IO, Any

from MedTuningLib import __version__

EVENT_KINDS = ("start", "progress", "metric", "log", "checkpoint", "error", "done")


def _utf8_text(text: str) -> str:
    """File names that are not valid UTF-8 reach Python as lone surrogates (surrogateescape);
    a UTF-8 stream cannot carry those, so they become U+FFFD instead of crashing the writer."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:  # undo surrogateescape, then mark the undecodable bytes
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # other lone surrogates
        return text.encode("utf-8", "replace").decode("utf-8")


def _json_safe(value: Any) -> Any:
    """JSON has no NaN/Infinity: write them as null so every line stays valid JSON.
    Strings are made encodable as UTF-8."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str):
        return _utf8_text(value)
    if isinstance(value, dict):
        return {_utf8_text(str(k)): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _json_safe(value.item())
    if hasattr(value, "__fspath__"):
        return _utf8_text(str(value))
    return value


class EventStream:
    """Writes events either as JSON lines (machine mode) or as human-readable text."""

    def __init__(self, mode: str = "text", out: IO[str] | None = None, err: IO[str] | None = None,
                 enabled: bool = True) -> None:
        if mode not in ("text", "jsonl"):
            raise ValueError(f"events mode must be 'text' or 'jsonl', not {mode!r}")
        self.mode = mode
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        # Non-zero ranks of a distributed run keep quiet: only rank 0 reports.
        self.enabled = enabled
        self.t0 = time.monotonic()
        self._lock = threading.Lock()
        self._bar_open = False

    @property
    def jsonl(self) -> bool:
        return self.mode == "jsonl"

    def emit(self, event: str, **fields: Any) -> dict:
        record = {"event": event, **fields, "t": round(time.monotonic() - self.t0, 3)}
        record = _json_safe(record)
        if not self.enabled:
            return record
        with self._lock:
            if self.jsonl:
                self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
                self.out.flush()
            else:
                self._write_human(record)
        return record

    # -- shorthands -----------------------------------------------------------------------------
    def start(self, command: str, device: str | None = None, **fields: Any) -> dict:
        return self.emit("start", command=command, version=__version__, device=device, **fields)

    def progress(self, phase: str, step: int, total: int | None = None, **fields: Any) -> dict:
        return self.emit("progress", phase=phase, step=step, total=total, **fields)

    def metric(self, phase: str, name: str, value: float, **fields: Any) -> dict:
        return self.emit("metric", phase=phase, name=name, value=value, **fields)

    def log(self, message: str, level: str = "info", **fields: Any) -> dict:
        return self.emit("log", level=level, message=message, **fields)

    def warning(self, message: str, **fields: Any) -> dict:
        return self.log(message, level="warning", **fields)

    def checkpoint(self, path: str, epoch: int, best: bool, **fields: Any) -> dict:
        return self.emit("checkpoint", path=str(path), epoch=epoch, best=best, **fields)

    def error(self, code: str, message: str, hint: str = "", **fields: Any) -> dict:
        return self.emit("error", code=code, message=message, hint=hint, **fields)

    def done(self, status: str = "ok", outputs: dict | None = None, **fields: Any) -> dict:
        return self.emit("done", status=status, outputs=outputs or {}, **fields)

    # -- human rendering --------------------------------------------------------------------------
    def _write_human(self, r: dict) -> None:
        kind = r["event"]
        if kind == "progress":
            self._draw_bar(r)
            return
        self._end_bar()
        if kind == "start":
            line = f"medtuning {r.get('command')} {r.get('version')} on {r.get('device') or 'cpu'}"
        elif kind == "metric":
            epoch = f" epoch {r['epoch']}" if r.get("epoch") is not None else ""
            value = r.get("value")
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            line = f"  {r.get('phase')}{epoch} {r.get('name')} = {shown}"
        elif kind == "log":
            prefix = "warning: " if r.get("level") == "warning" else ""
            line = f"{prefix}{r.get('message')}"
        elif kind == "checkpoint":
            line = f"  saved {'best ' if r.get('best') else ''}checkpoint (epoch {r.get('epoch')}): {r.get('path')}"
        elif kind == "error":
            line = f"error [{r.get('code')}]: {r.get('message')}"
            if r.get("hint"):
                line += f"\n  what to do: {r['hint']}"
        elif kind == "done":
            outputs = r.get("outputs") or {}
            # Only the paths and short values; full figures are in the jsonl stream.
            shown = {k: v for k, v in outputs.items() if isinstance(v, (str, int, float)) and len(str(v)) < 200}
            line = f"done ({r.get('status')})" + "".join(f"\n  {k}: {v}" for k, v in shown.items())
        else:
            line = json.dumps(r)
        stream = self.err if kind in ("error", "log") else self.out
        stream.write(line + "\n")
        stream.flush()

    def _draw_bar(self, r: dict) -> None:
        step, total = r.get("step") or 0, r.get("total")
        width = 30
        if total:
            filled = int(width * min(step, total) / total)
            bar = "#" * filled + "-" * (width - filled)
            text = f"\r{r.get('phase', ''):>8} [{bar}] {step}/{total}"
        else:
            text = f"\r{r.get('phase', ''):>8} step {step}"
        if r.get("epoch") is not None:
            text += f" epoch {r['epoch']}/{r.get('epochs', '?')}"
        if r.get("eta_s") is not None:
            text += f" eta {r['eta_s']:.0f}s"
        self.err.write(text)
        self.err.flush()
        self._bar_open = True

    def _end_bar(self) -> None:
        if self._bar_open:
            self.err.write("\n")
            self._bar_open = False
