"""MedTuningLib.mrml on a real vtkMRMLScene from slicer-core: exports as the module does them
(CT, oblique, labelmap node, overlapping segments, cropped extent, two modalities), read back
by SimpleITK / slicerio and by the real backend's ``cases add``; terminology, curves, case list
and job folders."""

from __future__ import annotations

import math
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from mrml_helpers import new_context, read_volume, voxels

import slicer  # noqa: E402  (slicer-core)
import vtk  # noqa: E402

from MedTuningLib.mrml import (CONTEXT_NAME, CurveNodes, Job, JobBusy, JobSlot, MrmlError, SceneCaseList,  # noqa: E402
                               describe_segments, embedded_plot_view_node, export_case, export_label,
                               export_segmentation, export_volume, load_medtuning_terminology, load_result,
                               loaded_terminology_names, modify_segment, segment_ids, segment_mask)
from MedTuningLib.slicer_bridge.events import RunState  # noqa: E402
from MedTuningLib.slicer_bridge.process import BackendProcess, CommandChain  # noqa: E402
from MedTuningLib.slicer_bridge.settings import read_case_library  # noqa: E402

PY = sys.executable


@pytest.fixture
def ctx(tmp_path):
    return new_context(tmp_path)


@pytest.fixture
def ct(ctx, slicerio_data):
    return read_volume(ctx, slicerio_data / "CTChest4.nrrd", "CT chest ü")


def small_volume(ctx, name="MR", shape=(8, 16, 20), directions=None):
    vol = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(shape[2], shape[1], shape[0])
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    vol.SetAndObserveImageData(image)
    vol.SetSpacing(1.5, 1.25, 3.0)
    vol.SetOrigin(10.0, -5.0, 2.0)
    if directions is not None:
        vol.SetIJKToRASDirections(directions)
    array = slicer.util.arrayFromVolume(vol)
    array[:] = (np.arange(array.size).reshape(array.shape) % 311).astype(np.int16)
    slicer.util.arrayFromVolumeModified(vol)
    return vol


def box(shape, k, j, i) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[k[0]:k[1], j[0]:j[1], i[0]:i[1]] = 1
    return mask


def new_segmentation(ctx, volume, name="Seg"):
    seg = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    return seg


def test_export_ct_keeps_voxels_and_geometry_and_the_nodes_storage(ctx, ct, tmp_path, slicerio_data):
    path = export_volume(ct, tmp_path / "ct.nrrd")
    written, original = sitk.ReadImage(str(path)), sitk.ReadImage(str(slicerio_data / "CTChest4.nrrd"))
    assert written.GetSize() == original.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), original.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), original.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), original.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(original))
    assert ct.GetStorageNode() is None  # export never re-points the node's own storage


