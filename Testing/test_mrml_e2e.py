"""The module's whole loop on a real slicer-core scene against the real backend processes, with a
two-modality scene case (one volume per modality): scene case -> fine-tune -> segment into the
chosen node -> correct with segment-editor logic (paint, erase) -> add as a "correction" case ->
re-tune -> segment again. One tiny model, trained once for the module."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from mrml_helpers import new_context, read_volume, voxels as read_volume_array

from MedTuningLib.mrml import (MedTuningMrmlLogic, MrmlError, describe_segments, modify_segment,  # noqa: E402
                               read_segmentation_file, segment_ids, segment_mask)
from MedTuningLib.slicer_bridge.settings import BridgeSettings, read_case_library, read_model_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODALITIES = ["CT", "CT contrast"]
# A 6 mm working grid (half the CT's in-plane resolution) and one validation: the backend processes and the
# scene round trips are what is tested here, not the model (segment on the coarse grid takes ~2 s instead of ~25 s).
TINY = dict(task="custom", arch="vit_upernet", backbone="vit_tiny_patch16_224", weights="none", crop=(8, 32, 32),
            batch=1, steps_per_epoch=4, device="cpu", extra=["--spacing", "6,6,10", "--val-every", "2"])


def finished(job, timeout: float):
    assert job.wait(timeout=timeout), f"{job.kind} did not finish"
    assert job.ok, f"{job.state.error_code}: {job.state.error_message} / {job.failure}\n" + \
        (job.chain.last.stderr_tail() if job.chain.last else "")
    return job.result


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """Scene with the CT and its segmentation (read by Slicer's storage nodes), and a tuned model."""
    import slicerio
    import slicer

    tmp = tmp_path_factory.mktemp("mrml-e2e")
    data = Path(slicerio.__file__).parent / "data"
    ctx = new_context(tmp)
    ct = read_volume(ctx, data / "CTChest4.nrrd", "CT chest")
    # A second modality on the same grid (as a co-registered series would be).
    second = read_volume(ctx, data / "CTChest4.nrrd", "CT chest contrast")
    array = slicer.util.arrayFromVolume(second)
    array[:] = (array // 2 + 100).astype(array.dtype)
    slicer.util.arrayFromVolumeModified(second)
    labels = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "chest segmentation")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(data / "Segmentation.seg.nrrd"))
    assert storage.ReadData(labels)
    settings = BridgeSettings(models_dir=str(tmp / "models"), cases_dir=str(tmp / "cases"), device="cpu")
    logic = MedTuningMrmlLogic(ctx, settings, python=sys.executable, library_root=ROOT)
    job = logic.start_fine_tune([([ct, second], labels, "train")], MODALITIES, "chest tiny", epochs=2, **TINY)
    model = finished(job, 1500)
    return ctx, logic, [ct, second], labels, read_model_info(model), job.state


def test_fine_tune_from_the_scene_gives_a_model_and_curve_nodes(loop):
    ctx, logic, volumes, labels, model, state = loop
    assert model.usable and model.modalities == MODALITIES  # not MODALITY_COUNT_MISMATCH
    assert model.pretrained is False  # --weights none is recorded and reported
    assert {s.name for s in model.segments} == {d["name"] for d in describe_segments(labels)}
    chart = logic.update_curves(state)
    table = logic.curves.tables["train/loss"].GetTable()
    assert chart.GetNumberOfPlotSeriesNodes() >= 1 and table.GetNumberOfRows() == len(state.curves["train/loss"]) > 0
    assert (ctx.temp_root is not None) and not any(ctx.temp_root.iterdir())  # job folders removed


