"""The page: trame-slicer's viewer layout (views, toolbar, drawer) with MedTuning's panels in the drawer.

Signals (``undo_stack.Signal``, as trame-slicer's UI classes have) are what the logic classes
connect to; the UI holds no MedTuning logic. Element ids (``mt-...``) name what a user clicks, for
people reading the page and for the browser tests.
"""

from __future__ import annotations

from typing import Any

from trame.widgets import html
from trame_client.widgets.core import AbstractElement
from trame.widgets import vuetify3 as v3
from trame_server.utils.typed_state import TypedState
from trame_slicer.app.ui import (LayoutButton, SegmentEditorToolbarUI, SegmentEditorUI, SegmentEditorUndoRedoUI,
                                 ViewerLayout)
from trame_slicer.app.ui.load_volume_ui import LoadVolumeButton, LoadVolumeState
from undo_stack import Signal

from MedTuningLib.slicer_bridge.commands import ARCHS, LABELLED_SPLITS, METHODS, TASKS


def _field(label: str, key: str, **kwargs: Any) -> Any:
    kwargs.setdefault("classes", "mb-2")
    return v3.VTextField(label=label, model_value=(f"mt_train.{key}",), density="compact", hide_details=True,
                         update_modelValue=f"mt_train = {{...mt_train, {key}: $event}}", **kwargs)


