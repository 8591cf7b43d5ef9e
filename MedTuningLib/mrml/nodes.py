"""MRML nodes to files and back, through Slicer's own storage nodes.

Export never re-points a node's own storage node at the written file (so "Save" in Slicer still
writes where the user saved before), and every write is checked: a failure raises
:class:`~.context.MrmlError` instead of being only logged (``slicer.util.exportNode`` returns
``False`` and logs; its default ``properties={}`` is also shared between calls). Storage nodes are
used directly because they are the same in 3D Slicer 5.4+ and in slicer-core, and need no Qt.

- volumes (scalar, labelmap) -> ``.nrrd`` (oblique directions kept: NRRD stores them);
- segmentations -> ``.seg.nrrd`` as Slicer writes it (layers for overlapping segments, cropped
  extents, names, colours, terminology); a labelmap volume node used as a label is first turned
  into a segmentation with the segment names of its colour table;
- a result ``.seg.nrrd`` is read by ``vtkMRMLSegmentationStorageNode`` into a new node, or into the
  node the user chose (its segments replaced), on the geometry of the input volume.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, List, Optional, Union

import slicer
import vtk

from MedTuningLib.mrml.context import MrmlContext, MrmlError
from MedTuningLib.slicer_bridge.export import unique_node_name

PathLike = Union[str, "os.PathLike[str]"]
BINARY_LABELMAP = "Binary labelmap"


def is_volume(node: Any) -> bool:
    return node is not None and node.IsA("vtkMRMLScalarVolumeNode")


def is_labelmap(node: Any) -> bool:
    return node is not None and node.IsA("vtkMRMLLabelMapVolumeNode")


def is_segmentation(node: Any) -> bool:
    return node is not None and node.IsA("vtkMRMLSegmentationNode")


def _written(path: Path, what: str) -> Path:
    if not path.is_file() or path.stat().st_size == 0:
        raise MrmlError(f"{what} was not written to {path}")
    return path


def export_volume(volume: Any, path: PathLike) -> Path:
    """Write a scalar or labelmap volume node to ``path`` (``.nrrd``); the node is not changed."""
    if not is_volume(volume) or volume.GetImageData() is None:
        raise MrmlError(f"{getattr(volume, 'GetName', lambda: volume)()} is not a volume with voxels")
    path = Path(path)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(1)
    if not storage.WriteData(volume):
        raise MrmlError(f"Could not write {volume.GetName()} to {path}: check the folder is writable and has space")
    return _written(path, volume.GetName())


def read_volume(context: MrmlContext, path: PathLike, name: str) -> Any:
    """A new scalar volume node read from ``path`` by Slicer's own volume storage node (as "Add data" does)."""
    node = context.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        context.scene.RemoveNode(node)
        raise MrmlError(f"Could not read the scan {path}: check that the case library's file is there and readable",
                        code="FILE_UNREADABLE")
    return node


def export_segmentation(segmentation: Any, path: PathLike) -> Path:
    """Write a segmentation node to ``path`` (``.seg.nrrd``) as 3D Slicer saves it."""
    if not is_segmentation(segmentation):
        raise MrmlError(f"{segmentation.GetName()} is not a segmentation")
    seg = segmentation.GetSegmentation()
    if seg.GetNumberOfSegments() == 0:
        raise MrmlError(f"{segmentation.GetName()} has no segments: paint at least one segment first")
    if _source_name(seg) != BINARY_LABELMAP:
        raise MrmlError(f"{segmentation.GetName()} is stored as '{_source_name(seg)}', not as a labelmap: "
                        "in the Segmentations module set its source representation to binary labelmap")
    path = Path(path)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(1)
    if not storage.WriteData(segmentation):
        raise MrmlError(f"Could not write {segmentation.GetName()} to {path}: check the folder is writable")
    return _written(path, segmentation.GetName())


def _source_name(seg: Any) -> str:
    """Source ("master" before Slicer 5.4's rename) representation of a ``vtkSegmentation``."""
    getter = getattr(seg, "GetSourceRepresentationName", None) or seg.GetMasterRepresentationName
    return getter()


