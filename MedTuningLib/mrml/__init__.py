"""Qt-free MRML logic of MedTuning, shared by the 3D Slicer module and the browser app.

Imports only ``slicer`` (3D Slicer's, or Kitware's ``slicer-core`` wheel), ``vtk``, numpy and
:mod:`MedTuningLib.slicer_bridge`; never ``qt``, never torch (the backend runs as a separate
process). Python 3.9 compatible (Slicer 5.4-5.8). Nothing here touches ``slicer.app``, except
:meth:`MrmlContext.from_slicer`.

API
---
Context (:mod:`.context`)
    ``MrmlContext(scene, app_logic=None, temp_root=None)``; ``MrmlContext.from_slicer()`` inside
    Slicer; ``MrmlContext.standalone(terminology_share_dir=None)`` with slicer-core (a scene, an
    application logic, Segmentations and Terminologies logics registered, as trame-slicer does;
    to reuse a trame-slicer ``SlicerApp`` pass ``MrmlContext(app.scene, app.app_logic)``).
    ``segmentations_logic()``, ``terminologies_logic()``, ``new_temp_dir()``, ``node(id)``.
    ``MrmlError``: every failure, with a message to show.
Nodes and files (:mod:`.nodes`)
    ``export_volume(volume, path)`` (.nrrd), ``export_segmentation(seg, path)`` (.seg.nrrd),
    ``export_label(context, seg_or_labelmap, path)``, ``labelmap_to_segmentation(context, labelmap)``,
    ``read_segmentation_file(context, path)``, ``load_result(context, path, reference_volume,
    target=None, name="", show_3d=True)``, ``segment_ids(seg)``, ``describe_segments(seg)``,
    ``segment_terminology(segment)``. All through Slicer's storage nodes; a failed write raises.
Cases (:mod:`.cases`)
    ``SceneCase`` (volume ids in modality order, label id, split, checked, stable ``key``),
    ``SceneCaseList`` (``add``, ``get``, ``remove(key)``, ``prune``, ``live``, ``checked``),
    ``check_case_nodes(volumes, label, modalities)``, ``export_case(...) -> CaseAddParams``.
Terminology (:mod:`.terminology`)
    ``load_medtuning_terminology(context)`` loads MedTuning's BraTS context into Slicer's
    Terminologies logic; ``loaded_terminology_names(context)``; ``CONTEXT_NAME``.
Corrections (:mod:`.correction`)
    ``modify_segment(context, seg, segment_id, mask, volume, mode="add"|"remove"|"set",
    overwrite_others=False)`` (True: other segments lose the painted voxels, Slicer's default) through
    ``vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap``; ``segment_mask(context, seg, id, volume)``;
    ``editor_node(context)``; ``oriented_mask(mask, volume)``.
Curves (:mod:`.curves`)
    ``CurveNodes(scene).update(run_state) -> chart``, ``.remove()``;
    ``embedded_plot_view_node(scene, owner)`` (parent layout node set before it enters the scene).
Jobs (:mod:`.jobs`)
    ``Job`` (``poll()``, ``cancel()``, ``close()``, ``wait()``, ``state``, ``ok``, ``result``,
    ``failure``, ``backend_alive``; its folder outlives no backend process and is kept while one
    lives), ``JobSlot`` (one job at a time; ``start(factory)`` raises ``JobBusy``).
Batch (:mod:`.batch`)
    ``BatchSegmentation`` (a ``Job``: each finished scan loads into its own new segmentation node,
    ``nodes`` / ``failures`` by scan id, ``ScanFailure(code, message, hint)``), ``BatchScanNodes``,
    ``scene_volumes(context)``, ``study_volumes(context, volume, database)`` and
    ``dicom_study_uid(volume, database)`` (volumes of one DICOM study via ``slicer.dicomDatabase``).
Logic (:mod:`.logic`)
    ``MedTuningMrmlLogic(context, settings, python=None, env=None, library_root=None)`` with
    ``start_segmentation(model, volumes, device, tta, output_node)``,
    ``start_batch_segmentation(model, scans, device, tta, show_3d, on_scan)`` (many scans, one job,
    one model load; see Batch),
    ``start_add_cases([(volumes, label, split)], modalities, provenance, case_id, source)``,
    ``start_fine_tune(cases, modalities, name, **train)``, ``start_retune(model, epochs, device)``
    (``medtuning retune`` into ``<model>-round<N>``), ``start_suggest(model, device)`` and
    ``load_scan_to_correct(entry, model)`` ("Next scan to correct"), ``update_curves(state)``; ``results`` maps a
    result node's ID to (model folder, model's .seg.nrrd) so adding it as a ``correction`` case
    records the correction effort. Nodes: ``export_label(..., volume)`` resamples a segmentation
    drawn on another grid onto the volume's (``on_volume_grid``, ``resampled_to_volume``).
"""

from MedTuningLib.mrml.batch import (BatchScanNodes, BatchSegmentation, ScanFailure, dicom_study_uid, scene_volumes,
                                     study_volumes)
from MedTuningLib.mrml.cases import SceneCase, SceneCaseList, check_case_nodes, export_case
from MedTuningLib.mrml.context import MrmlContext, MrmlError
from MedTuningLib.mrml.correction import editor_node, modify_segment, oriented_mask, segment_mask
from MedTuningLib.mrml.curves import CurveNodes, curve_label, embedded_plot_view_node
from MedTuningLib.mrml.jobs import Job, JobBusy, JobSlot
from MedTuningLib.mrml.logic import UNLABELLED_CASE_ATTRIBUTE, MedTuningMrmlLogic
from MedTuningLib.mrml.nodes import (describe_segments, export_label, export_segmentation, export_volume,
                                     labelmap_to_segmentation, load_result, read_segmentation_file, read_volume,
                                     segment_ids, segment_terminology)
from MedTuningLib.mrml.terminology import CONTEXT_NAME, load_medtuning_terminology, loaded_terminology_names

__all__ = [
    "BatchScanNodes", "BatchSegmentation", "ScanFailure", "dicom_study_uid", "scene_volumes", "study_volumes",
    "CONTEXT_NAME", "CurveNodes", "Job", "JobBusy", "JobSlot", "MedTuningMrmlLogic", "MrmlContext", "MrmlError",
    "SceneCase", "SceneCaseList", "check_case_nodes", "curve_label", "describe_segments", "editor_node",
    "embedded_plot_view_node", "export_case", "export_label", "export_segmentation", "export_volume",
    "labelmap_to_segmentation", "load_medtuning_terminology", "load_result", "loaded_terminology_names",
    "modify_segment", "oriented_mask", "read_segmentation_file", "read_volume", "segment_ids", "segment_mask",
    "segment_terminology", "UNLABELLED_CASE_ATTRIBUTE",
]