def test_segment_correct_add_retune_segment_again(loop):
    ctx, logic, volumes, labels, model, _ = loop
    ct = volumes[0]
    chosen = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my result")
    result = finished(logic.start_segmentation(model, volumes, device="cpu", output_node=chosen), 900)
    assert result is chosen
    names = [d["name"] for d in describe_segments(result)]
    assert sorted(names) == sorted(s.name for s in model.segments)
    assert all(d["terminology"] for d in describe_segments(result))
    first = segment_ids(result)[0]
    before = segment_mask(ctx, result, first, ct)
    shape = before.shape
    assert shape == tuple(reversed(ct.GetImageData().GetDimensions()))  # geometry of the input volume

    # Correct on real segment-editor logic: paint a block (overwriting other segments there, as
    # Slicer's Segment Editor does by default: this custom model's classes are disjoint), erase another.
    paint = np.zeros(shape, np.uint8)
    paint[shape[0] // 4:shape[0] // 2, 10:30, 10:30] = 1
    erase = np.zeros(shape, np.uint8)
    erase[shape[0] // 2:, shape[1] // 2:, shape[2] // 2:] = 1
    modify_segment(ctx, result, first, paint, ct, "add", overwrite_others=True)
    modify_segment(ctx, result, first, erase, ct, "remove")
    corrected = ((before | paint) & (1 - erase)).astype(np.uint8)
    assert np.array_equal(segment_mask(ctx, result, first, ct), corrected)
    others = [segment_mask(ctx, result, i, ct) for i in segment_ids(result)[1:]]
    assert not any((m & paint).any() for m in others)  # the painted block belongs to one segment only

    with pytest.raises(MrmlError, match="One case id"):  # one id cannot name two cases
        logic.start_add_cases([(volumes, result, "train"), (volumes, result, "val")], MODALITIES, case_id="mine")
    finished(logic.start_add_cases([(volumes, result, "train")], MODALITIES, provenance="correction",
                                   case_id="corrected-chest", source="reading room 2"), 300)
    library = logic.settings.resolved_cases_dir()
    cases = read_case_library(library)
    assert [c.provenance for c in cases] == ["scene", "correction"]
    assert cases[-1].case_id == "corrected-chest" and cases[-1].source == "reading room 2"
    assert all(list(c.images) == MODALITIES for c in cases)
    assert Path(cases[-1].from_model) == model.path  # the correction effort is measured against the model's result
    stored = read_segmentation_file(ctx, library / cases[-1].label)
    by_name = {d["name"]: d["id"] for d in describe_segments(stored)}
    first_name = result.GetSegmentation().GetSegment(first).GetName()
    assert np.array_equal(segment_mask(ctx, stored, by_name[first_name], ct), corrected)  # exactly the corrected voxels
    effort = cases[-1].effort[first_name]
    assert effort.voxels_added == int((corrected & (1 - before)).sum())
    assert effort.voxels_removed == int((before & (1 - corrected)).sum())

    retuned = read_model_info(finished(logic.start_retune(model, epochs=1, device="cpu", steps_per_epoch=2), 1500))
    assert retuned.usable and retuned.name == f"{model.name}-round1" and retuned.modalities == MODALITIES
    with pytest.raises(MrmlError, match="2 input volume"):
        logic.start_segmentation(retuned, [ct], device="cpu")  # one volume for a two-modality model
    again = finished(logic.start_segmentation(retuned, volumes, device="cpu"), 900)
    assert again is not result and again.GetSegmentation().GetNumberOfSegments() == len(model.segments)


def test_existing_result_is_never_overwritten_unasked(loop, tmp_path):
    from MedTuningLib.mrml import export_volume
    from MedTuningLib.slicer_bridge.commands import SegmentParams, backend_argv
    from MedTuningLib.slicer_bridge.process import BackendProcess

    ctx, logic, volumes, labels, model, _ = loop
    images = [export_volume(v, tmp_path / f"{i}.nrrd") for i, v in enumerate(volumes)]
    out = tmp_path / "taken.seg.nrrd"
    out.write_bytes(b"user's file")
    run = BackendProcess(backend_argv(sys.executable, SegmentParams(model=model.path, images=images, out=out,
                                                                    device="cpu")), pythonpath=ROOT).start()
    assert run.wait(timeout=900) == 2 and run.state.error_code == "OUTPUT_EXISTS"
    assert out.read_bytes() == b"user's file"


def test_stubborn_training_is_killed_with_its_children(loop, tmp_path):
    """A real training that does not stop within the grace is killed as a whole process group."""
    import time

    import psutil

    from MedTuningLib.slicer_bridge.commands import TrainParams, backend_argv
    from MedTuningLib.slicer_bridge.process import BackendProcess

    ctx, logic, volumes, labels, model, _ = loop
    params = TrainParams(library=logic.settings.resolved_cases_dir(), out=tmp_path / "killed", epochs=1000, **TINY)
    run = BackendProcess(backend_argv(sys.executable, params), workdir=params.workdir(), pythonpath=ROOT,
                         grace_s=0.0).start()
    deadline = time.monotonic() + 600
    while not any(e["event"] == "progress" and e.get("phase") == "train" for e in run.poll()):
        assert time.monotonic() < deadline and not run.finished, run.stderr_tail()
        time.sleep(0.05)
    tree = [run.pid] + [c.pid for c in psutil.Process(run.pid).children(recursive=True)]
    run.request_stop()
    run.wait(timeout=60)
    assert run.finished and run.killed and run.state.cancelled and not run.backend_alive
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in tree)



def test_next_scan_to_correct_is_loaded_segmented_and_replaced_by_its_correction(loop, tmp_path):
    """"Next scan to correct": scene volumes go into the library as an unlabelled scan, suggest ranks the
    library's unlabelled scans, the top one loads as volume nodes (one per modality) and segments, and once
    added back corrected it is a labelled case and no longer unlabelled."""
    ctx, logic, volumes, _, model, _ = loop
    library = logic.settings.resolved_cases_dir()
    before = {c.case_id for c in read_case_library(library)}
    with pytest.raises(MrmlError, match="needs a segmentation"):
        logic.start_add_cases([(volumes, None, "train")], MODALITIES)
    finished(logic.start_add_cases([(volumes, None, "unlabelled")], MODALITIES), 300)
    unlabelled = [c for c in read_case_library(library) if c.case_id not in before]
    assert [(c.split, c.label, list(c.images)) for c in unlabelled] == [("unlabelled", "", MODALITIES)]
    scan_id = unlabelled[0].case_id

    ranking = finished(logic.start_suggest(model, device="cpu"), 600)
    assert [e["id"] for e in ranking] == [scan_id] and ranking[0]["score"] >= 0
    loaded = logic.load_scan_to_correct(ranking[0], model)
    assert [n.GetName() for n in loaded] == [f"{scan_id} {m}" for m in MODALITIES]
    for node, original in zip(loaded, volumes):
        assert np.array_equal(read_volume_array(node), read_volume_array(original))
    with pytest.raises(MrmlError, match="reads 1.*choose a model") as refused:
        logic.load_scan_to_correct(ranking[0], dataclasses.replace(model, modalities=["CT"]))
    assert refused.value.code == "MODALITY_COUNT_MISMATCH"
    volumes_before = ctx.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    with pytest.raises(MrmlError, match="Could not read the scan") as unreadable:  # the second image is gone
        logic.load_scan_to_correct({**ranking[0], "images": [ranking[0]["images"][0], str(tmp_path / "gone.nrrd")]},
                                   model)
    assert unreadable.value.code == "FILE_UNREADABLE"
    assert ctx.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes_before  # the first one went too

    result = finished(logic.start_segmentation(model, loaded, device="cpu"), 900)
    finished(logic.start_add_cases([(loaded, result, "train")], MODALITIES, provenance="correction"), 300)
    cases = {c.case_id: c for c in read_case_library(library)}
    assert scan_id not in cases  # the unlabelled entry went once its labelled copy was in
    added = [c for c in cases.values() if c.case_id not in before]
    assert [(c.split, c.provenance) for c in added] == [("train", "correction")]
