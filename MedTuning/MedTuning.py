"""MedTuning: segment with Med-Tuning models, fine-tune them on your own cases, correct and re-tune.

A thin shell over ``MedTuningLib``: this module turns MRML nodes into files (NRRD / .seg.nrrd),
runs the ``medtuning`` backend as a separate process (``python -m MedTuningLib ... --events jsonl``)
that a timer polls, and turns result files back into nodes. Command building, event parsing, the
process runner, export naming, settings and model discovery live in
``MedTuningLib.slicer_bridge`` (Slicer-free, tested with pytest).
"""

from __future__ import annotations

import logging
import os
import shutil
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

from MedTuningLib.slicer_bridge.commands import (ARCHS, METHODS, CaseAddParams, SegmentParams,  # noqa: E402
                                                 TrainParams, backend_argv)
from MedTuningLib.slicer_bridge.events import RunState  # noqa: E402
from MedTuningLib.slicer_bridge.export import ExportNamer, plan_case_export, unique_node_name  # noqa: E402
from MedTuningLib.slicer_bridge.process import BackendProcess, CommandChain  # noqa: E402
from MedTuningLib.slicer_bridge.settings import (BridgeSettings, DependencyReport, ModelInfo,  # noqa: E402
                                                 default_backend_python, discover_models, next_model_name,
                                                 parse_probe_output, pip_constraints, pip_install_args,
                                                 probe_argv, read_case_library, read_model_info)

SETTINGS_PREFIX = "MedTuning/"
MAX_MODALITIES = 4
POLL_INTERVAL_MS = 250


def resourcePath(relative: str) -> str:
    return os.path.join(LIBRARY_ROOT, "Resources", relative)


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
    caseSplit: Annotated[str, Choice(["train", "val", "test"])] = "train"
    retuneEpochs: Annotated[int, WithinRange(1, 1000)] = 10


#
# Logic
#

class Job:
    """A backend run (one or more commands) in progress, and what to do with its result."""

    def __init__(self, kind: str, chain: CommandChain, tempDir: Optional[Path],
                 onSuccess: Callable[[RunState], object]) -> None:
        self.kind = kind
        self.chain = chain
        self.tempDir = tempDir
        self.onSuccess = onSuccess
        self.result: object = None
        self.failure = ""
        self.completed = False

    @property
    def state(self) -> RunState:
        last = self.chain.last
        return last.state if last is not None else RunState()

    @property
    def ok(self) -> bool:
        return self.completed and self.chain.ok and not self.failure

    def poll(self) -> list[dict]:
        events = self.chain.poll()
        if self.chain.finished and not self.completed:
            self._complete()
        return events

    def cancel(self) -> None:
        self.chain.request_stop()

    def close(self) -> None:
        """Stop at once (scene closed, module reloaded): kill, then clean up."""
        if self.chain.current is not None:
            self.chain.request_stop()
            self.chain.current.close()
        self._cleanup()

    def _complete(self) -> None:
        self.completed = True
        try:
            if self.chain.ok:
                self.result = self.onSuccess(self.state)
        except Exception as exc:  # noqa: BLE001 - shown to the user, logged with the traceback
            logging.exception("MedTuning: loading the results failed")
            self.failure = str(exc)
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        if self.tempDir is not None:
            shutil.rmtree(self.tempDir, ignore_errors=True)
            self.tempDir = None


