"""Segment: the chosen volumes through ``medtuning segment`` (MRML logic shared with the Slicer
module), the result loaded for correcting in the segment editor."""

from __future__ import annotations

import shutil
from typing import Any, Optional

from trame_slicer.segmentation import SegmentationOverwriteMode

from MedTuningLib.mrml.context import MrmlError
from MedTuningLib.mrml.jobs import Job
from MedTuningLib.mrml.logic import MedTuningMrmlLogic
from MedTuningLib.mrml.nodes import export_segmentation


class SegmentLogic:
    """Runs segmentations; keeps the current result (``mt_result``) active in the segment editor.

    The MRML logic keeps each result as the model wrote it, so that adding a corrected result as a case
    records what the model had produced (the correction effort).
    """

    def __init__(self, server: Any, slicer_app: Any, logic: MedTuningMrmlLogic, jobs: Any, scans: Any,
                 models: Any) -> None:
        self.server = server
        self.app = slicer_app
        self.logic = logic
        self.jobs = jobs
        self.scans = scans
        self.models = models
        self.result: Any = None  # the segmentation node being corrected
        self.result_volumes: list[Any] = []
        self.result_model: Any = None
        server.state.mt_result = None  # {"name", "model", "segments": [...]}
        server.state.mt_tta = False  # the page's test-time flips and fast settings for Segment
        server.state.mt_fast = False

    def segment(self) -> None:
        model = self.models.selected()
        if model is None:
            self.jobs.show_error("MODEL_FOLDER_INVALID", "no usable model is selected",
                                 "train one with 'Fine-tune on my cases' or put a model folder in the models folder")
            return
        volumes = self.scans.inputs(model.modalities)
        if not volumes or any(v is None for v in volumes):
            self.jobs.show_error("MODALITY_COUNT_MISMATCH",
                                 f"{model.name} expects {len(model.modalities)} volume(s): {', '.join(model.modalities)}",
                                 "load a scan for every modality and choose it in the list")
            return
        device, tta, fast = self.logic.settings.device, bool(self.server.state.mt_tta), bool(self.server.state.mt_fast)
        self.jobs.start("segment",
                        lambda: self.logic.start_segmentation(model, volumes, device=device, tta=tta, fast=fast),
                        after=lambda job: self._finished(job, volumes, model))

    def next_scan(self) -> None:
        """"Next scan to correct": rank the case library's unlabelled scans by the model's uncertainty
        (``medtuning suggest``), load the most uncertain one as the model's inputs and segment it."""
        model = self.models.selected()
        if model is None:
            self.jobs.show_error("MODEL_FOLDER_INVALID", "no usable model is selected",
                                 "choose a model in the list: its uncertainty ranks the scans")
            return
        self.jobs.start("suggest", lambda: self.logic.start_suggest(model, device=self.logic.settings.device),
                        after=lambda job: self._suggested(job, model))

    def _suggested(self, job: Job, model: Any) -> None:
        if not job.ok or not job.result:
            return  # a failure (e.g. no unlabelled scans: NO_TRAINING_CASES) is already shown
        top = job.result[0]
        try:
            volumes = self.logic.load_scan_to_correct(top, model)
        except MrmlError as exc:
            self.jobs.show_error(exc.code or "INVALID_OPTION", str(exc))  # the message says what to do
            return
        self.scans.use_as_inputs(volumes, model.modalities)
        self.segment()
        self.jobs.notice(f"Next scan to correct: {top['id']}, the most uncertain of {len(job.result)} "
                         f"(mean entropy {top['score']:.3f}); segmenting it.")

    def _finished(self, job: Job, volumes: list[Any], model: Any) -> None:
        if job.ok and job.result is not None:
            self.show_result(job.result, volumes, model)

    def show_result(self, node: Any, volumes: list[Any], model: Any) -> None:
        self.result, self.result_volumes, self.result_model = node, list(volumes), model
        # Only the new result shows: earlier ones stay in the scene (and in a saved .mrb), hidden.
        for other in self.app.scene.GetNodesByClass("vtkMRMLSegmentationNode"):
            display = other.GetDisplayNode()
            if other is not node and display is not None:
                display.SetVisibility(False)
        editor = self.app.segmentation_editor
        editor.deactivate_effect()
        editor.set_active_segmentation(node, volumes[0])
        # BraTS regions overlap (ET in TC in WT): an edit of one segment must not take voxels of another.
        editor.set_overwrite_mode(SegmentationOverwriteMode.ALLOW_OVERLAP)
        editor.set_surface_representation_enabled(True)
        ids = editor.get_segment_ids()
        if ids:
            editor.set_active_segment_id(ids[0])
        self.scans.show(volumes[0])
        segments = [{"name": p.name, "color": p.color_hex} for p in editor.get_all_segment_properties().values()]
        self.server.state.mt_result = {"name": node.GetName(), "model": model.name, "segments": segments}
        self.server.state.mt_tab = "correct"
        self.jobs.notice(f"{node.GetName()}: {len(segments)} segment(s). Correct them, then 'Add to my cases'.")

    def result_bytes(self) -> Optional[bytes]:
        """The current (corrected) result as a .seg.nrrd file, for the browser's download."""
        if self.result is None:
            return None
        temp = self.logic.context.new_temp_dir("download-")
        try:
            return export_segmentation(self.result, temp / "result.seg.nrrd").read_bytes()
        finally:
            shutil.rmtree(temp, ignore_errors=True)