class MedTuningUI:
    segment_clicked = Signal()
    cancel_clicked = Signal()
    add_case_clicked = Signal()
    fine_tune_clicked = Signal()
    retune_clicked = Signal()
    next_scan_clicked = Signal()
    add_unlabelled_clicked = Signal()
    refresh_clicked = Signal()
    open_server_file_clicked = Signal(str)

    def __init__(self, server: Any, layout_manager: Any, download_result: Any, download_scene: Any,
                 scans_dir_text: str) -> None:
        self.server = server
        with ViewerLayout(server, title="MedTuning", is_drawer_visible=True) as self.layout:
            self.layout.title.set_text("MedTuning")
            self.layout.drawer.width = 430
            with self.layout.appbar:
                html.Div("{{ mt_job_running ? mt_job_text : '' }}", classes="text-caption mx-4", id="mt-appbar-status")
            with self.layout.drawer:
                self._messages()
                self._job_bar()
                with v3.VTabs(v_model=("mt_tab", "scans"), density="compact", grow=True):
                    v3.VTab("Scans", value="scans", id="mt-tab-scans")
                    v3.VTab("Correct", value="correct", id="mt-tab-correct")
                    v3.VTab("Cases", value="cases", id="mt-tab-cases")
                    v3.VTab("Fine-tune", value="tune", id="mt-tab-tune")
                with html.Div(v_show="mt_tab === 'scans'", classes="pa-2"):
                    self._scans_panel(scans_dir_text)
                with html.Div(v_show="mt_tab === 'correct'", classes="pa-2", style="height: calc(100% - 160px);"):
                    html.Div("Segment a scan first: its result is corrected here.", v_if="!mt_result",
                             classes="text-medium-emphasis")
                    with html.Div(v_if="mt_result", classes="mb-2"):
                        html.Div("{{ mt_result.name }}", classes="text-subtitle-2", id="mt-result-name")
                        v3.VBtn("Download result (.seg.nrrd)", id="mt-download", size="small", variant="tonal",
                                prepend_icon="mdi-download", classes="mt-1",
                                click=f"utils.download('result.seg.nrrd', trigger('{server.controller.trigger_name(download_result)}'), 'application/octet-stream')")
                        v3.VBtn("Save scene (.mrb)", id="mt-save-scene", size="small", variant="tonal",
                                prepend_icon="mdi-content-save", classes="mt-1 ml-1",
                                click=f"utils.download('MedTuning scene.mrb', trigger('{server.controller.trigger_name(download_scene)}'), 'application/octet-stream')")
                    self.editor = SegmentEditorUI(v_if=("mt_result",))
                with html.Div(v_show="mt_tab === 'cases'", classes="pa-2"):
                    self._cases_panel()
                with html.Div(v_show="mt_tab === 'tune'", classes="pa-2"):
                    self._tune_panel()
            with self.layout.toolbar:
                self.layout_button = LayoutButton(classes="mt-1")
                SegmentEditorToolbarUI(editor_ui=self.editor, v_if=("mt_result",))
            with self.layout.undo_redo:
                SegmentEditorUndoRedoUI(editor_ui=self.editor, v_if=("mt_result",))
            with self.layout.content:
                layout_manager.initialize_layout_grid(self.layout)

    # -- parts -----------------------------------------------------------------------------------
    def _messages(self) -> None:
        with v3.VAlert(v_if=("mt_error",), type="error", density="compact", variant="tonal", classes="ma-2",
                       closable=True, click_close="mt_error = null", id="mt-error"):
            html.Div("[{{ mt_error.code }}] {{ mt_error.message }}", id="mt-error-text")
            html.Div("{{ mt_error.hint }}", v_if=("mt_error.hint",), classes="text-caption", id="mt-error-hint")
        v3.VAlert(v_if=("mt_notice && !mt_error",), text=("mt_notice",), type="info", density="compact",
                  variant="tonal", classes="ma-2", id="mt-notice")

    def _job_bar(self) -> None:
        with html.Div(v_if=("mt_job_kind",), classes="px-2 pb-2"):
            with html.Div(classes="d-flex align-center"):
                html.Div("{{ mt_job_text }}", classes="text-caption flex-grow-1", id="mt-job-text")
                v3.VBtn("Cancel", v_if=("mt_job_running",), size="small", color="warning", variant="tonal",
                        click=self.cancel_clicked, id="mt-cancel")
            v3.VProgressLinear(model_value=("mt_job_progress",), indeterminate=("mt_job_running && !mt_job_progress",),
                               color="primary", height=6, id="mt-job-progress")

    def _scans_panel(self, scans_dir_text: str) -> None:
        html.Div("Scans", classes="text-subtitle-2")
        typed = TypedState(self.server.state, LoadVolumeState)
        with html.Div(classes="d-flex align-center", id="mt-upload"):
            self.upload_button = LoadVolumeButton(name="Upload scans (NRRD, NIfTI, MHA)", load_directory=False,
                                                  icon="mdi-file-upload",
                                                  typed_state=typed.get_sub_state(typed.name.file_button))
            html.Span("Upload scans (one per modality)", classes="text-caption")
        with html.Div(v_if=("mt_server_files.length",), classes="d-flex align-center"):
            v3.VSelect(label=f"Server folder {scans_dir_text}", items=("mt_server_files",), v_model=("mt_server_file",),
                       density="compact", hide_details=True, id="mt-server-file")
            v3.VBtn("Open", size="small", variant="tonal", classes="ml-2", id="mt-open-server-file",
                    disabled=("!mt_server_file",), click=(self.open_server_file_clicked, "[mt_server_file]"))
        html.Div("Loaded: {{ mt_volumes.map(v => v.name).join(', ') || 'none' }}", classes="text-caption mb-2",
                 id="mt-volumes")
        with html.Div(classes="d-flex align-center mt-2"):
            html.Div("Models", classes="text-subtitle-2 flex-grow-1")
            v3.VBtn(icon="mdi-refresh", size="x-small", variant="text", click=self.refresh_clicked, id="mt-refresh")
        html.Div("No model folder yet: fine-tune one on your cases.", v_if="!mt_models.length",
                 classes="text-caption")
        with v3.VTable(density="compact", v_if="mt_models.length", id="mt-models"):
            with html.Tbody():
                with html.Tr(v_for="m in mt_models", key="m.path", click="m.usable && (mt_model_path = m.path)",
                             style="cursor: pointer", classes=("{'bg-primary': m.path === mt_model_path}",),
                             raw_attrs=[':data-model="m.name"']):
                    with html.Td():
                        html.Div("{{ m.name }}", classes="font-weight-medium")
                        v3.VChip("not pretrained", v_if="!m.pretrained", size="x-small", color="warning",
                                 classes="mr-1", raw_attrs=['data-badge="not-pretrained"'])
                        html.Div("{{ m.task }} · {{ m.modalities.join(', ') }} · {{ m.size }}", classes="text-caption")
                        html.Div("{{ m.dice }}", v_if="m.dice", classes="text-caption")
                        html.Div("{{ m.problem }}", v_if="m.problem", classes="text-caption text-error")
                        with html.Div():
                            v3.VChip("{{ s.name }}", v_for="s in m.segments", key="s.name", size="x-small",
                                     classes="mr-1 mb-1", color=("s.color",), variant="flat")
        with html.Div(v_if=("mt_model_path && mt_volumes.length",), classes="mt-2"):
            v3.VSelect(v_for="(vid, modality) in mt_inputs", key="modality", label=("modality",),
                       items=("mt_volumes",), item_title="name", item_value="id", model_value=("vid",),
                       update_modelValue="mt_inputs = {...mt_inputs, [modality]: $event}", density="compact",
                       hide_details=True, classes="mb-2")
        with html.Div(classes="d-flex"):
            v3.VCheckbox(label="test-time flips", v_model=("mt_tta", False), density="compact", hide_details=True,
                         id="mt-tta")
            v3.VCheckbox(label="fast (no overlap; int8 on a CPU)", v_model=("mt_fast", False), density="compact",
                         hide_details=True, id="mt-fast")
        v3.VBtn("Segment", block=True, color="primary", prepend_icon="mdi-creation", classes="mt-2", id="mt-segment",
                disabled=("mt_job_running || !mt_model_path || !mt_volumes.length",), click=self.segment_clicked)
        v3.VBtn("Next scan to correct", block=True, variant="tonal", prepend_icon="mdi-skip-next", classes="mt-2",
                id="mt-next-scan", disabled=("mt_job_running || !mt_model_path",), click=self.next_scan_clicked,
                title="Rank my case library's unlabelled scans by the model's uncertainty, load the most uncertain "
                      "one and segment it for correcting")
        v3.VBtn("Add to my cases without a label", block=True, variant="text", prepend_icon="mdi-folder-plus-outline",
                classes="mt-1", id="mt-add-unlabelled",
                disabled=("mt_job_running || !mt_model_path || !mt_volumes.length",),
                click=self.add_unlabelled_clicked,
                title="An unlabelled scan is never trained on; Next scan to correct ranks it")

    def _cases_panel(self) -> None:
        html.Div("Add the corrected result to my cases", classes="text-subtitle-2")
        with html.Div(classes="d-flex align-center"):
            v3.VSelect(label="split", items=("mt_splits", list(LABELLED_SPLITS)), v_model=("mt_split",),
                       density="compact", hide_details=True, style="max-width: 120px", id="mt-split")
            v3.VTextField(label="case id (optional)", v_model=("mt_case_id",), density="compact", hide_details=True,
                          classes="ml-2", id="mt-case-id")
        v3.VBtn("Add to my cases", block=True, color="primary", prepend_icon="mdi-folder-plus", classes="my-2",
                id="mt-add-case", disabled=("mt_job_running || !mt_result",), click=self.add_case_clicked)
        html.Div("My cases ({{ mt_cases.length }})", classes="text-subtitle-2")
        with v3.VTable(density="compact", id="mt-cases"):
            with html.Thead():
                with html.Tr():
                    for title in ("case", "split", "provenance", "correction effort"):
                        html.Th(title)
            with html.Tbody():
                with html.Tr(v_for="c in mt_cases", key="c.id", raw_attrs=[':data-case="c.id"']):
                    html.Td("{{ c.id }}")
                    html.Td("{{ c.split }}")
                    html.Td("{{ c.provenance }}", classes="text-caption")
                    html.Td("{{ c.effort }}", classes="text-caption")

    def _tune_panel(self) -> None:
        self._curve()
        html.Div("Re-tune the selected model on my cases (warm start)", classes="text-subtitle-2")
        with html.Div(classes="d-flex align-center"):
            v3.VTextField(label="epochs", v_model=("mt_retune_epochs",), type="number", density="compact",
                          hide_details=True, style="max-width: 100px", id="mt-retune-epochs")
            v3.VBtn("Re-tune now", color="primary", prepend_icon="mdi-refresh-auto", classes="ml-2 flex-grow-1",
                    id="mt-retune", disabled=("mt_job_running || !mt_model_path || !mt_cases.length",),
                    click=self.retune_clicked)
        v3.VDivider(classes="my-3")
        html.Div("Fine-tune on my cases", classes="text-subtitle-2")
        html.Div("{{ mt_cases.length }} case(s); modalities (channel order): "
                 "{{ [...new Set(mt_cases.map(c => c.modalities))].join(' | ') || 'none yet' }}",
                 classes="text-caption mb-1", id="mt-train-modalities")
        _field("new model name", "name", id="mt-train-name")
        with html.Div(classes="d-flex"):
            v3.VSelect(label="task", items=("mt_tasks", list(TASKS)), model_value=("mt_train.task",), density="compact",
                       hide_details=True, classes="mb-2 mr-1", update_modelValue="mt_train = {...mt_train, task: $event}")
            v3.VSelect(label="architecture", items=("mt_archs", list(ARCHS)), model_value=("mt_train.arch",),
                       density="compact", hide_details=True, classes="mb-2",
                       update_modelValue="mt_train = {...mt_train, arch: $event}")
        with html.Div(classes="d-flex"):
            v3.VSelect(label="method", items=("mt_methods", list(METHODS)), model_value=("mt_train.method",),
                       density="compact", hide_details=True, classes="mb-2 mr-1",
                       update_modelValue="mt_train = {...mt_train, method: $event}")
            _field("base weights (hub, none or a file)", "weights", id="mt-train-weights")
        _field("timm backbone (empty: the paper's)", "backbone", id="mt-train-backbone")
        _field("segments (custom task, comma-separated; empty: all)", "segments", id="mt-train-segments")
        with html.Div(classes="d-flex"):
            _field("epochs", "epochs", type="number", classes="mb-2 mr-1", id="mt-train-epochs")
            _field("minutes (budget)", "minutes", type="number", id="mt-train-minutes")
        with v3.VExpansionPanels(variant="accordion", classes="mb-2"):
            with v3.VExpansionPanel(title="Advanced"):
                with v3.VExpansionPanelText():
                    _field("crop DxHxW", "crop", id="mt-train-crop")
                    _field("batch", "batch", type="number", id="mt-train-batch")
                    _field("steps per epoch (empty: one pass)", "steps_per_epoch", type="number", id="mt-train-steps")
                    _field("working spacing mm (auto, native, 1.5 or X,Y,Z)", "spacing", id="mt-train-spacing")
        v3.VBtn("Fine-tune on my cases", block=True, color="primary", prepend_icon="mdi-school", id="mt-fine-tune",
                disabled=("mt_job_running || !mt_cases.length",), click=self.fine_tune_clicked)

    def _curve(self) -> None:
        with html.Div(v_if=("mt_curve.length",), classes="mb-3", id="mt-curve"):
            html.Div("Training curve (loss scaled to its maximum, Dice 0-1, per epoch)", classes="text-caption")
            with html.Svg(width="100%", height="130", style="background: rgba(255,255,255,0.04)",
                          raw_attrs=['viewBox="-4 -4 328 128"']):
                with AbstractElement("g", v_for="c in mt_curve", key="c.name"):
                    AbstractElement("polyline", raw_attrs=[':points="c.points"', ':stroke="c.colour"', 'fill="none"',
                                                           'stroke-width="2"'])
                    AbstractElement("circle", v_for="(d, n) in c.dots", key="n",
                                    raw_attrs=[':cx="d[0]"', ':cy="d[1]"', 'r="3"', ':fill="c.colour"'])
            with html.Div():
                html.Span("● {{ c.label }} {{ c.last }}", v_for="c in mt_curve", key="c.name",
                          style=("{color: c.colour, marginRight: '10px'}",), classes="text-caption",
                          raw_attrs=[':data-curve="c.name"'])
