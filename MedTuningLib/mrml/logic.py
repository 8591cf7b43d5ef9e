"""Everything between MRML nodes and backend jobs: export, run, load back (no widgets, no Qt).

:class:`MedTuningMrmlLogic` is what the Slicer module's Apply buttons and the browser app call:

- :meth:`~MedTuningMrmlLogic.start_segmentation` exports the input volumes (one per modality of
  the model, in its channel order), runs ``segment`` and loads the ``.seg.nrrd`` into a new node or
  the one the user chose;
- :meth:`~MedTuningMrmlLogic.start_add_cases` copies scene cases into the case library
  (``provenance`` ``scene`` or ``correction``);
- :meth:`~MedTuningMrmlLogic.start_fine_tune` adds scene cases, then trains a new model folder;
- :meth:`~MedTuningMrmlLogic.start_retune` warm-starts from a model on the whole library
  (``medtuning retune``) into ``<model>-round<N>``;
- :meth:`~MedTuningMrmlLogic.start_suggest` ranks the library's unlabelled scans ("Next scan to correct")
  and :meth:`~MedTuningMrmlLogic.load_scan_to_correct` loads one; adding its corrected segmentation as a case
  takes the unlabelled scan out of the library.

Every job runs the backend as ``PYTHON -m MedTuningLib ... --events jsonl`` with ``env`` (see
:func:`MedTuningLib.slicer_bridge.settings.backend_environment`) and ``library_root`` on its
``PYTHONPATH``; poll the returned :class:`~.jobs.Job` from a timer.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from MedTuningLib.mrml.batch import BatchScanNodes, BatchSegmentation, ScanFailure, scan_volumes
from MedTuningLib.mrml.cases import export_case
from MedTuningLib.mrml.context import MrmlContext, MrmlError
from MedTuningLib.mrml.curves import CurveNodes
from MedTuningLib.mrml.jobs import Job
from MedTuningLib.mrml.nodes import export_volume, is_labelmap, is_volume, load_result, read_volume
from MedTuningLib.mrml.terminology import load_medtuning_terminology
from MedTuningLib.slicer_bridge.commands import (BatchScan, CaseRemoveParams, RetuneParams, SegmentBatchParams,
                                                 SegmentParams, SuggestParams, TrainParams, backend_argv,
                                                 write_batch_csv)
from MedTuningLib.slicer_bridge.events import RunState
from MedTuningLib.slicer_bridge.export import ExportNamer
from MedTuningLib.slicer_bridge.process import DEFAULT_GRACE_S, BackendProcess, CommandChain
from MedTuningLib.slicer_bridge.settings import BridgeSettings, ModelInfo, next_model_name

log = logging.getLogger("MedTuning")
PathLike = Union[str, "os.PathLike[str]"]
#: ``(volumes in modality order, label node, split)``
CaseNodes = Tuple[Sequence[Any], Any, str]
#: Volume node attribute: the id of the case library's unlabelled scan the volume was loaded from.
UNLABELLED_CASE_ATTRIBUTE = "MedTuning.UnlabelledCase"


def replaced_unlabelled_scan(volumes: Sequence[Any], split: str, library: Path) -> List[CaseRemoveParams]:
    """The step that follows adding ``volumes`` as a labelled case: when they were loaded from the library's
    unlabelled scan (:meth:`MedTuningMrmlLogic.load_scan_to_correct`), that entry goes once the labelled copy
    is in (in this order, so that a failed add loses nothing). Empty otherwise."""
    case_id = volumes[0].GetAttribute(UNLABELLED_CASE_ATTRIBUTE) if volumes else None
    if not case_id or split == "unlabelled":
        return []
    return [CaseRemoveParams(library=library, case_id=case_id)]


class MedTuningMrmlLogic:
    """Nodes to files, backend jobs, files back to nodes, for one scene."""

    def __init__(self, context: MrmlContext, settings: Optional[BridgeSettings] = None,
                 python: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
                 library_root: Optional[PathLike] = None, grace_s: float = DEFAULT_GRACE_S) -> None:
        self.context = context
        self.settings = settings or BridgeSettings()
        self._python = python
        self.env = dict(os.environ if env is None else env)
        self.library_root = Path(library_root) if library_root else Path(__file__).resolve().parents[2]
        self.grace_s = grace_s
        self.curves = CurveNodes(context.scene)
        self.terminology_context = load_medtuning_terminology(context)
        #: segmentation node ID -> (model folder, the model's .seg.nrrd as it was before any editing),
        #: so a corrected result added as a case records the correction effort.
        self.results: Dict[str, Tuple[Path, Path]] = {}

    @property
    def python(self) -> str:
        return self._python or self.settings.resolved_python()

    # -- processes -------------------------------------------------------------------------------
    def process(self, params: Any, workdir: Optional[Path], cwd: Optional[Path] = None) -> BackendProcess:
        """The backend process for ``params`` (not started); training stops through ``OUT.partial``."""
        argv = backend_argv(self.python, params)
        own = params.workdir() if isinstance(params, (TrainParams, RetuneParams)) else None
        stop_dir = own or workdir
        log.info("MedTuning: %s", " ".join(argv))
        return BackendProcess(argv, workdir=stop_dir, env=self.env, pythonpath=self.library_root, cwd=cwd,
                              grace_s=self.grace_s)

    def job(self, kind: str, params_list: Sequence[Any], temp_dir: Path,
            on_success: Callable[[RunState], Any]) -> Job:
        """Start the commands one after another; the job's result is ``on_success(last state)``."""
        steps = [lambda p=p, i=i: self.process(p, temp_dir / f"work{i}", temp_dir) for i, p in enumerate(params_list)]
        return Job(kind, CommandChain(steps).start(), temp_dir, on_success)

    # -- segment ---------------------------------------------------------------------------------
    def start_segmentation(self, model: ModelInfo, volumes: Sequence[Any], device: str = "auto", tta: bool = False,
                           output_node: Any = None, name: str = "", fast: bool = False) -> Job:
        """Export the volumes, run ``segment``; the job's result is the segmentation node. ``fast``: the
        backend's quickest settings (no window overlap, int8 on a CPU)."""
        if not model.usable:
            raise MrmlError(f"The model {model.name} cannot be used: {model.problem}")
        if len(volumes) != len(model.modalities) or any(not is_volume(v) or is_labelmap(v) for v in volumes):
            raise MrmlError(f"The model expects {len(model.modalities)} input volume(s): {', '.join(model.modalities)}")
        temp_dir = self.context.new_temp_dir()
        try:
            namer = ExportNamer(temp_dir)
            images = [export_volume(v, namer.path(v.GetName(), ".nrrd", "volume")) for v in volumes]
        except Exception:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        out = namer.path("result", ".seg.nrrd")
        params = SegmentParams(model=model.path, images=images, out=out, tta=tta, fast=fast, device=device)
        title = name or f"{volumes[0].GetName()} {model.name}"

        def finish(state: RunState) -> Any:
            result = Path(state.outputs.get("segmentation") or out)
            node = load_result(self.context, result, volumes[0], output_node, title)
            self._remember_result(node, model.path, result)
            return node

        return self.job("segment", [params], temp_dir, finish)

    def start_batch_segmentation(self, model: ModelInfo, scans: Sequence[Any], device: str = "auto",
                                 tta: bool = False, show_3d: bool = True,
                                 on_scan: Optional[Callable[[BatchScanNodes, Any, Optional[ScanFailure]], None]] = None,
                                 fast: bool = False) -> BatchSegmentation:
        """Segment many scans in one backend job (the model is loaded once).

        ``scans``: volumes (one-modality models) or one sequence of volumes per scan, in the model's
        modality order. Each result loads into its own new segmentation node named after the scan's
        first volume, as soon as the backend reports that scan; a scan the backend refuses is in the
        job's ``failures`` with its code while the others still load (see :class:`BatchSegmentation`).
        """
        if not model.usable:
            raise MrmlError(f"The model {model.name} cannot be used: {model.problem}")
        groups = scan_volumes(scans)
        if not groups:
            raise MrmlError("No volume to segment: select at least one volume")
        for volumes in groups:
            if len(volumes) != len(model.modalities) or any(not is_volume(v) or is_labelmap(v) for v in volumes):
                names = ", ".join(getattr(v, "GetName", lambda: "?")() for v in volumes)
                raise MrmlError(f"The model expects {len(model.modalities)} input volume(s) per scan "
                                f"({', '.join(model.modalities)}), not {names}")

        exported: Dict[str, List[Path]] = {}

        def export_all(temp_dir: Path, namer: ExportNamer) -> Tuple[Path, List[BatchScanNodes]]:
            nodes = []
            for volumes in groups:
                out = namer.path(volumes[0].GetName(), ".seg.nrrd", "scan")
                scan = BatchScanNodes(out.name[:-len(".seg.nrrd")], list(volumes), out,
                                      f"{volumes[0].GetName()} {model.name}")
                exported[scan.id] = [export_volume(v, namer.path(v.GetName(), ".nrrd", "volume")) for v in volumes]
                nodes.append(scan)
            listing = write_batch_csv(temp_dir / "batch.csv", [BatchScan(exported[s.id], s.out, s.id) for s in nodes],
                                      model.modalities)
            return listing, nodes

        temp_dir, (listing, nodes) = self._exported(export_all)
        params = SegmentBatchParams(model=model.path, batch_list=listing, tta=tta, fast=fast, device=device)

        def load(scan: BatchScanNodes) -> Any:
            node = load_result(self.context, scan.out, scan.volumes[0], None, scan.name, show_3d)
            self._remember_result(node, model.path, scan.out)
            return node

        chain = CommandChain([lambda: self.process(params, temp_dir / "work0", temp_dir)]).start()
        return BatchSegmentation(chain, temp_dir, self.context, nodes, load, on_scan)

    def _remember_result(self, node: Any, model: Path, result: Path) -> None:
        """Keep the model's result file (the job folder goes) for the correction effort of a later add."""
        previous = self.results.pop(node.GetID(), None)
        if previous is not None:
            shutil.rmtree(previous[1].parent, ignore_errors=True)
        keep = self.context.new_temp_dir("MedTuning-result-")
        kept = keep / result.name
        shutil.copy2(result, kept)
        self.results[node.GetID()] = (Path(model), kept)

    # -- cases and training ----------------------------------------------------------------------
    def _case_params(self, temp_dir: Path, namer: ExportNamer, cases: Sequence[CaseNodes],
                     modalities: Sequence[str], provenance: str, case_id: Optional[str] = None,
                     source: Optional[str] = None) -> List[Any]:
        library = self.settings.resolved_cases_dir()
        params = []
        for volumes, label, split in cases:
            case = export_case(self.context, volumes, label, temp_dir, library, modalities, split, provenance, namer)
            case.case_id = case_id or case.case_id
            case.source = source or case.source
            origin = self.results.get(label.GetID()) if provenance == "correction" and label else None
            if origin is not None:  # the backend measures the correction effort against the model's output
                case.from_model, case.model_output = origin
            params.append(case)
            params += replaced_unlabelled_scan(volumes, split, library)
        return params

    def _exported(self, make: Callable[[Path, ExportNamer], Any]) -> Tuple[Path, Any]:
        temp_dir = self.context.new_temp_dir()
        try:
            return temp_dir, make(temp_dir, ExportNamer(temp_dir))
        except Exception:
            shutil.rmtree(temp_dir, ignore_errors=True)  # nothing half-written is left behind
            raise

    def start_add_cases(self, cases: Sequence[CaseNodes], modalities: Sequence[str], provenance: str = "scene",
                        case_id: Optional[str] = None, source: Optional[str] = None) -> Job:
        """Copy cases ``[(volumes, label, split)]`` into the case library (label None, split ``unlabelled``: a
        scan for "Next scan to correct"); the result is their count. ``case_id`` (one case only) and ``source``
        (the provenance's "where from"; default: the node's name in 3D Slicer) replace the backend's defaults.
        A ``correction`` of a result this logic segmented records the model's output, so the backend measures
        the correction effort."""
        if not cases:
            raise MrmlError("No case to add")
        if case_id and len(cases) > 1:
            raise MrmlError(f"One case id ({case_id}) cannot name {len(cases)} cases: leave it empty")
        temp_dir, params = self._exported(
            lambda d, n: self._case_params(d, n, cases, modalities, provenance, case_id, source))
        return self.job("cases", params, temp_dir, lambda state: len(params))

    def start_fine_tune(self, cases: Sequence[CaseNodes], modalities: Sequence[str], name: str = "my-model",
                        provenance: str = "scene", kind: str = "train", **train: Any) -> Job:
        """Add ``cases`` to the library, then train a new model folder; the result is its path.

        ``train`` holds :class:`TrainParams` fields (task, labels, arch, backbone, weights, method,
        epochs, minutes, crop, batch, device, steps_per_epoch, init_from, ...).
        """
        temp_dir, steps = self._exported(lambda d, n: self._case_params(d, n, cases, modalities, provenance))
        models_dir = self.settings.resolved_models_dir()
        models_dir.mkdir(parents=True, exist_ok=True)
        out = models_dir / next_model_name(models_dir, name or "my-model")
        train = {k: v for k, v in train.items() if v not in (None, "")}
        train.setdefault("device", self.settings.device)
        steps.append(TrainParams(library=self.settings.resolved_cases_dir(), out=out, **train))
        self.curves.remove()
        return self.job(kind, steps, temp_dir, lambda state: Path(state.outputs.get("model") or out))

    def start_retune(self, model: ModelInfo, epochs: Optional[int] = None, device: str = "auto",
                     minutes: Optional[float] = None, steps_per_epoch: Optional[int] = None,
                     extra: Sequence[str] = ()) -> Job:
        """``medtuning retune``: warm start from ``model`` on the whole case library with a short budget.

        Task, labels, modalities, architecture and base weights come from the model folder. The new
        model is ``<model>-round<N+1>`` in the models folder (given explicitly, so its ``.partial``
        folder — where a ``STOP`` file cancels the run — is known); the result is its path.
        ``extra`` (train options) runs ``train --init-from`` with them instead, as before ``retune``.
        """
        if not model.usable:
            raise MrmlError(f"The model {model.name} cannot be used: {model.problem}")
        models_dir = self.settings.resolved_models_dir()
        models_dir.mkdir(parents=True, exist_ok=True)
        base = re.sub(r"-round\d+$", "", model.name) or model.name
        name = f"{base}-round{int(model.round or 0) + 1}"
        if extra:
            task = model.task if model.task in ("kits", "brats") else "custom"
            return self.start_fine_tune([], model.modalities, name, kind="retune", task=task, epochs=epochs,
                                        minutes=minutes, steps_per_epoch=steps_per_epoch, device=device,
                                        init_from=model.path, extra=list(extra),
                                        weights="none" if model.pretrained is False else "hub")
        out = models_dir / next_model_name(models_dir, name)
        params = RetuneParams(model=model.path, library=self.settings.resolved_cases_dir(), out=out,
                              epochs=epochs, minutes=minutes, steps_per_epoch=steps_per_epoch, device=device)
        self.curves.remove()
        temp_dir = self.context.new_temp_dir()
        return self.job("retune", [params], temp_dir, lambda state: Path(state.outputs.get("model") or out))

    # -- which scan to correct next ---------------------------------------------------------------
    def start_suggest(self, model: ModelInfo, device: str = "auto") -> Job:
        """``medtuning suggest`` on the case library's unlabelled scans; the job's result is the ranking, most
        uncertain first (entries with ``id``, ``score``, ``images``: see :mod:`MedTuningLib.commands.suggest`)."""
        if not model.usable:
            raise MrmlError(f"The model {model.name} cannot be used: {model.problem}")
        params = SuggestParams(model=model.path, library=self.settings.resolved_cases_dir(), device=device)
        temp_dir = self.context.new_temp_dir()
        return self.job("suggest", [params], temp_dir, lambda state: list(state.outputs.get("ranking") or []))

    def load_scan_to_correct(self, entry: Mapping[str, Any], model: ModelInfo) -> List[Any]:
        """Load a ranked scan's images (one volume node per modality of ``model``, in its order), marked with
        the scan's case id: adding them later with their corrected segmentation replaces the unlabelled scan."""
        images = list(entry.get("images") or [])
        if len(images) != len(model.modalities):
            raise MrmlError(f"The scan {entry.get('id')} has {len(images)} image(s); the model {model.name} reads "
                            f"{len(model.modalities)} ({', '.join(model.modalities)}): choose a model of the scan's "
                            f"modalities to rank and segment it", code="MODALITY_COUNT_MISMATCH")
        nodes = []
        try:
            for path, modality in zip(images, model.modalities):
                name = str(entry["id"]) if len(images) == 1 else f"{entry['id']} {modality}"
                node = read_volume(self.context, path, name)
                node.SetAttribute(UNLABELLED_CASE_ATTRIBUTE, str(entry["id"]))
                nodes.append(node)
        except MrmlError:
            for node in nodes:  # no scan is left half-loaded in the scene
                self.context.scene.RemoveNode(node)
            raise
        return nodes

    # -- curves ----------------------------------------------------------------------------------
    def update_curves(self, state: RunState) -> Any:
        """Training loss and validation Dice as table / plot nodes; returns the chart node."""
        return self.curves.update(state)
