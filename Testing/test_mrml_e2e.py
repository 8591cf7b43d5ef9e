"""The module's whole loop on a real slicer-core scene against the real backend processes:
scene case -> fine-tune -> segment into the chosen node -> correct with segment-editor logic
(paint, erase) -> add as a "correction" case -> re-tune -> segment again. One tiny model, trained
once for the module."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from mrml_helpers import new_context, read_volume

from MedTuningLib.mrml import (MedTuningMrmlLogic, describe_segments, modify_segment,  # noqa: E402
                               read_segmentation_file, segment_ids, segment_mask)
from MedTuningLib.slicer_bridge.settings import BridgeSettings, read_case_library, read_model_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(task="custom", arch="vit_upernet", backbone="vit_tiny_patch16_224", weights="none", crop=(8, 32, 32),
            batch=1, steps_per_epoch=4, device="cpu")


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
    labels = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "chest segmentation")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(data / "Segmentation.seg.nrrd"))
    assert storage.ReadData(labels)
    settings = BridgeSettings(models_dir=str(tmp / "models"), cases_dir=str(tmp / "cases"), device="cpu")
    logic = MedTuningMrmlLogic(ctx, settings, python=sys.executable, library_root=ROOT)
    job = logic.start_fine_tune([([ct], labels, "train")], ["CT"], "chest tiny", epochs=2, **TINY)
    model = finished(job, 1500)
    return ctx, logic, ct, labels, read_model_info(model), job.state


def test_fine_tune_from_the_scene_gives_a_model_and_curve_nodes(loop):
    ctx, logic, ct, labels, model, state = loop
    assert model.usable and model.modalities == ["CT"]
    assert {s.name for s in model.segments} == {d["name"] for d in describe_segments(labels)}
    chart = logic.update_curves(state)
    table = logic.curves.tables["train/loss"].GetTable()
    assert chart.GetNumberOfPlotSeriesNodes() >= 1 and table.GetNumberOfRows() == len(state.curves["train/loss"]) > 0
    assert (ctx.temp_root is not None) and not any(ctx.temp_root.iterdir())  # job folders removed


def test_segment_correct_add_retune_segment_again(loop):
    ctx, logic, ct, labels, model, _ = loop
    chosen = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my result")
    result = finished(logic.start_segmentation(model, [ct], device="cpu", output_node=chosen), 900)
    assert result is chosen
    names = [d["name"] for d in describe_segments(result)]
    assert sorted(names) == sorted(s.name for s in model.segments)
    assert all(d["terminology"] for d in describe_segments(result))
    first = segment_ids(result)[0]
    before = segment_mask(ctx, result, first, ct)
    shape = before.shape
    assert shape == tuple(reversed(ct.GetImageData().GetDimensions()))  # geometry of the input volume

    # Correct on real segment-editor logic: paint a block, erase another.
    paint = np.zeros(shape, np.uint8)
    paint[shape[0] // 4:shape[0] // 2, 10:30, 10:30] = 1
    erase = np.zeros(shape, np.uint8)
    erase[shape[0] // 2:, shape[1] // 2:, shape[2] // 2:] = 1
    modify_segment(ctx, result, first, paint, ct, "add")
    modify_segment(ctx, result, first, erase, ct, "remove")
    corrected = ((before | paint) & (1 - erase)).astype(np.uint8)
    assert np.array_equal(segment_mask(ctx, result, first, ct), corrected)

    finished(logic.start_add_cases([([ct], result, "train")], ["CT"], provenance="correction"), 300)
    library = logic.settings.resolved_cases_dir()
    cases = read_case_library(library)
    assert [c.provenance for c in cases] == ["scene", "correction"]
    stored = read_segmentation_file(ctx, library / cases[-1].label)
    by_name = {d["name"]: d["id"] for d in describe_segments(stored)}
    first_name = result.GetSegmentation().GetSegment(first).GetName()
    assert np.array_equal(segment_mask(ctx, stored, by_name[first_name], ct), corrected)  # exactly the corrected voxels

    retuned = read_model_info(finished(logic.start_retune(model, epochs=1, device="cpu", steps_per_epoch=2), 1500))
    assert retuned.usable and retuned.name == f"{model.name}-round1" and retuned.modalities == ["CT"]
    again = finished(logic.start_segmentation(retuned, [ct], device="cpu"), 900)
    assert again is not result and again.GetSegmentation().GetNumberOfSegments() == len(model.segments)
