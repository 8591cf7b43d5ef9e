"""Segment several volumes of a real slicer-core scene in one backend job (``segment --batch-list``):
each good volume gets its own segmentation node on its geometry, a bad one is reported with its
code while the others load, and the backend loads the model once."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from engine_helpers import TINY_TRAIN, make_blob_library, write_blob_case
from mrml_helpers import new_context, read_volume

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from conftest import run_cli

    root = tmp_path_factory.mktemp("mrml-batch")
    library = make_blob_library(run_cli, root, n_train=2, n_test=0)
    status, events = run_cli(["train", "--library", str(library), "--out", str(root / "model"), "--labels", "Blob=1",
                              *TINY_TRAIN, "--epochs", "1", "--steps-per-epoch", "2", "--seed", "1"])
    assert status == 0, events[-3:]
    return root / "model"


def test_batch_of_scene_volumes_one_job_one_model_load(model, tmp_path):
    import slicer

    from MedTuningLib.mrml import MedTuningMrmlLogic, MrmlError, describe_segments, scene_volumes, segment_mask
    from MedTuningLib.slicer_bridge.settings import BridgeSettings, read_model_info

    ctx = new_context(tmp_path)
    first, _ = write_blob_case(tmp_path / "in", "first", seed=11)
    second, _ = write_blob_case(tmp_path / "in", "second", seed=12, shape=(10, 36, 44), spacing=(1.5, 0.8, 0.9),
                                origin=(5.0, -3.0, 2.0))
    flat = tmp_path / "in" / "flat.nrrd"  # one slice: not a 3D scan
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(3).normal(100, 10, (1, 40, 40)).astype(np.float32)),
                    str(flat))
    volumes = [read_volume(ctx, first, "MR first"), read_volume(ctx, flat, "MR flat"),
               read_volume(ctx, second, "MR second")]
    labelmap = read_volume(ctx, first, "not an input", labelmap=True)
    assert scene_volumes(ctx) == volumes and labelmap not in scene_volumes(ctx)

    info = read_model_info(model)
    logic = MedTuningMrmlLogic(ctx, BridgeSettings(device="cpu"), python=sys.executable, library_root=ROOT)
    with pytest.raises(MrmlError, match="1 input volume"):
        logic.start_batch_segmentation(info, [volumes[:2]], device="cpu")  # two volumes for a one-modality model
    seen = []
    job = logic.start_batch_segmentation(info, scene_volumes(ctx), device="cpu",
                                         on_scan=lambda scan, node, failure: seen.append((scan.name, node, failure)))
    events, deadline = [], time.monotonic() + 240
    while not job.completed:
        assert time.monotonic() < deadline, "the batch did not finish"
        events += job.poll()
        time.sleep(0.05)

    # The backend loaded the model once for the whole batch.
    assert sum(1 for e in events if e["event"] == "log" and "model_loaded" in e) == 1
    assert not job.ok and len(job.result) == 2
    # Results arrive per scan, in list order, the bad one with its code.
    assert [(name, node is not None) for name, node, _ in seen] == \
        [(f"MR first {info.name}", True), (f"MR flat {info.name}", False), (f"MR second {info.name}", True)]
    (failure,) = job.failures.values()
    assert failure.code == "IMAGE_DIMENSION" and failure.hint
    assert "MR flat" in job.failure and "IMAGE_DIMENSION" in job.failure
    for volume, node in zip([volumes[0], volumes[2]], job.result):
        assert node.IsA("vtkMRMLSegmentationNode") and node.GetName() == f"{volume.GetName()} {info.name}"
        assert [d["name"] for d in describe_segments(node)] == ["Blob"]
        mask = segment_mask(ctx, node, node.GetSegmentation().GetSegmentIdBySegmentName("Blob"), volume)
        assert mask.shape == tuple(reversed(volume.GetImageData().GetDimensions()))  # the volume's own grid
        geometry = slicer.vtkOrientedImageData()
        slicer.vtkSegmentationConverter.DeserializeImageGeometry(
            node.GetSegmentation().GetConversionParameter("Reference image geometry"), geometry)
        assert np.allclose(geometry.GetSpacing(), volume.GetSpacing()) and \
            np.allclose(geometry.GetOrigin(), volume.GetOrigin())
        assert node.GetID() in logic.results  # kept for a later correction case
    assert ctx.temp_root is not None and not any(p.name.startswith("MedTuning-") and (p / "batch.csv").exists()
                                                 for p in ctx.temp_root.iterdir())  # the job folder is gone


def test_two_modality_batch_one_volume_per_modality_per_scan(tmp_path):
    from conftest import run_cli

    from MedTuningLib.mrml import MedTuningMrmlLogic, describe_segments
    from MedTuningLib.slicer_bridge.settings import BridgeSettings, read_model_info

    library = tmp_path / "library"
    files = {}
    for i in range(2):
        image, label = write_blob_case(tmp_path / "src", f"case{i}", seed=40 + i)
        second = tmp_path / "src" / f"case{i}-t2.nrrd"
        img = sitk.ReadImage(str(image))
        sitk.WriteImage(sitk.Cast(200.0 - img, sitk.sitkFloat32), str(second))  # a second contrast, same grid
        files[i] = (image, second)
        status, events = run_cli(["cases", "add", "--library", str(library), "--image", str(image), "--image",
                                  str(second), "--modality", "T1", "--modality", "T2", "--label", str(label),
                                  "--split", "train", "--id", f"case{i}"])
        assert status == 0, events[-2:]
    status, events = run_cli(["train", "--library", str(library), "--out", str(tmp_path / "model2"), "--labels",
                              "Blob=1", *TINY_TRAIN, "--epochs", "1", "--steps-per-epoch", "1", "--seed", "1"])
    assert status == 0, events[-3:]
    info = read_model_info(tmp_path / "model2")
    assert info.modalities == ["T1", "T2"]

    ctx = new_context(tmp_path)
    scans = [[read_volume(ctx, files[i][0], f"scan{i} T1"), read_volume(ctx, files[i][1], f"scan{i} T2")]
             for i in range(2)]
    logic = MedTuningMrmlLogic(ctx, BridgeSettings(device="cpu"), python=sys.executable, library_root=ROOT)
    job = logic.start_batch_segmentation(info, scans, device="cpu", show_3d=False)
    assert job.wait(timeout=240)
    assert job.ok, job.failure or job.state.error_message
    assert [n.GetName() for n in job.result] == [f"scan0 T1 {info.name}", f"scan1 T1 {info.name}"]
    assert all([d["name"] for d in describe_segments(n)] == ["Blob"] for n in job.result)