def test_export_oblique_volume_keeps_its_directions(ctx, tmp_path):
    c, s = math.cos(0.4), math.sin(0.4)
    vol = small_volume(ctx, "oblique", directions=[[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    back = read_volume(ctx, export_volume(vol, tmp_path / "oblique.nrrd"), "back")
    a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    vol.GetIJKToRASMatrix(a)
    back.GetIJKToRASMatrix(b)
    assert np.allclose([a.GetElement(r, q) for r in range(4) for q in range(4)],
                       [b.GetElement(r, q) for r in range(4) for q in range(4)], atol=1e-5)
    assert np.array_equal(voxels(back), voxels(vol))


def test_failed_write_raises_instead_of_logging(ctx, tmp_path):
    vol = small_volume(ctx)
    taken = tmp_path / "x.nrrd"
    taken.mkdir()  # a folder where the file should go: the storage node's write fails
    with pytest.raises(MrmlError, match="Could not write|was not written"):
        export_volume(vol, taken)


def test_labelmap_node_as_label_becomes_segments(ctx, tmp_path):
    vol = small_volume(ctx)
    labelmap = ctx.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "kidney labels")
    labelmap.SetAndObserveImageData(vtk.vtkImageData())
    labelmap.CopyOrientation(vol)
    values = box(voxels(vol).shape, (1, 5), (2, 9), (3, 12)) + box(voxels(vol).shape, (2, 4), (4, 6), (5, 7))
    slicer.util.updateVolumeFromArray(labelmap, values.astype(np.uint8))
    seg = slicerio.read_segmentation(str(export_label(ctx, labelmap, tmp_path / "label.seg.nrrd")))
    assert sorted(s["labelValue"] for s in seg["segments"]) == [1, 2]
    assert len(list(ctx.scene.GetNodesByClass("vtkMRMLSegmentationNode"))) == 0  # the helper node is gone


def test_overlapping_segments_are_written_as_layers(ctx, tmp_path):
    vol = small_volume(ctx)
    seg = new_segmentation(ctx, vol)
    shape = voxels(vol).shape
    wt = seg.GetSegmentation().AddEmptySegment("WT", "WT", [0.3, 0.7, 0.3])
    et = seg.GetSegmentation().AddEmptySegment("ET", "ET", [1.0, 0.85, 0.0])
    modify_segment(ctx, seg, wt, box(shape, (1, 7), (2, 14), (3, 18)), vol, "add")
    modify_segment(ctx, seg, et, box(shape, (3, 5), (5, 9), (6, 10)), vol, "add")
    assert segment_mask(ctx, seg, wt, vol).sum() == box(shape, (1, 7), (2, 14), (3, 18)).sum()  # ET did not cut WT
    written = slicerio.read_segmentation(str(export_segmentation(seg, tmp_path / "regions.seg.nrrd")))
    layers = {s["name"]: s["layer"] for s in written["segments"]}
    assert layers["WT"] != layers["ET"]


def test_cropped_extent_and_two_modalities_through_the_real_cases_add(ctx, tmp_path, cli):
    t1, t2 = small_volume(ctx, "T1"), small_volume(ctx, "T2 ü")
    seg = new_segmentation(ctx, t1, "tumour")
    tumour = seg.GetSegmentation().AddEmptySegment("tumour", "Tumour", [1.0, 0.0, 0.0])
    expected = box(voxels(t1).shape, (2, 5), (3, 8), (4, 9))
    modify_segment(ctx, seg, tumour, expected, t1, "add")
    extent = seg.GetSegmentation().GetSegment(tumour).GetRepresentation("Binary labelmap").GetExtent()
    assert extent[1] - extent[0] + 1 < 20  # stored on a cropped extent, as Slicer does
    library = tmp_path / "library"
    with pytest.raises(MrmlError, match="one volume per modality"):
        export_case(ctx, [t1], seg, tmp_path / "x", library, ["T1", "T2"])
    (tmp_path / "export").mkdir()
    params = export_case(ctx, [t1, t2], seg, tmp_path / "export", library, ["T1", "T2"], provenance="scene")
    status, events = cli(params.argv())
    assert status == 0, events
    (case,) = read_case_library(library)
    assert list(case.images) == ["T1", "T2"] and case.provenance == "scene"
    label = read_volume(ctx, library / case.label, "library label", labelmap=True) if case.label.endswith(".nrrd") \
        and not case.label.endswith(".seg.nrrd") else None
    if label is None:
        from MedTuningLib.mrml import read_segmentation_file

        stored = read_segmentation_file(ctx, library / case.label)
        assert np.array_equal(segment_mask(ctx, stored, segment_ids(stored)[0], t1), expected)
    else:
        assert np.array_equal(voxels(label) > 0, expected > 0)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(library / case.images["T2"]))), voxels(t2))


