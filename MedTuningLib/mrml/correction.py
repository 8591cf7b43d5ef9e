"""Corrections on real segment-editor logic (paint a region, erase a region) and segment masks.

:func:`modify_segment` hands a voxel mask on a volume's grid to
``vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap`` — what Slicer's Paint / Erase effects do
(Slicer 5.10+ and slicer-core; in older Slicer releases corrections are made in the embedded Segment
Editor widget). Other segments are left as they are by default (``OverwriteNone``), because BraTS
regions overlap (ET inside TC inside WT).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from MedTuningLib.mrml.context import MrmlContext, MrmlError

MODES = ("add", "remove", "set")


def oriented_mask(mask: np.ndarray, volume: Any) -> Any:
    """A ``vtkOrientedImageData`` holding ``mask`` (``[k, j, i]``, as ``arrayFromVolume``) on ``volume``'s grid."""
    dims = volume.GetImageData().GetDimensions()
    if tuple(mask.shape) != (dims[2], dims[1], dims[0]):
        raise MrmlError(f"mask shape {mask.shape} is not the volume's {(dims[2], dims[1], dims[0])}")
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*dims)
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    image.SetImageToWorldMatrix(ijk_to_ras)
    data = numpy_support.numpy_to_vtk(np.ascontiguousarray(mask, dtype=np.uint8).ravel(), deep=True,
                                      array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(data)
    return image


def editor_node(context: MrmlContext, tag: str = "MedTuning") -> Any:
    """The segment editor parameter node MedTuning uses (a singleton, made when missing)."""
    node = context.scene.GetSingletonNode(tag, "vtkMRMLSegmentEditorNode")
    if node is None:
        node = slicer.vtkMRMLSegmentEditorNode()
        node.SetSingletonTag(tag)
        node = context.scene.AddNode(node)
    return node


def modify_segment(context: MrmlContext, segmentation: Any, segment_id: str, mask: np.ndarray, volume: Any,
                   mode: str = "add", overwrite_others: bool = False) -> None:
    """Paint (``add``), erase (``remove``) or replace (``set``) ``mask`` in one segment."""
    if mode not in MODES:
        raise MrmlError(f"mode must be one of {', '.join(MODES)}")
    if not hasattr(slicer, "vtkSlicerSegmentEditorLogic"):
        raise MrmlError("this Slicer has no vtkSlicerSegmentEditorLogic (5.10+): correct in the Segment Editor")
    if segmentation.GetSegmentation().GetSegment(segment_id) is None:
        raise MrmlError(f"{segmentation.GetName()} has no segment {segment_id!r}")
    node = editor_node(context)
    node.SetOverwriteMode(node.OverwriteAllSegments if overwrite_others else node.OverwriteNone)
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(context.scene)
    logic.SetSegmentEditorNode(node)
    logic.SetSegmentationNode(segmentation)
    logic.SetSourceVolumeNode(volume)
    modes = {"add": logic.ModificationModeAdd, "remove": logic.ModificationModeRemove,
             "set": logic.ModificationModeSet}
    logic.ModifySegmentByLabelmap(segmentation, segment_id, oriented_mask(mask, volume), modes[mode], False, False)


def segment_mask(context: MrmlContext, segmentation: Any, segment_id: str, volume: Any) -> np.ndarray:
    """The segment's voxels on ``volume``'s grid (``[k, j, i]`` uint8 0/1)."""
    labelmap = context.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__medtuning_mask__")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not context.segmentations_logic().ExportSegmentsToLabelmapNode(segmentation, ids, labelmap, volume):
            raise MrmlError(f"segment {segment_id!r} could not be exported")
        image = labelmap.GetImageData()
        dims = image.GetDimensions()
        values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
        return (values > 0).astype(np.uint8)
    finally:
        display: Optional[Any] = labelmap.GetDisplayNode()
        if display is not None:
            context.scene.RemoveNode(display)
        context.scene.RemoveNode(labelmap)