def labelmap_to_segmentation(context: MrmlContext, labelmap: Any, name: str = "") -> Any:
    """A new segmentation node from a labelmap volume: one segment per label, named by its colour table."""
    segmentation = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or labelmap.GetName())
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(labelmap)
    if not context.segmentations_logic().ImportLabelmapToSegmentationNode(labelmap, segmentation):
        context.scene.RemoveNode(segmentation)
        raise MrmlError(f"{labelmap.GetName()} could not be turned into segments")
    return segmentation


def export_label(context: MrmlContext, label: Any, path: PathLike, volume: Any = None) -> Path:
    """Write a case's label (segmentation node or labelmap volume node) to ``path`` (``.seg.nrrd``).

    With ``volume``, a segmentation that is not on the volume's grid (drawn on another volume,
    oversampled) is written resampled onto it, so the backend gets image and label on one grid.
    """
    if is_segmentation(label):
        if volume is None or on_volume_grid(label, volume):
            return export_segmentation(label, path)
        temporary = resampled_to_volume(context, label, volume)
        try:
            return export_segmentation(temporary, path)
        finally:
            context.scene.RemoveNode(temporary)
    if is_labelmap(label):
        temporary = labelmap_to_segmentation(context, label, f"{label.GetName()} (export)")
        try:
            return export_segmentation(temporary, path)
        finally:
            context.scene.RemoveNode(temporary)
    raise MrmlError(f"{label.GetName()} is neither a segmentation nor a labelmap volume")


# -- grids ---------------------------------------------------------------------------------------

def _matrix(getter: Any) -> Any:
    matrix = vtk.vtkMatrix4x4()
    getter(matrix)
    return matrix


def on_volume_grid(segmentation: Any, volume: Any, tolerance: float = 1e-4) -> bool:
    """True when every segment's labelmap lies on ``volume``'s voxel grid (a sub-grid counts:
    same spacing and directions, an integer offset, as Slicer crops segment extents)."""
    to_ijk = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Invert(_matrix(volume.GetIJKToRASMatrix), to_ijk)
    seg = segmentation.GetSegmentation()
    for segment_id in segment_ids(segmentation):
        image = seg.GetSegment(segment_id).GetRepresentation(BINARY_LABELMAP)
        if image is None or image.IsEmpty():
            continue
        relative = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Multiply4x4(to_ijk, _matrix(image.GetImageToWorldMatrix), relative)
        for r in range(3):
            for c in range(3):
                if abs(relative.GetElement(r, c) - (1.0 if r == c else 0.0)) > tolerance:
                    return False
            offset = relative.GetElement(r, 3)
            if abs(offset - round(offset)) > 1e-3:
                return False
    return True


def resampled_to_volume(context: MrmlContext, segmentation: Any, volume: Any) -> Any:
    """A new (temporary) segmentation node with every segment resampled onto ``volume``'s grid.

    Names, colours and terminology tags are kept; overlapping segments stay overlapping (each is
    resampled on its own, nearest neighbour). The caller removes the node when done.
    """
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(volume.GetImageData().GetExtent())
    reference.SetGeometryFromImageToWorldMatrix(_matrix(volume.GetIJKToRASMatrix))
    target = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{segmentation.GetName()} (resampled)")
    target.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    source = segmentation.GetSegmentation()
    for segment_id in segment_ids(segmentation):
        original = source.GetSegment(segment_id)
        image = original.GetRepresentation(BINARY_LABELMAP)
        mask = slicer.vtkOrientedImageData()
        if image is not None and not image.IsEmpty():
            single = vtk.vtkImageThreshold()  # a shared layer holds other segments' values too
            single.SetInputData(image)
            single.ThresholdBetween(original.GetLabelValue(), original.GetLabelValue())
            single.SetInValue(1)
            single.SetOutValue(0)
            single.SetOutputScalarTypeToUnsignedChar()
            single.Update()
            binary = slicer.vtkOrientedImageData()
            binary.ShallowCopy(single.GetOutput())
            binary.CopyDirections(image)
            if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                    binary, reference, mask, False, True):
                context.scene.RemoveNode(target)
                raise MrmlError(f"Segment {original.GetName()} could not be resampled onto {volume.GetName()}")
        copy = slicer.vtkSegment()
        copy.DeepCopyMetadata(original)  # name, colour, tags (terminology)
        copy.AddRepresentation(BINARY_LABELMAP, mask)
        copy.SetLabelValue(1)
        target.GetSegmentation().AddSegment(copy, segment_id)
    return target