def test_result_loads_into_a_new_or_the_chosen_node_with_terminology(ctx, tmp_path):
    vol = small_volume(ctx)
    seg = new_segmentation(ctx, vol, "source")
    shape = voxels(vol).shape
    for name, region, color in (("WT", (1, 7), (0.3, 0.7, 0.3)), ("ET", (3, 5), (1.0, 0.85, 0.0))):
        sid = seg.GetSegmentation().AddEmptySegment(name, name, list(color))
        segment = seg.GetSegmentation().GetSegment(sid)
        segment.SetTag(segment.GetTerminologyEntryTagName(),
                       f"{CONTEXT_NAME}~SCT^49755003^Morphologically Altered Structure~99MEDTUNING^{name}^x~^^~"
                       "Anatomic codes - DICOM master list~SCT^12738006^Brain~^^")
        modify_segment(ctx, seg, sid, box(shape, region, (2, 12), (3, 15)), vol, "add")
    path = export_segmentation(seg, tmp_path / "result.seg.nrrd")
    fresh = load_result(ctx, path, vol, name="source")
    assert fresh is not seg and fresh.GetName() == "source (2)"  # never shadows an existing node
    chosen = new_segmentation(ctx, vol, "chosen")
    chosen.GetSegmentation().AddEmptySegment("old", "old")
    into = load_result(ctx, path, vol, target=chosen)
    assert into is chosen
    for node in (fresh, chosen):
        described = describe_segments(node)
        assert [d["name"] for d in described] == ["WT", "ET"]
        assert all(d["terminology"].startswith(CONTEXT_NAME) for d in described)
        ids = segment_ids(node)
        assert segment_mask(ctx, node, ids[0], vol).sum() > segment_mask(ctx, node, ids[1], vol).sum() > 0
        assert (segment_mask(ctx, node, ids[1], vol) <= segment_mask(ctx, node, ids[0], vol)).all()  # overlap kept


def test_medtuning_terminology_context_resolves(ctx):
    assert load_medtuning_terminology(ctx) == CONTEXT_NAME
    assert CONTEXT_NAME in loaded_terminology_names(ctx)
    logic = ctx.terminologies_logic()
    category = slicer.vtkSlicerTerminologyCategory()
    assert logic.GetNthCategoryInTerminology(CONTEXT_NAME, 0, category)
    kinds = []
    for i in range(logic.GetNumberOfTypesInTerminologyCategory(CONTEXT_NAME, category)):
        kind = slicer.vtkSlicerTerminologyType()
        logic.GetNthTypeInTerminologyCategory(CONTEXT_NAME, category, i, kind)
        kinds.append(kind.GetCodeValue())
    assert kinds == ["ET", "TC", "WT"]
    assert load_medtuning_terminology(ctx) == CONTEXT_NAME and loaded_terminology_names(ctx).count(CONTEXT_NAME) == 1


def test_curve_nodes_and_an_owned_plot_view(ctx):
    state = RunState()
    for epoch, (loss, dice) in enumerate([(0.9, 0.1), (0.6, 0.4), (0.4, 0.6)], start=1):
        state.apply({"event": "metric", "phase": "train", "epoch": epoch, "name": "loss", "value": loss})
        state.apply({"event": "metric", "phase": "validate", "epoch": epoch, "name": "dice/WT", "value": dice})
    curves = CurveNodes(ctx.scene)
    chart = curves.update(state)
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    table = curves.tables["train/loss"].GetTable()
    assert [table.GetValue(r, 1).ToDouble() for r in range(table.GetNumberOfRows())] == [0.9, 0.6, 0.4]
    owner = ctx.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    view = embedded_plot_view_node(ctx.scene, owner)
    assert view.GetParentLayoutNode() is owner and embedded_plot_view_node(ctx.scene, owner) is view
    curves.remove()
    assert ctx.scene.GetNodesByClass("vtkMRMLPlotSeriesNode").GetNumberOfItems() == 0


