"""MedTuning: segment with Med-Tuning models, fine-tune them on your own cases, correct and re-tune.

Qt wiring only: the widgets of ``Resources/UI/MedTuning.ui`` are connected to
``MedTuningLib.mrml`` (Qt-free MRML logic: node export, case plans, result loading, terminology,
curves, backend jobs; tested on slicer-core) and ``MedTuningLib.slicer_bridge`` (commands, events,
process, settings). The backend runs as a separate process (``python -m MedTuningLib ...
--events jsonl``) that a timer polls. What this file imports when Slicer scans modules is only
what Slicer's Python ships (``Testing/test_slicer_startup_imports.py``).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Callable, Optional

import ctk
import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin


def _find_library_root() -> str:
    """Where ``MedTuningLib`` and ``Resources`` are: next to this file in a built extension (CMake
    copies them there), one folder up in the source tree ("Add module path" on ``MedTuning/``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (here, os.path.dirname(here)):
        if os.path.isdir(os.path.join(root, "MedTuningLib")):
            return root
    return here


LIBRARY_ROOT = _find_library_root()
if LIBRARY_ROOT not in sys.path:
    sys.path.insert(0, LIBRARY_ROOT)

from MedTuningLib.mrml import (BatchSegmentation, Job, JobBusy, JobSlot, MedTuningMrmlLogic,  # noqa: E402
                               MrmlContext, MrmlError, SceneCaseList, embedded_plot_view_node, scene_volumes,
                               study_volumes)
from MedTuningLib.slicer_bridge.commands import ARCHS, METHODS  # noqa: E402
from MedTuningLib.slicer_bridge.settings import (BridgeSettings, DependencyReport, ModelInfo,  # noqa: E402
                                                 backend_environment, default_backend_python, discover_models,
                                                 parse_probe_output, pip_constraints, pip_install_args,
                                                 probe_argv, read_case_library, read_model_info)

SETTINGS_PREFIX = "MedTuning/"
MAX_MODALITIES = 4
POLL_INTERVAL_MS = 250
#: ``segmentScopeComboBox`` entries: the inputs above, every scene volume, the input's DICOM study
SCOPE_INPUTS, SCOPE_SCENE, SCOPE_STUDY = 0, 1, 2
CASE_KEY_ROLE = qt.Qt.UserRole  # a table row names its scene case by key, never by position


def resourcePath(relative: str) -> str:
    return os.path.join(LIBRARY_ROOT, "Resources", relative)


def connectParameterGui(parameterNode, ui) -> int:
    """``parameterNode.connectGui(ui)`` that returns the tag on every Slicer version.

    Slicer 5.4-5.8 ``connectGui`` returns None (``disconnectGui`` then does nothing and every enter
    adds connections); ``connectParametersToGui`` returns the tag on all of them.
    """
    mapping = {}
    for widget in ui.__dict__.values():
        prop = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
        if prop:
            mapping[str(prop)] = widget
    return parameterNode.connectParametersToGui(mapping)


#
# Module
#

class MedTuning(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedTuning")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedTuning developers"]
        self.parent.helpText = _(
            "Segment CT and MRI volumes with Med-Tuning models (Med-Adapters on a frozen pretrained vision "
            "transformer), fine-tune a model on your own labelled cases, correct results and re-tune. "
            "Training and segmentation run in a separate process; Slicer stays responsive.")
        self.parent.acknowledgementText = _(
            "Med-Tuning: parameter-efficient transfer learning with fine-grained feature enhancement for medical "
            "volumetric segmentation (Wang et al.). Uses PyTorch, timm, MONAI and slicerio.")
        iconPath = resourcePath("Icons/MedTuning.png")
        if os.path.isfile(iconPath):
            self.parent.icon = qt.QIcon(iconPath)


#
# Parameters (saved with the scene)
#

@parameterNodeWrapper
class MedTuningParameterNode:
    inputVolume1: vtkMRMLScalarVolumeNode
    inputVolume2: vtkMRMLScalarVolumeNode
    inputVolume3: vtkMRMLScalarVolumeNode
    inputVolume4: vtkMRMLScalarVolumeNode
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    outputSegmentation: vtkMRMLSegmentationNode  # None: create a new node (never overwrite unasked)
    tta: bool = False
    fast: bool = False  # segment --fast: no window overlap, int8 on a CPU
    task: Annotated[str, Choice(["custom", "kits", "brats"])] = "custom"
    labels: str = ""
    modalityNames: str = "CT"
    weightsSource: Annotated[str, Choice(["hub", "file", "none"])] = "hub"
    continueFromModel: bool = False
    epochs: Annotated[int, WithinRange(1, 10000)] = 50
    minutes: Annotated[float, WithinRange(0.0, 100000.0)] = 0.0
    newModelName: str = ""
    arch: Annotated[str, Choice(list(ARCHS))] = "vit_upernet"
    method: Annotated[str, Choice(list(METHODS))] = "med_tuning"
    crop: str = ""
    batch: Annotated[int, WithinRange(1, 256)] = 2
    spacing: str = ""  # working spacing: empty = auto
    caseSplit: Annotated[str, Choice(["train", "val", "test"])] = "train"
    retuneEpochs: Annotated[int, WithinRange(1, 1000)] = 10


#
# Logic
#

class MedTuningLogic(ScriptedLoadableModuleLogic):
    """Slicer's side of the logic: settings in QSettings, the backend interpreter and its environment,
    dependencies. Everything between nodes and jobs is ``self.mrml`` (:class:`MedTuningMrmlLogic`)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.settings = self.loadSettings()
        self.extraModelFolders: list = []
        self.context = MrmlContext.from_slicer()
        self.mrml = MedTuningMrmlLogic(self.context, self.settings, library_root=LIBRARY_ROOT)
        self.refreshBackend()

    def getParameterNode(self):
        return MedTuningParameterNode(super().getParameterNode())

    # -- settings --------------------------------------------------------------------------------
    @staticmethod
    def loadSettings() -> BridgeSettings:
        store = qt.QSettings()
        values = {key: store.value(SETTINGS_PREFIX + key) for key in BridgeSettings().to_dict()}
        return BridgeSettings.from_dict({k: v for k, v in values.items() if v is not None})

    def saveSettings(self) -> None:
        store = qt.QSettings()
        for key, value in self.settings.to_dict().items():
            store.setValue(SETTINGS_PREFIX + key, value)
        self.refreshBackend()

    def backendPython(self) -> str:
        return self.settings.resolved_python(slicer.app.slicerHome)

    def usesSlicerPython(self) -> bool:
        return os.path.normcase(self.backendPython()) == os.path.normcase(default_backend_python(slicer.app.slicerHome))

    def backendEnvironment(self) -> dict:
        """Slicer's environment for PythonSlicer; the environment Slicer started with for another Python."""
        own = self.usesSlicerPython()
        return backend_environment(os.environ, own, None if own else slicer.util.startupEnvironment())

    def refreshBackend(self) -> None:
        """The interpreter and environment jobs start with (after a settings change)."""
        self.mrml.settings = self.settings
        self.mrml._python = self.backendPython()
        self.mrml.env = self.backendEnvironment()

    # -- models and cases ------------------------------------------------------------------------
    def models(self) -> list:
        return discover_models(self.settings.resolved_models_dir(), self.extraModelFolders)

    def libraryCases(self):
        return read_case_library(self.settings.resolved_cases_dir())

    # -- dependencies ----------------------------------------------------------------------------
    def checkDependencies(self, timeout: float = 300) -> DependencyReport:
        try:
            done = subprocess.run(probe_argv(self.backendPython()), capture_output=True, text=True, timeout=timeout,
                                  encoding="utf-8", env=self.backendEnvironment())
        except (OSError, subprocess.TimeoutExpired) as exc:
            return DependencyReport(problem=_("The backend Python could not be run: {error}").format(error=exc))
        return parse_probe_output(done.stdout, done.returncode, done.stderr)

    def installDependencies(self, report: DependencyReport) -> str:
        """Torch through the PyTorch extension, the rest with pip — never replacing Slicer's torch."""
        if not self.usesSlicerPython():
            return _("The backend is another Python interpreter; install there: {cmd}").format(
                cmd=f"{self.backendPython()} -m pip install " + " ".join(report.missing_other or ["timm"]))
        if report.missing_torch:
            try:
                torchLogic = slicer.util.getModuleLogic("PyTorchUtils")
            except Exception:  # noqa: BLE001 - older Slicer, or the extension is missing
                try:
                    import PyTorchUtils
                    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
                except ImportError:
                    return _("Install the PyTorch extension (Extensions Manager), restart Slicer, then try again.")
            if torchLogic.installTorch(askConfirmation=True) is None:
                return _("PyTorch was not installed.")
            report = self.checkDependencies()
        if report.missing_other:
            constraints = Path(self.context.new_temp_dir()) / "constraints.txt"
            constraints.write_text(pip_constraints(report.packages), encoding="utf-8")
            try:
                slicer.util.pip_install(pip_install_args(report.missing_other, str(constraints)))
            finally:
                shutil.rmtree(constraints.parent, ignore_errors=True)
        return self.checkDependencies().summary()


#
# Widget
#

class MedTuningWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[MedTuningLogic] = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._models: list = []
        self._sceneCases = SceneCaseList()
        self._jobs = JobSlot()
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.timeout.connect(self.onTimer)
        self.plotWidget = None

    @property
    def _job(self) -> Optional[Job]:
        return self._jobs.job if self._jobs.busy else None

    # -- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(resourcePath("UI/MedTuning.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedTuningLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)

        self.ui.modelComboBox.currentIndexChanged.connect(self.onModelChanged)
        self.ui.loadModelButton.clicked.connect(self.onLoadModelFolder)
        self.ui.refreshModelsButton.clicked.connect(self.refreshModels)
        self.ui.segmentButton.clicked.connect(self.onSegmentButton)
        self.ui.segmentScopeComboBox.currentIndexChanged.connect(self.updateButtons)
        self.ui.addSceneCaseButton.clicked.connect(self.onAddSceneCase)
        self.ui.removeCaseButton.clicked.connect(self.onRemoveSceneCase)
        self.ui.reloadCasesButton.clicked.connect(self.refreshCases)
        self.ui.casesTable.itemChanged.connect(self.onCaseItemChanged)
        self.ui.weightsComboBox.currentIndexChanged.connect(self.updateButtons)
        self.ui.modalityNamesLineEdit.textChanged.connect(self.onModalityNamesChanged)
        self.ui.finetuneButton.clicked.connect(self.onFineTuneButton)
        self.ui.addToCasesButton.clicked.connect(self.onAddToCases)
        self.ui.retuneButton.clicked.connect(self.onRetuneButton)
        self.ui.nextScanButton.clicked.connect(self.onNextScanButton)
        self.ui.addUnlabelledButton.clicked.connect(self.onAddUnlabelled)
        self.ui.autoRetrainCheckBox.toggled.connect(self.onSettingsEdited)
        self.ui.useSlicerPythonButton.clicked.connect(self.onUseSlicerPython)
        for pathEdit in (self.ui.backendPythonPathLineEdit, self.ui.modelsDirPathLineEdit, self.ui.casesDirPathLineEdit):
            pathEdit.currentPathChanged.connect(self.onSettingsEdited)
            # An emptied path is not "valid input", so currentPathChanged is not emitted for it (CTK):
            # an empty field means "the default" and must be saved too.
            pathEdit.validInputChanged.connect(lambda valid, edit=pathEdit: self.onPathValidity(edit, valid))
        self.ui.checkDependenciesButton.clicked.connect(self.onCheckDependencies)
        self.ui.installDependenciesButton.clicked.connect(self.onInstallDependencies)
        for selector in self._inputSelectors() + self._sceneCaseSelectors():
            selector.currentNodeChanged.connect(self.updateButtons)
        self.ui.sceneCaseSegmentationSelector.currentNodeChanged.connect(self.updateButtons)

        self.ui.modelsDirPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.casesDirPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.backendPythonPathLineEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Executable
        self.ui.weightsPathLineEdit.nameFilters = ["*.safetensors"]
        self._setupSegmentEditor()
        self._setupCurvePlot()
        self._showSettings()
        self.refreshModels()
        self.refreshCases()
        self.initializeParameterNode()
        self.onModalityNamesChanged()

    def _inputSelectors(self) -> list:
        return [getattr(self.ui, f"inputVolumeSelector{i}") for i in range(1, MAX_MODALITIES + 1)]

    def _inputVolumes(self, model: ModelInfo) -> list:
        """The chosen input volume per modality of ``model``, in its channel order (None where none is chosen)."""
        return [s.currentNode() for s in self._inputSelectors()[:len(model.modalities)]]

    def _sceneCaseSelectors(self) -> list:
        return [getattr(self.ui, f"sceneCaseVolumeSelector{i}") for i in range(1, MAX_MODALITIES + 1)]

    # -- segment editor (as Slicer's own SegmentEditor module embeds it) ---------------------------
    def _selectEditorNode(self) -> None:
        editorNode = slicer.mrmlScene.GetSingletonNode("MedTuning", "vtkMRMLSegmentEditorNode")
        if editorNode is None:
            editorNode = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            editorNode.UnRegister(None)
            editorNode.SetSingletonTag("MedTuning")
            editorNode = slicer.mrmlScene.AddNode(editorNode)
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(editorNode)

    def _setupSegmentEditor(self) -> None:
        self.ui.segmentEditorWidget.setMRMLScene(slicer.mrmlScene)
        self._selectEditorNode()
        self.ui.segmentEditorWidget.segmentationNodeChanged.connect(self.updateButtons)

    def _setupCurvePlot(self) -> None:
        """An embedded plot view, owned by the module's parameter node (not Slicer's main layout)."""
        self.plotWidget = slicer.qMRMLPlotWidget()
        self.plotWidget.setMRMLScene(slicer.mrmlScene)
        owner = self.logic.getParameterNode().parameterNode
        self.plotWidget.setMRMLPlotViewNode(embedded_plot_view_node(slicer.mrmlScene, owner))
        self.ui.curveFrame.layout().addWidget(self.plotWidget)
        self.ui.curveFrame.setVisible(False)

    def cleanup(self) -> None:
        """Module closed or reloaded: nothing may keep running."""
        self._timer.stop()
        self._jobs.close()
        self.removeObservers()
        self._shutDownEditor()

    def _shutDownEditor(self) -> None:
        """No effect keeps acting on the slice views once MedTuning is left (Slicer's SegmentEditor.exit)."""
        editor = self.ui.segmentEditorWidget
        editor.setActiveEffect(None)
        editor.uninstallKeyboardShortcuts()
        editor.removeViewObservations()

    # -- parameter node --------------------------------------------------------------------------
    def enter(self) -> None:
        self.ui.segmentEditorWidget.installKeyboardShortcuts()
        self._selectEditorNode()
        self.ui.segmentEditorWidget.updateWidgetFromMRML()
        self.initializeParameterNode()

    def exit(self) -> None:
        self._shutDownEditor()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        if self._jobs.job is not None:
            self._timer.stop()
            self._jobs.close()  # kills the backend; its folder stays if it would not die
            self._setRunning(None)
        self.ui.segmentEditorWidget.setSegmentationNode(None)
        self.ui.segmentEditorWidget.removeViewObservations()
        self._sceneCases.clear()
        self.logic.mrml.results.clear()  # node IDs are reused by the next scene
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self._selectEditorNode()
            self.ui.segmentEditorWidget.updateWidgetFromMRML()
            self.initializeParameterNode()
        self.refreshCases()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeRemoved(self, caller, event, node) -> None:
        if self._sceneCases.prune(self.logic.context):
            self.refreshCases()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume1:
            self._parameterNode.inputVolume1 = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = connectParameterGui(self._parameterNode, self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self.updateButtons()

    # -- settings section ------------------------------------------------------------------------
    def _showSettings(self) -> None:
        s = self.logic.settings
        for widget, value in ((self.ui.backendPythonPathLineEdit, s.backend_python),
                              (self.ui.modelsDirPathLineEdit, str(s.resolved_models_dir())),
                              (self.ui.casesDirPathLineEdit, str(s.resolved_cases_dir()))):
            wasBlocked = widget.blockSignals(True)
            widget.setCurrentPath(value)
            widget.blockSignals(wasBlocked)
        self.ui.autoRetrainCheckBox.checked = s.auto_retrain
        self.ui.backendPythonPathLineEdit.toolTip = _("Now used: {python}").format(python=self.logic.backendPython())

    def onUseSlicerPython(self) -> None:
        self.ui.backendPythonPathLineEdit.setCurrentPath("")
        self.onSettingsEdited()  # no signal comes for an empty path

    def onPathValidity(self, edit, valid: bool) -> None:
        if not valid and not edit.currentPath.strip():
            self.onSettingsEdited()

    def onSettingsEdited(self, *args) -> None:
        s = self.logic.settings
        s.backend_python = self.ui.backendPythonPathLineEdit.currentPath.strip()
        s.models_dir = self.ui.modelsDirPathLineEdit.currentPath.strip()
        s.cases_dir = self.ui.casesDirPathLineEdit.currentPath.strip()
        s.auto_retrain = self.ui.autoRetrainCheckBox.checked
        self.logic.saveSettings()
        self.ui.backendPythonPathLineEdit.toolTip = _("Now used: {python}").format(python=self.logic.backendPython())
        self.refreshModels()
        self.refreshCases()

    def onCheckDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Checking dependencies failed."), waitCursor=True):
            self._showDependencies(self.logic.checkDependencies())

    def _showDependencies(self, report: DependencyReport) -> None:
        self.ui.dependenciesLabel.text = report.summary()
        self.ui.gpuLabel.text = report.gpu_text()

    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Installing dependencies failed."), waitCursor=True):
            report = self.logic.checkDependencies()
            if report.ready:
                self._showDependencies(report)
                return
            if not slicer.util.confirmOkCancelDisplay(_(
                    "MedTuning needs: {missing}.\nPyTorch and torchvision are installed through the PyTorch "
                    "extension; the other packages with pip, keeping Slicer's PyTorch as it is. This can take "
                    "several minutes. Continue?").format(missing=", ".join(report.missing) or report.summary())):
                return
            self.ui.dependenciesLabel.text = self.logic.installDependencies(report)
            self._showDependencies(self.logic.checkDependencies())

    # -- models ----------------------------------------------------------------------------------
    def refreshModels(self, selectPath: Optional[str] = None) -> None:
        current = selectPath or self.ui.modelComboBox.currentData
        self._models = self.logic.models()
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for model in self._models:
            combo.addItem(model.name if model.usable else f"{model.name} ({_('unusable')})", str(model.path))
            combo.setItemData(combo.count - 1, model.describe(), qt.Qt.ToolTipRole)
        index = combo.findData(str(current)) if current else -1
        combo.setCurrentIndex(index if index >= 0 else (0 if self._models else -1))
        combo.blockSignals(wasBlocked)
        self.onModelChanged()

    def currentModel(self) -> Optional[ModelInfo]:
        index = self.ui.modelComboBox.currentIndex
        return self._models[index] if 0 <= index < len(self._models) else None

    def onLoadModelFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Choose a MedTuning model folder"))
        if not folder:
            return
        info = read_model_info(folder)
        if not info.usable:
            slicer.util.errorDisplay(_("This folder cannot be used: {problem}").format(problem=info.problem))
            return
        if folder not in self.logic.extraModelFolders:
            self.logic.extraModelFolders.append(folder)
        self.refreshModels(selectPath=folder)

    def onModelChanged(self, *args) -> None:
        model = self.currentModel()
        modalities = model.modalities if model else []
        for i, selector in enumerate(self._inputSelectors()):
            label = getattr(self.ui, f"inputVolumeLabel{i + 1}")
            visible = i < max(1, len(modalities))
            selector.setVisible(visible)
            label.setVisible(visible)
            label.text = (_("{modality} volume:").format(modality=modalities[i]) if i < len(modalities)
                          else _("Input volume:"))
        self.ui.modelInfoLabel.text = model.describe() if model else _(
            "No model yet: fine-tune one on your cases below, or load a model folder.")
        self.updateButtons()

    # -- cases table -----------------------------------------------------------------------------
    def _modalityNames(self) -> list:
        text = self.ui.modalityNamesLineEdit.text
        return [m.strip() for m in text.split(",") if m.strip()] or ["CT"]

    def onModalityNamesChanged(self, *args) -> None:
        """One scene-case volume selector per modality name (up to four), labelled with the name."""
        names = self._modalityNames()[:MAX_MODALITIES]
        for i in range(1, MAX_MODALITIES + 1):
            visible = i <= len(names)
            label = getattr(self.ui, f"sceneCaseVolumeLabel{i}")
            getattr(self.ui, f"sceneCaseVolumeSelector{i}").setVisible(visible)
            label.setVisible(visible)
            if visible:
                label.text = _("{modality} volume:").format(modality=names[i - 1])
        self.updateButtons()

    def refreshCases(self) -> None:
        table = self.ui.casesTable
        wasBlocked = table.blockSignals(True)
        table.setRowCount(0)
        rows = []
        context = self.logic.context
        for case in self._sceneCases.live(context):
            rows.append((case, case.title(context), _("scene"), case.split))
        for libraryCase in self.logic.libraryCases():
            origin = _("library") + (f" ({libraryCase.provenance})" if libraryCase.provenance else "")
            rows.append((None, libraryCase.case_id, origin, libraryCase.split))
        table.setRowCount(len(rows))
        for row, (case, name, origin, split) in enumerate(rows):
            check = qt.QTableWidgetItem()
            if case is None:  # library cases: training always reads the whole library
                check.setFlags(qt.Qt.ItemIsEnabled)
                check.setCheckState(qt.Qt.Checked)
                check.setToolTip(_("Cases in the library are always used for training"))
            else:
                check.setFlags(qt.Qt.ItemIsEnabled | qt.Qt.ItemIsUserCheckable)
                check.setCheckState(qt.Qt.Checked if case.checked else qt.Qt.Unchecked)
                check.setData(CASE_KEY_ROLE, case.key)
            table.setItem(row, 0, check)
            for column, text in enumerate((name, origin, split), start=1):
                table.setItem(row, column, qt.QTableWidgetItem(text))
        table.resizeColumnsToContents()
        table.blockSignals(wasBlocked)
        self.updateButtons()

    def _rowCase(self, row: int):
        item = self.ui.casesTable.item(row, 0)
        key = item.data(CASE_KEY_ROLE) if item is not None else None
        return self._sceneCases.get(str(key)) if key else None

    def onCaseItemChanged(self, item) -> None:
        if item.column() == 0:
            case = self._rowCase(item.row())
            if case is not None:
                case.checked = item.checkState() == qt.Qt.Checked

    def onAddSceneCase(self) -> None:
        names = self._modalityNames()[:MAX_MODALITIES]
        volumes = [s.currentNode() for s in self._sceneCaseSelectors()[:len(names)]]
        label = self.ui.sceneCaseSegmentationSelector.currentNode()
        with slicer.util.tryWithErrorDisplay(_("This case cannot be added."), waitCursor=False):
            self._sceneCases.add(volumes, label, self.ui.caseSplitComboBox.currentText, names)
        self.refreshCases()

    def onRemoveSceneCase(self) -> None:
        case = self._rowCase(self.ui.casesTable.currentRow())
        if case is not None:
            self._sceneCases.remove(case.key)
        self.refreshCases()

    def _checkedSceneCases(self) -> list:
        cases = []
        for case in self._sceneCases.checked(self.logic.context):
            volumes, label = case.nodes(self.logic.context)
            cases.append((volumes, label, case.split))
        return cases

    # -- buttons ---------------------------------------------------------------------------------
    def updateButtons(self, *args) -> None:
        if not hasattr(self, "ui") or self.logic is None:
            return
        job = self._job
        running = job is not None
        model = self.currentModel()
        needed = len(model.modalities) if model else 0
        inputsSet = needed > 0 and all(s.currentNode() for s in self._inputSelectors()[:needed])
        batch = self.ui.segmentScopeComboBox.currentIndex == SCOPE_SCENE  # needs no input selected
        self.ui.segmentButton.enabled = (running and job.kind == "segment") or (
            not running and bool(model and model.usable and (inputsSet or batch)))
        self.ui.segmentButton.toolTip = "" if inputsSet or batch else _("Choose a model and its input volume(s)")
        hasCases = bool(self._sceneCases.cases) or bool(self.ui.casesTable.rowCount)
        self.ui.finetuneButton.enabled = (running and job.kind == "train") or (not running and hasCases)
        self.ui.weightsPathLineEdit.enabled = self.ui.weightsComboBox.currentText == "file"
        names = self._modalityNames()[:MAX_MODALITIES]
        self.ui.addSceneCaseButton.enabled = bool(all(s.currentNode() for s in self._sceneCaseSelectors()[:len(names)])
                                                  and self.ui.sceneCaseSegmentationSelector.currentNode())
        editedSeg = self.ui.segmentEditorWidget.segmentationNode()
        self.ui.addToCasesButton.enabled = not running and bool(editedSeg and model and inputsSet)
        self.ui.retuneButton.enabled = (running and job.kind == "retune") or (
            not running and bool(model and model.usable))
        self.ui.nextScanButton.enabled = (running and job.kind == "suggest") or (
            not running and bool(model and model.usable))
        self.ui.addUnlabelledButton.enabled = not running and bool(model and inputsSet)

    def _setRunning(self, kind: Optional[str]) -> None:
        """Apply buttons turn into Cancel while their job runs."""
        labels = {"segment": (self.ui.segmentButton, _("Segment")),
                  "train": (self.ui.finetuneButton, _("Fine-tune on my cases")),
                  "retune": (self.ui.retuneButton, _("Re-tune now")),
                  "suggest": (self.ui.nextScanButton, _("Next scan to correct"))}
        for jobKind, (button, text) in labels.items():
            button.text = _("Cancel") if jobKind == kind else text
        self.updateButtons()

    def _progressWidgets(self, kind: str):
        if kind == "segment":
            return self.ui.segmentProgressBar, self.ui.segmentStatusLabel
        if kind == "train":
            return self.ui.finetuneProgressBar, self.ui.finetuneStatusLabel
        return self.ui.correctProgressBar, self.ui.correctStatusLabel

    def _startJob(self, starter: Callable[[], Job]) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not start."), waitCursor=True):
            try:
                job = self._jobs.start(starter)
            except JobBusy as exc:
                raise MrmlError(_("The previous run is still ending; try again in a moment.")) from exc
            bar, label = self._progressWidgets(job.kind)
            bar.value = 0
            bar.visible = True
            label.text = _("Starting…")
            if job.kind in ("train", "retune"):
                self.ui.curveFrame.setVisible(True)
            self._setRunning(job.kind)
            self._timer.start()

    def onTimer(self) -> None:
        job = self._jobs.job
        if job is None:
            self._timer.stop()
            return
        events = job.poll()
        state = job.state
        bar, label = self._progressWidgets(job.kind)
        bar.value = int(round(state.progress * 100))
        label.text = job.step_text() + state.status_text
        if isinstance(job, BatchSegmentation):  # the bar counts scans; the text is the current scan's step
            bar.value = int(round(100 * job.done_count / max(1, len(job.scans))))
            label.text = f"[{job.done_count}/{len(job.scans)}] " + state.status_text
        if job.kind in ("train", "retune") and any(e.get("event") == "metric" for e in events):
            chart = self.logic.mrml.update_curves(state)
            self.plotWidget.mrmlPlotViewNode().SetPlotChartNodeID(chart.GetID())
        if job.completed and not job.backend_alive:
            self._timer.stop()
            self._setRunning(None)
            bar.visible = False
            self._jobFinished(job, label)

    def _jobFinished(self, job: Job, label) -> None:
        state = job.state
        if isinstance(job, BatchSegmentation) and not job.cancel_requested:
            label.text = _("Segmented {done} of {total} scan(s).").format(done=len(job.result or []),
                                                                       total=len(job.scans))
            if job.failure:  # each failed scan with its code and message
                label.text += "\n" + job.failure
                logging.error("MedTuning batch segmentation: %s", job.failure)
            if job.result:
                self.ui.segmentEditorWidget.setSegmentationNode(job.result[0])
                self.ui.segmentEditorWidget.setSourceVolumeNode(job.scans[0].volumes[0])
            return
        if job.ok:
            if job.kind == "segment":
                label.text = _("Done: {name}").format(name=job.result.GetName())
                self.ui.segmentEditorWidget.setSegmentationNode(job.result)
                self.ui.segmentEditorWidget.setSourceVolumeNode(self._parameterNode.inputVolume1)
            elif job.kind in ("train", "retune"):
                label.text = _("New model ready: {path}").format(path=job.result)
                self._sceneCases.clear()
                self.refreshModels(selectPath=str(job.result))
                self.refreshCases()
            elif job.kind == "unlabelled":
                label.text = _("Added to your case library as an unlabelled scan: Next scan to correct ranks it.")
                self.refreshCases()
            elif job.kind == "suggest":
                self._segmentNextScan(job.result, label)
            elif job.kind == "cases":
                label.text = _("Added to your case library.")
                self.refreshCases()
                if self.logic.settings.auto_retrain:
                    self.onRetuneButton()
        elif state.cancelled or job.cancel_requested:
            label.text = state.status_text or _("Cancelled")
        else:
            text = job.failure or state.error_message or state.status_text
            if state.error_code:
                text = f"[{state.error_code}] {text}"
            if state.error_hint:
                text += "\n" + _("What to do: {hint}").format(hint=state.error_hint)
            label.text = text
            logging.error("MedTuning %s failed: %s", job.kind, text)

    def onSegmentButton(self) -> None:
        if self._job is not None:
            self._job.cancel()
            return
        model = self.currentModel()
        volumes = self._inputVolumes(model)
        p = self._parameterNode
        scope = self.ui.segmentScopeComboBox.currentIndex
        if scope in (SCOPE_SCENE, SCOPE_STUDY):
            self._startJob(lambda: self.logic.mrml.start_batch_segmentation(model, self._batchVolumes(model, scope),
                                                                            p.device, p.tta, fast=p.fast))
            return
        self._startJob(lambda: self.logic.mrml.start_segmentation(model, volumes, p.device, p.tta,
                                                                  p.outputSegmentation, fast=p.fast))

    def _batchVolumes(self, model: ModelInfo, scope: int) -> list:
        """One scan per volume: every volume of the scene, or of the first input volume's DICOM study."""
        if len(model.modalities) != 1:
            raise MrmlError(_("Segmenting many volumes at once needs a one-modality model; segment "
                              "multi-modality scans one at a time with their volumes chosen above."))
        if scope == SCOPE_SCENE:
            return scene_volumes(self.logic.context)
        volume = self._parameterNode.inputVolume1
        volumes = study_volumes(self.logic.context, volume, getattr(slicer, "dicomDatabase", None)) if volume else []
        if not volumes:
            raise MrmlError(_("The input volume was not loaded from Slicer's DICOM database: load its study in "
                              "the DICOM module, or choose 'Every volume in the scene'."))
        return volumes

    def _trainSettings(self) -> dict:
        p = self._parameterNode
        weights = {"hub": "hub", "none": "none"}.get(p.weightsSource) or self.ui.weightsPathLineEdit.currentPath
        crop = None
        if p.crop.strip():
            crop = tuple(int(v) for v in p.crop.lower().replace("×", "x").split("x"))
        model = self.currentModel()
        return dict(task=p.task, labels=p.labels or None, backbone=self.ui.backboneComboBox.currentText or None,
                    weights=weights, arch=p.arch, method=p.method, epochs=p.epochs, minutes=p.minutes or None,
                    crop=crop, batch=p.batch, device=p.device,
                    # A warm start keeps its model's spacing (the backend refuses one that differs).
                    spacing=None if p.continueFromModel else (p.spacing.strip() or None),
                    init_from=model.path if (p.continueFromModel and model) else None)

    def onFineTuneButton(self) -> None:
        if self._job is not None:
            self._job.cancel()
            return
        p = self._parameterNode
        self._startJob(lambda: self.logic.mrml.start_fine_tune(self._checkedSceneCases(), self._modalityNames(),
                                                               p.newModelName.strip() or "my-model",
                                                               **self._trainSettings()))

    def onAddToCases(self) -> None:
        model = self.currentModel()
        volumes = self._inputVolumes(model)
        seg = self.ui.segmentEditorWidget.segmentationNode()
        self._startJob(lambda: self.logic.mrml.start_add_cases([(volumes, seg, self._parameterNode.caseSplit)],
                                                               model.modalities, provenance="correction"))

    def onAddUnlabelled(self) -> None:
        model = self.currentModel()
        volumes = self._inputVolumes(model)

        def start() -> Job:
            job = self.logic.mrml.start_add_cases([(volumes, None, "unlabelled")], model.modalities)
            job.kind = "unlabelled"  # nothing to re-tune on: it finishes without the automatic re-tune
            return job

        self._startJob(start)

    def onNextScanButton(self) -> None:
        if self._job is not None:
            if self._job.kind == "suggest":
                self._job.cancel()
            return
        model = self.currentModel()
        self._startJob(lambda: self.logic.mrml.start_suggest(model, self._parameterNode.device))

    def _segmentNextScan(self, ranking: list, label) -> None:
        """Load the most uncertain unlabelled scan as the input volume(s) and segment it for correcting."""
        if not ranking:
            label.text = _("Your case library has no unlabelled scans to rank. Add scans without a label: "
                           "medtuning cases add --library LIBRARY --image FILE --split unlabelled")
            return
        model = self.currentModel()
        with slicer.util.tryWithErrorDisplay(_("Could not load the next scan."), waitCursor=True):
            volumes = self.logic.mrml.load_scan_to_correct(ranking[0], model)
            for selector, volume in zip(self._inputSelectors(), volumes):
                selector.setCurrentNode(volume)
            slicer.util.setSliceViewerLayers(background=volumes[0], fit=True)
            p = self._parameterNode
            self._startJob(lambda: self.logic.mrml.start_segmentation(model, volumes, p.device, p.tta,
                                                                      fast=p.fast))
            label.text = _("Next scan to correct: {id} (the most uncertain of {n}, mean entropy {score:.3f}); "
                           "segmenting it…").format(id=ranking[0]["id"], n=len(ranking), score=ranking[0]["score"])

    def onRetuneButton(self) -> None:
        if self._job is not None:
            if self._job.kind == "retune":
                self._job.cancel()
            return
        model = self.currentModel()
        p = self._parameterNode
        self._startJob(lambda: self.logic.mrml.start_retune(model, p.retuneEpochs, p.device))


#
# Test (runs inside Slicer, end to end through the real backend)
#

class MedTuningTest(ScriptedLoadableModuleTest):
    """Sample data -> tiny fine-tune -> segmentation -> checks; and Cancel stops a run."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()
        self.tempDir = Path(tempfile.mkdtemp(prefix="MedTuningTest-", dir=slicer.app.temporaryPath))

    def tearDown(self) -> None:
        shutil.rmtree(self.tempDir, ignore_errors=True)

    def runTest(self) -> None:
        self.setUp()
        try:
            self.test_FineTuneSegmentAndCancel()
        finally:
            self.tearDown()

    # -- helpers ---------------------------------------------------------------------------------
    def _logic(self) -> MedTuningLogic:
        logic = MedTuningLogic()
        # Never touch the user's folders or saved settings.
        logic.settings = BridgeSettings(models_dir=str(self.tempDir / "models"), cases_dir=str(self.tempDir / "cases"))
        logic.refreshBackend()
        return logic

    def _smallSample(self):
        """MRHead resampled to about 4 mm, with a thresholded "Head" segment."""
        import SampleData

        volume = SampleData.downloadSample("MRHead")
        params = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLCropVolumeParametersNode")
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
        params.SetInputVolumeNodeID(volume.GetID())
        params.SetROINodeID(roi.GetID())
        slicer.modules.cropvolume.logic().FitROIToInputVolume(params)
        params.SetVoxelBased(False)
        params.SetIsotropicResampling(True)
        params.SetSpacingScalingConst(4.0)
        slicer.modules.cropvolume.logic().Apply(params)
        small = params.GetOutputVolumeNode()
        small.SetName("MR head small")
        voxels = slicer.util.arrayFromVolume(small)
        labelmap = slicer.modules.volumes.logic().CreateAndAddLabelVolume(small, "head label")
        slicer.util.updateVolumeFromArray(labelmap, (voxels > np.percentile(voxels, 60)).astype(np.uint8))
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "head segmentation")
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation)
        segmentation.GetSegmentation().GetNthSegment(0).SetName("Head")
        return small, segmentation

    def _wait(self, job: Job, timeout: float, until: Optional[Callable[[], bool]] = None) -> None:
        deadline = time.monotonic() + timeout
        while not job.completed and not (until and until()):
            slicer.app.processEvents()
            job.poll()
            self.assertLess(time.monotonic(), deadline, f"{job.kind} did not finish in {timeout} s")
            time.sleep(0.1)

    TINY = dict(task="custom", arch="vit_upernet", backbone="vit_tiny_patch16_224", weights="none", crop=(8, 32, 32),
                batch=1, steps_per_epoch=4, device="cpu")

    # -- the test --------------------------------------------------------------------------------
    def test_FineTuneSegmentAndCancel(self) -> None:
        self.delayDisplay("Preparing sample data")
        logic = self._logic()
        report = logic.checkDependencies()
        self.assertTrue(report.ready, report.summary())
        volume, segmentation = self._smallSample()

        self.delayDisplay("Tiny fine-tune through the backend")
        job = logic.mrml.start_fine_tune([([volume], segmentation, "train")], ["MR"], "selftest", epochs=2, **self.TINY)
        self._wait(job, timeout=1800)
        self.assertTrue(job.ok, f"{job.state.error_code} {job.state.error_message} {job.failure}")
        model = read_model_info(job.result)
        self.assertTrue(model.usable, model.problem)
        self.assertEqual(model.modalities, ["MR"])
        self.assertIn("Head", [s.name for s in model.segments])
        self.assertIsNotNone(logic.mrml.update_curves(job.state))

        self.delayDisplay("Segmenting with the new model")
        existing = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MR head small selftest")
        job = logic.mrml.start_segmentation(model, [volume], device="cpu")
        self._wait(job, timeout=900)
        self.assertTrue(job.ok, f"{job.state.error_code} {job.state.error_message} {job.failure}")
        result = job.result
        self.assertIsNot(result, existing)  # a new node, the existing one untouched
        self.assertEqual(existing.GetSegmentation().GetNumberOfSegments(), 0)
        names = [result.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(result.GetSegmentation().GetNumberOfSegments())]
        self.assertIn("Head", names)
        segmentId = result.GetSegmentation().GetSegmentIdBySegmentName("Head")
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(result, segmentId, volume)
        self.assertEqual(mask.shape, slicer.util.arrayFromVolume(volume).shape)
        self.assertIsNone(job.temp_dir)  # temporary files removed

        self.delayDisplay("Cancel stops a run")
        job = logic.mrml.start_fine_tune([], ["MR"], "selftest-cancel", epochs=1000, **self.TINY)
        self._wait(job, timeout=600, until=lambda: job.state.phase == "train")
        process = job.chain.current
        job.cancel()
        self._wait(job, timeout=120)
        self.assertTrue(job.state.cancelled, job.state.status_text)
        self.assertFalse(process.backend_alive)  # the launcher's python-real too
        self.assertTrue((self.tempDir / "models" / "selftest-cancel.partial").is_dir())  # resumable
        self.delayDisplay("Test passed")
