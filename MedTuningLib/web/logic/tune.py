"""Fine-tune on my cases (a new model from the library) and Re-tune now (warm start from the
selected model), with the live curve the job runner draws."""

from __future__ import annotations

from typing import Any, Optional

from MedTuningLib.mrml.logic import MedTuningMrmlLogic
from MedTuningLib.slicer_bridge.commands import checked_spacing

TRAIN_DEFAULTS = {"name": "my-model", "task": "custom", "arch": "vit_upernet", "backbone": "", "method": "med_tuning",
                  "weights": "hub", "labels": "", "segments": "", "epochs": 50, "minutes": None, "crop": "16x128x128",
                  "batch": 2, "steps_per_epoch": None, "spacing": ""}


def _positive(value: Any, kind: type) -> Optional[Any]:
    if value in (None, ""):
        return None
    number = kind(value)
    if number <= 0:
        raise ValueError(f"{value} is not a positive number")
    return number


def _crop(text: str) -> Optional[tuple]:
    if not text:
        return None
    dims = tuple(int(p) for p in str(text).lower().replace("×", "x").split("x"))
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(f"crop must look like DxHxW (e.g. 16x128x128), not {text!r}")
    return dims


class TuneLogic:
    def __init__(self, server: Any, logic: MedTuningMrmlLogic, jobs: Any, models: Any, cases: Any) -> None:
        self.server = server
        self.logic = logic
        self.jobs = jobs
        self.models = models
        self.cases = cases
        server.state.mt_train = dict(TRAIN_DEFAULTS)
        server.state.mt_retune_epochs = 10

    def _budget(self, form: dict) -> dict:
        """The options a radiologist sets (budget) and the advanced ones, checked before any run."""
        return {"epochs": _positive(form.get("epochs"), int), "minutes": _positive(form.get("minutes"), float),
                "crop": _crop(form.get("crop") or ""), "batch": _positive(form.get("batch"), int),
                "steps_per_epoch": _positive(form.get("steps_per_epoch"), int),
                "spacing": checked_spacing(str(form.get("spacing") or ""))}

    def fine_tune(self) -> None:
        form = dict(self.server.state.mt_train or {})
        try:
            train = self._budget(form)
        except ValueError as exc:
            self.jobs.show_error("INVALID_OPTION", str(exc), "correct the fine-tune settings")
            return
        extra = [f"--segments={form['segments']}"] if form.get("segments") else []
        self.jobs.start("train", lambda: self.logic.start_fine_tune(
            [], [], form.get("name") or "my-model", task=form.get("task") or "custom", labels=form.get("labels") or None,
            arch=form.get("arch") or None, backbone=form.get("backbone") or None, weights=form.get("weights") or None,
            method=form.get("method") or None, extra=extra, **train), after=self._finished)

    def retune(self) -> None:
        model = self.models.selected()
        if model is None:
            self.jobs.show_error("MODEL_FOLDER_INVALID", "no usable model is selected to re-tune",
                                 "choose a model in the list (or fine-tune one first)")
            return
        form = dict(self.server.state.mt_train or {})
        try:
            epochs = _positive(self.server.state.mt_retune_epochs, int) or 1
            steps = _positive(form.get("steps_per_epoch"), int)
        except ValueError as exc:
            self.jobs.show_error("INVALID_OPTION", str(exc), "give a positive number of epochs")
            return
        # Task, labels, modalities, architecture and base weights come from the model folder.
        self.jobs.start("retune", lambda: self.logic.start_retune(model, epochs, device=self.logic.settings.device,
                                                                  steps_per_epoch=steps),
                        after=self._finished)

    def _finished(self, job: Any) -> None:
        if job.ok and job.result is not None:
            self.models.refresh(select=job.result)
            self.jobs.notice(f"New model {job.result.name} is selected: press Segment to use it.")
        self.cases.refresh()