def test_scene_case_list_never_drifts_when_a_node_is_deleted(ctx):
    cases = SceneCaseList()
    vols = [small_volume(ctx, f"v{i}") for i in range(3)]
    segs = [new_segmentation(ctx, v, f"s{i}") for i, v in enumerate(vols)]
    made = [cases.add([v], s) for v, s in zip(vols, segs)]
    ctx.scene.RemoveNode(vols[1])
    live = cases.live(ctx)
    assert [c.key for c in live] == [made[0].key, made[2].key]
    assert cases.remove(made[2].key) and [c.key for c in cases.live(ctx)] == [made[0].key]
    with pytest.raises(MrmlError):
        cases.add([segs[0]], segs[0])


LAUNCHER_THAT_LEAVES = """
    import subprocess, sys
    subprocess.Popen(sys.argv[1:])  # starts the backend and exits at once: the backend keeps the pipes
"""


def test_job_keeps_its_folder_and_the_slot_while_the_backend_lives(ctx, tmp_path):
    launcher = tmp_path / "launcher.py"
    launcher.write_text(textwrap.dedent(LAUNCHER_THAT_LEAVES), encoding="utf-8")
    stop = tmp_path / "go"
    backend = [PY, "-c", f"import os, time\nwhile not os.path.exists({str(stop)!r}): time.sleep(0.05)\n"
                         "print('{\"event\": \"done\", \"status\": \"ok\"}', flush=True)"]
    folder = ctx.new_temp_dir()
    slot = JobSlot()
    job = slot.start(lambda: Job("segment", CommandChain([lambda: BackendProcess([PY, str(launcher), *backend])]).start(),
                                 folder, lambda state: "loaded"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    assert not job.completed and job.backend_alive and folder.is_dir()  # the launcher is gone, the backend not
    with pytest.raises(JobBusy):
        slot.start(lambda: job)
    stop.write_text("go")
    assert job.wait(timeout=30) and job.ok and job.result == "loaded"
    assert not folder.exists() and not slot.busy


def test_segmentation_on_another_grid_is_resampled_onto_the_volume(ctx, tmp_path, cli):
    """Drawn on a finer grid (e.g. oversampled in Segment Editor): exported on the volume's grid."""
    from MedTuningLib.mrml import read_segmentation_file
    from MedTuningLib.mrml.nodes import on_volume_grid

    ct = small_volume(ctx, "CT")
    fine = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fine grid")
    image = vtk.vtkImageData()
    image.SetDimensions(40, 32, 16)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    fine.SetAndObserveImageData(image)
    fine.SetSpacing(0.75, 0.625, 1.5)
    fine.SetOrigin(10.0, -5.0, 2.0)
    seg = new_segmentation(ctx, fine, "fine labels")
    sid = seg.GetSegmentation().AddEmptySegment("lesion", "Lesion", [1.0, 0.5, 0.0])
    other = seg.GetSegmentation().AddEmptySegment("rim", "Rim", [0.0, 0.5, 1.0])
    fine_mask = box((16, 32, 40), (4, 10), (6, 20), (8, 30))
    modify_segment(ctx, seg, sid, fine_mask, fine, "add")
    modify_segment(ctx, seg, other, box((16, 32, 40), (6, 8), (10, 14), (12, 16)), fine, "add")
    assert on_volume_grid(seg, fine) and not on_volume_grid(seg, ct)
    (tmp_path / "export").mkdir()
    params = export_case(ctx, [ct], seg, tmp_path / "export", tmp_path / "library", ["CT"])
    status, events = cli(params.argv())
    assert status == 0, events
    (case,) = read_case_library(tmp_path / "library")
    stored = read_segmentation_file(ctx, tmp_path / "library" / case.label)
    assert on_volume_grid(stored, ct)
    names = {d["name"]: d["id"] for d in describe_segments(stored)}
    assert set(names) == {"Lesion", "Rim"}
    expected = fine_mask[::2, ::2, ::2]  # voxel i of the volume is voxel 2i of the fine grid
    assert np.array_equal(segment_mask(ctx, stored, names["Lesion"], ct), expected)
    assert segment_mask(ctx, stored, names["Rim"], ct).sum() > 0  # the overlapping segment kept
    assert ctx.scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 2  # no helper left