# -- segments ------------------------------------------------------------------------------------

def segment_ids(segmentation: Any) -> List[str]:
    ids = vtk.vtkStringArray()
    segmentation.GetSegmentation().GetSegmentIDs(ids)
    return [ids.GetValue(i) for i in range(ids.GetNumberOfValues())]


def segment_terminology(segment: Any) -> str:
    """The segment's serialized terminology entry (``vtkSegment.GetTerminology()`` on 5.10+)."""
    if hasattr(segment, "GetTerminology"):
        return segment.GetTerminology()
    value = vtk.reference("") if hasattr(vtk, "reference") else None
    if value is not None and segment.GetTag(segment.GetTerminologyEntryTagName(), value):
        return str(value)
    return ""


def describe_segments(segmentation: Any) -> List[dict]:
    """``[{"id", "name", "color", "terminology"}]`` in the segmentation's order."""
    seg = segmentation.GetSegmentation()
    out = []
    for segment_id in segment_ids(segmentation):
        segment = seg.GetSegment(segment_id)
        out.append({"id": segment_id, "name": segment.GetName(), "color": tuple(segment.GetColor()),
                    "terminology": segment_terminology(segment)})
    return out


# -- results -------------------------------------------------------------------------------------

def read_segmentation_file(context: MrmlContext, path: PathLike, name: str = "") -> Any:
    """A new segmentation node in the scene holding what ``path`` (``.seg.nrrd``) holds."""
    path = Path(path)
    if not path.is_file():
        raise MrmlError(f"The result {path} does not exist")
    node = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or path.name.split(".")[0])
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node) or node.GetSegmentation().GetNumberOfSegments() == 0:
        context.scene.RemoveNode(node)
        raise MrmlError(f"The result {path} could not be read as a segmentation")
    return node


def load_result(context: MrmlContext, path: PathLike, reference_volume: Any, target: Any = None,
                name: str = "", show_3d: bool = True) -> Any:
    """Load a result ``.seg.nrrd`` and return its segmentation node.

    ``target`` None: a new node named ``name`` (made unique, so no earlier result is shadowed).
    ``target`` a segmentation node the user chose: its segments are replaced by the result's.
    Either way the node takes the reference geometry and parent transform of ``reference_volume``
    and gets display nodes (and a 3D surface when ``show_3d``).
    """
    loaded = read_segmentation_file(context, path)
    if target is not None:
        destination = target.GetSegmentation()
        source = loaded.GetSegmentation()
        destination.RemoveAllSegments()
        for segment_id in segment_ids(loaded):
            if not destination.CopySegmentFromSegmentation(source, segment_id):
                raise MrmlError(f"Segment {source.GetSegment(segment_id).GetName()} could not be copied")
        context.scene.RemoveNode(loaded)
        result = target
    else:
        existing = [n.GetName() for n in _nodes(context, "vtkMRMLSegmentationNode") if n is not loaded]
        loaded.SetName(unique_node_name(name or loaded.GetName(), existing))
        result = loaded
    result.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    transform_id = reference_volume.GetTransformNodeID()
    result.SetAndObserveTransformNodeID(transform_id)  # shown where the volume is shown
    result.CreateDefaultDisplayNodes()
    if show_3d:
        result.CreateClosedSurfaceRepresentation()
    return result


def _nodes(context: MrmlContext, class_name: str) -> Iterable[Any]:
    collection = context.scene.GetNodesByClass(class_name)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
