"""The page's backend runs: one :class:`~MedTuningLib.mrml.jobs.Job` at a time, polled by an asyncio timer.

Jobs come from :class:`MedTuningLib.mrml.logic.MedTuningMrmlLogic`, as in the 3D Slicer module: the
backend is the same separate ``python -m MedTuningLib ... --events jsonl`` process
(:class:`~MedTuningLib.slicer_bridge.process.BackendProcess`). The timer takes in what arrived every
quarter second and pushes it to the page, so no request ever waits for a backend run.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Optional

from MedTuningLib.mrml.curves import curve_label
from MedTuningLib.mrml.context import MrmlError
from MedTuningLib.mrml.jobs import Job, JobBusy, JobSlot
from MedTuningLib.slicer_bridge.events import RunState

log = logging.getLogger("MedTuning.web")
POLL_S = 0.25
CURVE_W, CURVE_H = 320.0, 120.0
CURVE_COLOURS = ("#ff8a65", "#4fc3f7", "#aed581", "#ffd54f", "#ba68c8")


def curve_view(state: RunState) -> list[dict]:
    """Training loss and validation Dice as SVG polylines (``points`` in a CURVE_W x CURVE_H box).

    Loss is scaled to its own maximum, Dice to 0..1, both over the same epoch axis.
    """
    named = [(name, curve_label(name)) for name in state.curve_names()]
    named = [(n, label) for n, label in named if label and state.curves[n]]
    if not named:
        return []
    x_max = max(max(p.x for p in state.curves[n]) for n, _ in named) or 1.0
    out = []
    for i, (name, label) in enumerate(named):
        points = state.curves[name]
        top = max(max(p.value for p in points), 1e-9) if name == "train/loss" else 1.0
        dots = [[round(CURVE_W * p.x / x_max, 1), round(CURVE_H - CURVE_H * min(p.value / top, 1.0), 1)]
                for p in points]
        out.append({"name": name, "label": label, "colour": CURVE_COLOURS[i % len(CURVE_COLOURS)],
                    "points": " ".join(f"{x},{y}" for x, y in dots), "dots": dots,
                    "last": f"{points[-1].value:.3f}", "n": len(points)})
    return out


class JobRunner:
    """Starts, polls and cancels the page's backend job; shows progress, errors and the curve."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.slot = JobSlot()
        self._handled: Optional[Job] = None
        self._after: dict[int, Callable[[Job], None]] = {}
        self._task: Optional[asyncio.Task] = None
        state = server.state
        state.mt_job_kind = ""
        state.mt_job_running = False
        state.mt_job_text = ""
        state.mt_job_progress = 0
        state.mt_curve = []
        state.mt_error = None  # {"code", "message", "hint"} as the CLI shows them
        state.mt_notice = ""
        server.controller.on_server_ready.add(self._start_timer)

    # -- messages --------------------------------------------------------------------------------
    def show_error(self, code: str, message: str, hint: str = "") -> None:
        self.server.state.mt_error = {"code": code, "message": message, "hint": hint}
        self.server.state.mt_notice = ""
        log.warning("[%s] %s %s", code, message, hint)

    def notice(self, text: str) -> None:
        self.server.state.mt_error = None
        self.server.state.mt_notice = text

    # -- jobs ------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.slot.busy

    def start(self, kind: str, factory: Callable[[], Job], after: Optional[Callable[[Job], None]] = None) -> Optional[Job]:
        """Start the job ``factory`` makes (a :class:`MedTuningMrmlLogic` ``start_*`` call); ``after`` runs at
        its end, ok or not. Refusals (a job still running, nodes that cannot be exported) are shown."""
        try:
            job = self.slot.start(factory)
        except JobBusy as exc:
            self.show_error("OUTPUT_LOCKED", str(exc), "wait for the running job or press Cancel")
            return None
        except MrmlError as exc:
            self.show_error("INVALID_OPTION", str(exc), "check the scans, the model and the result chosen")
            return None
        except OSError as exc:  # the interpreter could not be started, a folder could not be made
            self.show_error("OUTPUT_NOT_WRITABLE", f"the backend could not be started: {exc}",
                            "check the --python interpreter and that the work, models and cases folders are writable")
            return None
        job.kind = kind
        if after is not None:
            self._after[id(job)] = after
        state = self.server.state
        state.mt_job_kind, state.mt_job_running, state.mt_job_progress = kind, True, 0
        state.mt_job_text, state.mt_error, state.mt_notice = "Starting…", None, ""
        if kind in ("train", "retune"):
            state.mt_curve = []
        return job

    def cancel(self) -> None:
        job = self.slot.job
        if job is not None and not job.completed:
            job.cancel()
            self.server.state.mt_job_text = "Stopping…"

    # -- polling ---------------------------------------------------------------------------------
    def _start_timer(self, **_: Any) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run_timer())

    async def _run_timer(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                with self.server.state:
                    self.tick()
            except Exception:  # noqa: BLE001 - the timer must survive a failed update
                log.exception("MedTuning web: updating the job state failed")

    def tick(self) -> None:
        """Take in the job's new events and show them (called by the timer; never waits)."""
        job = self.slot.job
        if job is None or job is self._handled:
            return
        events = job.poll()
        state = self.server.state
        run = job.state
        if events:
            state.mt_job_text = job.step_text() + (run.status_text or "Working…")
            state.mt_job_progress = round(100 * run.progress)
            if job.kind in ("train", "retune") and any(e.get("event") == "metric" for e in events):
                state.mt_curve = curve_view(run)
        if not job.completed:
            return
        self._handled = job
        state.mt_job_running = False
        if job.ok:
            state.mt_job_progress = 100
            state.mt_job_text = f"{job.kind}: done"
        elif job.cancel_requested or run.cancelled:
            state.mt_job_text = f"{job.kind}: cancelled" + (" (resumable)" if job.kind in ("train", "retune") else "")
        elif run.error_code:
            state.mt_job_text = f"{job.kind}: failed"
            self.show_error(run.error_code, run.error_message, run.error_hint)
        else:
            state.mt_job_text = f"{job.kind}: failed"
            self.show_error("INTERNAL_ERROR", job.failure or "the backend ended without saying why",
                            "see the server's log")
        after = self._after.pop(id(job), None)
        if after is not None:
            after(job)

    def close(self) -> bool:
        """Stop the timer and the job; False when a backend process could not be stopped."""
        if self._task is not None:
            self._task.cancel()
        return self.slot.close()