class MedTuningLogic(ScriptedLoadableModuleLogic):
    """Nodes to files, backend jobs, files back to nodes. No widgets here (usable from scripts)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.settings = self.loadSettings()
        self.extraModelFolders: list[str] = []
        self._curveTables: dict[str, object] = {}
        self._curveSeries: dict[str, object] = {}
        self.curveChartNode = None

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

    def backendPython(self) -> str:
        return self.settings.resolved_python(slicer.app.slicerHome)

    def usesSlicerPython(self) -> bool:
        return os.path.normcase(self.backendPython()) == os.path.normcase(default_backend_python(slicer.app.slicerHome))

    # -- models and cases ------------------------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        return discover_models(self.settings.resolved_models_dir(), self.extraModelFolders)

    def libraryCases(self):
        return read_case_library(self.settings.resolved_cases_dir())

    # -- files -----------------------------------------------------------------------------------
    @staticmethod
    def newTempDir() -> Path:
        return Path(tempfile.mkdtemp(prefix="MedTuning-", dir=slicer.app.temporaryPath))

    @staticmethod
    def exportNode(node, path: Path) -> None:
        """Write a node to a file without re-pointing the node's own storage at it."""
        if hasattr(slicer.util, "exportNode"):
            slicer.util.exportNode(node, str(path))
        elif not slicer.util.saveNode(node, str(path)):
            raise RuntimeError(_("Could not write {name} to {path}").format(name=node.GetName(), path=path))

    def loadResult(self, path: Path, referenceVolume, outputNode=None, name: str = ""):
        """Load a result .seg.nrrd; into ``outputNode`` only when the user chose that node."""
        loaded = slicer.util.loadSegmentation(str(path))
        if loaded is None:
            raise RuntimeError(_("The result {path} could not be loaded").format(path=path))
        if outputNode is not None:
            target = outputNode
            target.GetSegmentation().RemoveAllSegments()
            source = loaded.GetSegmentation()
            for index in range(source.GetNumberOfSegments()):
                target.GetSegmentation().CopySegmentFromSegmentation(source, source.GetNthSegmentID(index))
            slicer.mrmlScene.RemoveNode(loaded)
        else:
            target = loaded
            existing = [n.GetName() for n in slicer.util.getNodesByClass("vtkMRMLSegmentationNode") if n is not loaded]
            target.SetName(unique_node_name(name or loaded.GetName(), existing))
        target.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
        target.CreateDefaultDisplayNodes()
        target.CreateClosedSurfaceRepresentation()  # shown in 3D as well as in the slice views
        return target

    # -- jobs ------------------------------------------------------------------------------------
    def _run(self, params, workdir: Optional[Path], cwd: Path) -> BackendProcess:
        argv = backend_argv(self.backendPython(), params)
        stopDir = params.workdir() if isinstance(params, TrainParams) else workdir
        logging.info("MedTuning: %s", " ".join(argv))
        return BackendProcess(argv, workdir=stopDir, pythonpath=LIBRARY_ROOT, cwd=cwd)

    def _job(self, kind: str, paramsList: list, tempDir: Path, onSuccess) -> Job:
        steps = [lambda p=p, i=i: self._run(p, tempDir / f"work{i}", tempDir) for i, p in enumerate(paramsList)]
        return Job(kind, CommandChain(steps).start(), tempDir, onSuccess)

    def startSegmentation(self, model: ModelInfo, volumes: list, device: str = "auto", tta: bool = False,
                          outputNode=None) -> Job:
        """Export the volumes, run ``segment``; the job's result is the segmentation node."""
        if len(volumes) != len(model.modalities) or any(v is None for v in volumes):
            raise ValueError(_("The model expects {n} input volumes ({names}).").format(
                n=len(model.modalities), names=", ".join(model.modalities)))
        tempDir = self.newTempDir()
        namer = ExportNamer(tempDir)
        images = [namer.path(v.GetName(), ".nrrd", "volume") for v in volumes]
        for volume, path in zip(volumes, images):
            self.exportNode(volume, path)
        out = namer.path("result", ".seg.nrrd")
        params = SegmentParams(model=model.path, images=images, out=out, tta=tta, device=device)
        name = f"{volumes[0].GetName()} {model.name}"

        def finish(state: RunState):
            result = Path(state.outputs.get("segmentation") or out)
            return self.loadResult(result, volumes[0], outputNode, name)

        return self._job("segment", [params], tempDir, finish)

    def _addCaseParams(self, tempDir: Path, namer: ExportNamer, volumes: list, segmentation, modalities: list[str],
                       split: str, provenance: str) -> CaseAddParams:
        files = plan_case_export(tempDir, [v.GetName() for v in volumes], segmentation.GetName(), namer)
        for volume, path in zip(volumes, files.images):
            self.exportNode(volume, path)
        self.exportNode(segmentation, files.label)
        return CaseAddParams(library=self.settings.resolved_cases_dir(), images=files.images, label=files.label,
                             modalities=modalities, split=split, provenance=provenance,
                             source=f"3D Slicer: {segmentation.GetName()}")

    def startAddCases(self, cases: list, modalities: list[str], provenance: str = "scene") -> Job:
        """Copy scene cases ``[(volumes, segmentation, split)]`` into the case library."""
        tempDir = self.newTempDir()
        namer = ExportNamer(tempDir)
        params = [self._addCaseParams(tempDir, namer, v, s, modalities, split, provenance) for v, s, split in cases]
        return self._job("cases", params, tempDir, lambda state: len(params))

    def startFineTune(self, sceneCases: list, modalities: list[str], name: str, task: str = "custom",
                      labels: str = "", backbone: Optional[str] = None, weights: Optional[str] = None,
                      arch: Optional[str] = None, method: Optional[str] = None, epochs: Optional[int] = None,
                      minutes: Optional[float] = None, crop=None, batch: Optional[int] = None, device: str = "auto",
                      stepsPerEpoch: Optional[int] = None, initFrom: Optional[Path] = None, provenance: str = "scene") -> Job:
        """Add the scene cases to the library, then train a new model folder; the result is its path."""
        tempDir = self.newTempDir()
        namer = ExportNamer(tempDir)
        steps: list = [self._addCaseParams(tempDir, namer, v, s, modalities, split, provenance)
                       for v, s, split in sceneCases]
        modelsDir = self.settings.resolved_models_dir()
        modelsDir.mkdir(parents=True, exist_ok=True)
        out = modelsDir / next_model_name(modelsDir, name or "my-model")
        steps.append(TrainParams(library=self.settings.resolved_cases_dir(), out=out, task=task, labels=labels or None,
                                 arch=arch, backbone=backbone or None, weights=weights, method=method, epochs=epochs,
                                 minutes=minutes or None, crop=crop, batch=batch, device=device,
                                 steps_per_epoch=stepsPerEpoch, init_from=initFrom))
        self.resetCurves()
        return self._job("train", steps, tempDir, lambda state: Path(state.outputs.get("model") or out))

    def startRetune(self, model: ModelInfo, epochs: int, device: str = "auto") -> Job:
        """Warm start from ``model`` on the whole case library (short schedule)."""
        task = model.task if model.task in ("kits", "brats") else "custom"
        return self.startFineTune([], model.modalities, f"{model.name}-retuned", task=task, epochs=epochs,
                                  device=device, initFrom=model.path)

    # -- training curve --------------------------------------------------------------------------
    def resetCurves(self) -> None:
        for node in [*self._curveTables.values(), *self._curveSeries.values()]:
            if slicer.mrmlScene.IsNodePresent(node):
                slicer.mrmlScene.RemoveNode(node)
        self._curveTables.clear()
        self._curveSeries.clear()

    def updateCurves(self, state: RunState):
        """Training loss and validation Dice per region as plot series; returns the chart node."""
        if self.curveChartNode is None or not slicer.mrmlScene.IsNodePresent(self.curveChartNode):
            self.curveChartNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotChartNode", _("MedTuning training"))
            self.curveChartNode.SetXAxisTitle(_("epoch"))
            self.curveChartNode.SetYAxisTitle(_("loss / Dice"))
        for name in state.curve_names():
            if not (name == "train/loss" or name.startswith("validate/dice/")):
                continue
            points = state.curves[name]
            label = _("training loss") if name == "train/loss" else _("Dice {region}").format(region=name.split("/", 2)[2])
            table = self._curveTables.get(name)
            if table is None:
                table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", f"MedTuning {label}")
                self._curveTables[name] = table
            slicer.util.updateTableFromArray(table, [np.array([p.x for p in points], dtype=float),
                                                     np.array([p.value for p in points], dtype=float)],
                                             ["epoch", label])
            if name not in self._curveSeries:
                series = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", label)
                series.SetAndObserveTableNodeID(table.GetID())
                series.SetXColumnName("epoch")
                series.SetYColumnName(label)
                series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
                series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
                series.SetUniqueColor()
                self.curveChartNode.AddAndObservePlotSeriesNodeID(series.GetID())
                self._curveSeries[name] = series
        return self.curveChartNode

    # -- dependencies ----------------------------------------------------------------------------
    def checkDependencies(self, timeout: float = 300) -> DependencyReport:
        import subprocess

        try:
            done = subprocess.run(probe_argv(self.backendPython()), capture_output=True, text=True, timeout=timeout, encoding="utf-8")
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
            constraints = Path(self.newTempDir()) / "constraints.txt"
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
        self._models: list[ModelInfo] = []
        self._sceneCases: list[tuple[str, str]] = []  # (volume node id, segmentation node id)
        self._job: Optional[Job] = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.timeout.connect(self.onTimer)
        self.plotWidget = None

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

        self.ui.modelComboBox.currentIndexChanged.connect(self.onModelChanged)
        self.ui.loadModelButton.clicked.connect(self.onLoadModelFolder)
        self.ui.refreshModelsButton.clicked.connect(self.refreshModels)
        self.ui.segmentButton.clicked.connect(self.onSegmentButton)
        self.ui.addSceneCaseButton.clicked.connect(self.onAddSceneCase)
        self.ui.removeCaseButton.clicked.connect(self.onRemoveSceneCase)
        self.ui.reloadCasesButton.clicked.connect(self.refreshCases)
        self.ui.weightsComboBox.currentIndexChanged.connect(self.updateButtons)
        self.ui.finetuneButton.clicked.connect(self.onFineTuneButton)
        self.ui.addToCasesButton.clicked.connect(self.onAddToCases)
        self.ui.retuneButton.clicked.connect(self.onRetuneButton)
        self.ui.autoRetrainCheckBox.toggled.connect(self.onSettingsEdited)
        self.ui.useSlicerPythonButton.clicked.connect(lambda: self.ui.backendPythonPathLineEdit.setCurrentPath(""))
        self.ui.backendPythonPathLineEdit.currentPathChanged.connect(self.onSettingsEdited)
        self.ui.modelsDirPathLineEdit.currentPathChanged.connect(self.onSettingsEdited)
        self.ui.casesDirPathLineEdit.currentPathChanged.connect(self.onSettingsEdited)
        self.ui.checkDependenciesButton.clicked.connect(self.onCheckDependencies)
        self.ui.installDependenciesButton.clicked.connect(self.onInstallDependencies)
        for selector in self._inputSelectors():
            selector.currentNodeChanged.connect(self.updateButtons)
        self.ui.sceneCaseVolumeSelector.currentNodeChanged.connect(self.updateButtons)
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

    def _inputSelectors(self) -> list:
        return [getattr(self.ui, f"inputVolumeSelector{i}") for i in range(1, MAX_MODALITIES + 1)]

    def _setupSegmentEditor(self) -> None:
        editorNode = slicer.mrmlScene.GetSingletonNode("MedTuning", "vtkMRMLSegmentEditorNode")
        if editorNode is None:
            editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
            editorNode.SetSingletonTag("MedTuning")
        self.ui.segmentEditorWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(editorNode)
        self.ui.segmentEditorWidget.segmentationNodeChanged.connect(self.updateButtons)

    def _setupCurvePlot(self) -> None:
        """An embedded plot view fed by the training's metric events."""
        self.plotWidget = slicer.qMRMLPlotWidget()
        self.plotWidget.setMRMLScene(slicer.mrmlScene)
        viewNode = slicer.mrmlScene.GetSingletonNode("MedTuningCurves", "vtkMRMLPlotViewNode")
        if viewNode is None:
            viewNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotViewNode")
            viewNode.SetSingletonTag("MedTuningCurves")
        self.plotWidget.setMRMLPlotViewNode(viewNode)
        self.ui.curveFrame.layout().addWidget(self.plotWidget)
        self.ui.curveFrame.setVisible(False)

    def cleanup(self) -> None:
        """Module closed or reloaded: nothing may keep running."""
        self._timer.stop()
        if self._job is not None:
            self._job.close()
            self._job = None
        self.removeObservers()

    # -- parameter node --------------------------------------------------------------------------
    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:
            self._job.close()
            self._job = None
            self._timer.stop()
            self._setRunning(None)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume1:
            self._parameterNode.inputVolume1 = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
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

    def onSettingsEdited(self, *args) -> None:
        s = self.logic.settings
        s.backend_python = self.ui.backendPythonPathLineEdit.currentPath
        s.models_dir = self.ui.modelsDirPathLineEdit.currentPath
        s.cases_dir = self.ui.casesDirPathLineEdit.currentPath
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
    def refreshCases(self) -> None:
        table = self.ui.casesTable
        table.setRowCount(0)
        rows = []
        for volumeId, segId in self._sceneCases:
            volume, seg = slicer.mrmlScene.GetNodeByID(volumeId), slicer.mrmlScene.GetNodeByID(segId)
            if volume is not None and seg is not None:
                rows.append((True, f"{volume.GetName()} + {seg.GetName()}", _("scene"), self.ui.caseSplitComboBox.currentText))
        for case in self.logic.libraryCases():
            origin = _("library") + (f" ({case.provenance})" if case.provenance else "")
            rows.append((None, case.case_id, origin, case.split))
        table.setRowCount(len(rows))
        for row, (use, name, origin, split) in enumerate(rows):
            check = qt.QTableWidgetItem()
            if use is None:  # library cases: training always reads the whole library
                check.setFlags(qt.Qt.ItemIsEnabled)
                check.setCheckState(qt.Qt.Checked)
                check.setToolTip(_("Cases in the library are always used for training"))
            else:
                check.setFlags(qt.Qt.ItemIsEnabled | qt.Qt.ItemIsUserCheckable)
                check.setCheckState(qt.Qt.Checked)
            table.setItem(row, 0, check)
            for column, text in enumerate((name, origin, split), start=1):
                table.setItem(row, column, qt.QTableWidgetItem(text))
        table.resizeColumnsToContents()
        self.updateButtons()

    def onAddSceneCase(self) -> None:
        volume = self.ui.sceneCaseVolumeSelector.currentNode()
        seg = self.ui.sceneCaseSegmentationSelector.currentNode()
        if volume is None or seg is None:
            return
        pair = (volume.GetID(), seg.GetID())
        if pair not in self._sceneCases:
            self._sceneCases.append(pair)
        self.refreshCases()

    def onRemoveSceneCase(self) -> None:
        row = self.ui.casesTable.currentRow()
        if 0 <= row < len(self._sceneCases):
            del self._sceneCases[row]
        self.refreshCases()

    def _checkedSceneCases(self) -> list:
        cases = []
        for row, (volumeId, segId) in enumerate(self._sceneCases):
            item = self.ui.casesTable.item(row, 0)
            if item is not None and item.checkState() == qt.Qt.Checked:
                cases.append(([slicer.mrmlScene.GetNodeByID(volumeId)], slicer.mrmlScene.GetNodeByID(segId),
                              self._parameterNode.caseSplit))
        return cases

    # -- buttons ---------------------------------------------------------------------------------
    def updateButtons(self, *args) -> None:
        if not hasattr(self, "ui"):
            return
        running = self._job is not None
        model = self.currentModel()
        needed = len(model.modalities) if model else 0
        inputsSet = needed > 0 and all(s.currentNode() for s in self._inputSelectors()[:needed])
        self.ui.segmentButton.enabled = (running and self._job.kind == "segment") or (
            not running and bool(model and model.usable and inputsSet))
        self.ui.segmentButton.toolTip = "" if inputsSet else _("Choose a model and its input volume(s)")
        hasCases = bool(self._sceneCases) or bool(self.ui.casesTable.rowCount)
        self.ui.finetuneButton.enabled = (running and self._job.kind == "train") or (not running and hasCases)
        self.ui.weightsPathLineEdit.enabled = self.ui.weightsComboBox.currentText == "file"
        self.ui.addSceneCaseButton.enabled = bool(self.ui.sceneCaseVolumeSelector.currentNode()
                                                  and self.ui.sceneCaseSegmentationSelector.currentNode())
        editedSeg = self.ui.segmentEditorWidget.segmentationNode()
        self.ui.addToCasesButton.enabled = not running and bool(editedSeg and model and inputsSet)
        self.ui.retuneButton.enabled = (running and self._job.kind == "retune") or (
            not running and bool(model and model.usable))

    def _setRunning(self, kind: Optional[str]) -> None:
        """Apply buttons turn into Cancel while their job runs."""
        labels = {"segment": (self.ui.segmentButton, _("Segment")),
                  "train": (self.ui.finetuneButton, _("Fine-tune on my cases")),
                  "retune": (self.ui.retuneButton, _("Re-tune now"))}
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
            self._job = starter()
            bar, label = self._progressWidgets(self._job.kind)
            bar.value = 0
            bar.visible = True
            label.text = _("Starting…")
            if self._job.kind in ("train", "retune"):
                self.ui.curveFrame.setVisible(True)
            self._setRunning(self._job.kind)
            self._timer.start()

    def onTimer(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        events = job.poll()
        state = job.state
        bar, label = self._progressWidgets(job.kind)
        bar.value = int(round(state.progress * 100))
        step = f"[{job.chain.index + 1}/{job.chain.total}] " if job.chain.total > 1 else ""
        label.text = step + state.status_text
        if job.kind in ("train", "retune") and any(e.get("event") == "metric" for e in events):
            chart = self.logic.updateCurves(state)
            self.plotWidget.mrmlPlotViewNode().SetPlotChartNodeID(chart.GetID())
        if job.completed:
            self._timer.stop()
            self._job = None
            self._setRunning(None)
            bar.visible = False
            self._jobFinished(job, label)

    def _jobFinished(self, job: Job, label) -> None:
        state = job.state
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
            elif job.kind == "cases":
                label.text = _("Added to your case library.")
                self.refreshCases()
                if self.logic.settings.auto_retrain:
                    self.onRetuneButton()
        elif state.cancelled:
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
        volumes = [s.currentNode() for s in self._inputSelectors()[:len(model.modalities)]]
        p = self._parameterNode
        self._startJob(lambda: self.logic.startSegmentation(model, volumes, p.device, p.tta, p.outputSegmentation))

    def _trainSettings(self) -> dict:
        p = self._parameterNode
        weights = {"hub": "hub", "none": "none"}.get(p.weightsSource) or self.ui.weightsPathLineEdit.currentPath
        crop = None
        if p.crop.strip():
            crop = tuple(int(v) for v in p.crop.lower().replace("×", "x").split("x"))
        model = self.currentModel()
        return dict(task=p.task, labels=p.labels, backbone=self.ui.backboneComboBox.currentText, weights=weights,
                    arch=p.arch, method=p.method, epochs=p.epochs, minutes=p.minutes, crop=crop, batch=p.batch,
                    device=p.device, initFrom=model.path if (p.continueFromModel and model) else None)

    def onFineTuneButton(self) -> None:
        if self._job is not None:
            self._job.cancel()
            return
        p = self._parameterNode
        modalities = [m.strip() for m in p.modalityNames.split(",") if m.strip()] or ["CT"]
        self._startJob(lambda: self.logic.startFineTune(self._checkedSceneCases(), modalities,
                                                        p.newModelName.strip() or "my-model", **self._trainSettings()))

    def onAddToCases(self) -> None:
        model = self.currentModel()
        volumes = [s.currentNode() for s in self._inputSelectors()[:len(model.modalities)]]
        seg = self.ui.segmentEditorWidget.segmentationNode()
        self._startJob(lambda: self.logic.startAddCases([(volumes, seg, self._parameterNode.caseSplit)],
                                                        model.modalities, provenance="correction"))

    def onRetuneButton(self) -> None:
        if self._job is not None:
            if self._job.kind == "retune":
                self._job.cancel()
            return
        model = self.currentModel()
        p = self._parameterNode

        def start() -> Job:
            job = self.logic.startRetune(model, p.retuneEpochs, p.device)
            job.kind = "retune"
            return job

        self._startJob(start)


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
                batch=1, stepsPerEpoch=4, device="cpu")

    # -- the test --------------------------------------------------------------------------------
    def test_FineTuneSegmentAndCancel(self) -> None:
        self.delayDisplay("Preparing sample data")
        logic = self._logic()
        report = logic.checkDependencies()
        self.assertTrue(report.ready, report.summary())
        volume, segmentation = self._smallSample()

        self.delayDisplay("Tiny fine-tune through the backend")
        job = logic.startFineTune([([volume], segmentation, "train")], ["MR"], "selftest", epochs=2, **self.TINY)
        self._wait(job, timeout=1800)
        self.assertTrue(job.ok, f"{job.state.error_code} {job.state.error_message} {job.failure}")
        model = read_model_info(job.result)
        self.assertTrue(model.usable, model.problem)
        self.assertEqual(model.modalities, ["MR"])
        self.assertIn("Head", [s.name for s in model.segments])
        self.assertIsNotNone(logic.updateCurves(job.state))

        self.delayDisplay("Segmenting with the new model")
        existing = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MR head small selftest")
        job = logic.startSegmentation(model, [volume], device="cpu")
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
        self.assertIsNone(job.tempDir)  # temporary files removed

        self.delayDisplay("Cancel stops a run")
        job = logic.startFineTune([], ["MR"], "selftest-cancel", epochs=1000, **self.TINY)
        self._wait(job, timeout=600, until=lambda: job.state.phase == "train")
        process = job.chain.current
        job.cancel()
        self._wait(job, timeout=120)
        self.assertTrue(job.state.cancelled, job.state.status_text)
        self.assertFalse(process.running)
        self.assertTrue((self.tempDir / "models" / "selftest-cancel.partial").is_dir())  # resumable
        self.delayDisplay("Test passed")
