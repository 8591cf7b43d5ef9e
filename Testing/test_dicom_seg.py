"""Clinical data in, clinical data out: a CT series made from a real volume (CTChest4) goes into a case
library, a model is tuned on it, and ``segment`` writes a DICOM SEG next to the .seg.nrrd. The SEG is
read back with highdicom / pydicom: references to the source series and instances, the segments'
labels, codes, colours and algorithm, the geometry of every frame against its source slice, and the
pixels voxel for voxel against slicerio's reading of the .seg.nrrd of the same run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from dicom_helpers import ctchest_image, write_series
from engine_helpers import TINY_TRAIN

SEGMENTS = ["right lung", "left lung"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Series -> case library -> tiny model -> segment (.seg.nrrd + binary DICOM SEG)."""
    import slicerio as sio

    from conftest import run_cli

    root = tmp_path_factory.mktemp("dicomseg")
    chest = ctchest_image()
    written = write_series(chest, root / "study" / "CT")
    label = Path(sio.__file__).parent / "data" / "Segmentation.seg.nrrd"
    for split, slices in (("train", "0:24"), ("val", "24:34")):  # a held-out slab, as the demo does
        status, events = run_cli(["cases", "add", "--library", str(root / "lib"), "--image",
                                  str(root / "study" / "CT"), "--label", str(label), "--modality", "CT",
                                  "--id", f"chest-{split}", "--split", split, "--slices", slices])
        assert status == 0, events[-2:]
    train = [a if a != "4x32x32" else "4x64x64" for a in TINY_TRAIN]
    status, events = run_cli(["train", "--library", str(root / "lib"), "--out", str(root / "model"),
                              "--segments", ",".join(SEGMENTS), *train, "--epochs", "4", "--steps-per-epoch", "4",
                              "--lr", "3e-3", "--seed", "0"])
    assert status == 0, events[-3:]
    status, events = run_cli(["segment", "--model", str(root / "model"), "--image", str(root / "study" / "CT"),
                              "--out", str(root / "result.seg.nrrd"), "--dicom-seg", str(root / "result.dcm"),
                              "--device", "cpu", "--overlap", "0.25"])
    assert status == 0, events[-3:]
    return {"root": root, "written": written, "chest": chest, "label": label, "done": events[-1]}


def _source_datasets(written: dict) -> list:
    import pydicom

    return [pydicom.dcmread(str(p), stop_before_pixels=True) for p in written["files"]]


def test_seg_references_the_source_series_and_instances(run):
    import highdicom as hd

    seg = hd.seg.segread(str(run["root"] / "result.dcm"))
    sources = _source_datasets(run["written"])
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.Modality == "SEG"
    assert seg.StudyInstanceUID == run["written"]["study_uid"]
    assert seg.FrameOfReferenceUID == run["written"]["frame_uid"]
    assert seg.PatientID == "MT-0001" and str(seg.PatientName) == "Test^Chest"
    assert seg.SeriesInstanceUID != run["written"]["series_uid"]  # a new series of the same study
    referenced = seg.ReferencedSeriesSequence
    assert [r.SeriesInstanceUID for r in referenced] == [run["written"]["series_uid"]]
    instances = {i.ReferencedSOPInstanceUID for i in referenced[0].ReferencedInstanceSequence}
    assert instances and instances <= set(run["written"]["sop_uids"])
    assert all(i.ReferencedSOPClassUID == sources[0].SOPClassUID for i in referenced[0].ReferencedInstanceSequence)
    # What the run reports it read is the same series.
    source = run["done"]["outputs"]["source"][0]
    assert source["series_instance_uid"] == run["written"]["series_uid"] and source["slices"] == 34
    assert run["done"]["outputs"]["dicom_seg"]["series_instance_uid"] == seg.SeriesInstanceUID


def test_seg_segments_carry_labels_codes_colours_and_the_algorithm(run):
    import highdicom as hd

    seg = hd.seg.segread(str(run["root"] / "result.dcm"))
    assert seg.SegmentationType == "BINARY"
    source = {s["name"]: s for s in slicerio.read_segmentation(str(run["label"]), skip_voxels=True)["segments"]}
    model = json.loads((run["root"] / "model" / "medtuning.json").read_text(encoding="utf-8"))
    assert len(seg.SegmentSequence) == len(SEGMENTS)
    for number, name in enumerate(SEGMENTS, start=1):
        desc = seg.get_segment_description(number)
        assert desc.segment_label == name
        terminology = source[name]["terminology"]
        category, kind = desc.segmented_property_category, desc.segmented_property_type
        assert [category.scheme_designator, category.value, category.meaning] == terminology["category"]
        assert [kind.scheme_designator, kind.value, kind.meaning] == terminology["type"]
        assert kind.scheme_designator == "SCT"  # SNOMED CT
        if terminology.get("typeModifier"):
            modifier = desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
            assert [modifier.CodingSchemeDesignator, modifier.CodeValue, modifier.CodeMeaning] == \
                terminology["typeModifier"]
        assert desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm = desc.algorithm_identification[0]
        assert algorithm.AlgorithmName == "MedTuning"
        from MedTuningLib import __version__

        assert algorithm.AlgorithmVersion == __version__
        parameters = algorithm.AlgorithmParameters
        assert "model=model" in parameters and "base_weights=none (not pretrained)" in parameters, parameters
        assert f"architecture={model['architecture']['arch']}" in parameters
        colour = next(s for s in model["label_scheme"]["segments"] if s["name"] == name)["color"]
        rgb = hd.color.CIELabColor.from_dicom_value(desc.RecommendedDisplayCIELabValue).to_rgb()
        np.testing.assert_allclose(np.array(rgb) / 255.0, colour, atol=2 / 255)


def test_seg_frames_lie_on_their_source_slices(run):
    import pydicom

    seg = pydicom.dcmread(str(run["root"] / "result.dcm"))
    sources = {ds.SOPInstanceUID: ds for ds in _source_datasets(run["written"])}
    shared = seg.SharedFunctionalGroupsSequence[0]
    first = next(iter(sources.values()))
    np.testing.assert_allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
                               [float(v) for v in first.PixelSpacing], atol=1e-6)
    np.testing.assert_allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                               [float(v) for v in first.ImageOrientationPatient], atol=1e-6)
    assert (seg.Rows, seg.Columns) == (first.Rows, first.Columns)
    assert int(seg.NumberOfFrames) == len(seg.PerFrameFunctionalGroupsSequence) > 0
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in sources[uid].ImagePositionPatient], atol=1e-4)


def test_seg_pixels_equal_the_seg_nrrd_of_the_same_run_voxel_for_voxel(run):
    import highdicom as hd

    seg = hd.seg.segread(str(run["root"] / "result.dcm"))
    # Source instances in the order the test wrote them (slice k of the volume), not MedTuning's order.
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=run["written"]["sop_uids"],
                                               segment_numbers=[1, 2], combine_segments=False)
    assert pixels.shape == (34, 128, 128, 2)
    nrrd = slicerio.read_segmentation(str(run["root"] / "result.seg.nrrd"))
    assert [s["name"] for s in nrrd["segments"]] == SEGMENTS
    total = 0
    for number, segment in enumerate(nrrd["segments"]):
        mask = slicerio.segment_mask(nrrd, segment).transpose(2, 1, 0)  # (i, j, k) -> (k, j, i)
        np.testing.assert_array_equal(pixels[..., number].astype(bool), mask.astype(bool))
        total += int(mask.sum())
    assert total > 0, "the model predicted nothing: the comparison would be empty"
    # And the .seg.nrrd sits on the series' grid, with the series it was made from in its header.
    chest = run["chest"]
    np.testing.assert_allclose(np.array(nrrd["ijkToLPS"])[:3, 3], chest.GetOrigin(), atol=1e-4)
    import nrrd as pynrrd

    header = pynrrd.read_header(str(run["root"] / "result.seg.nrrd"))
    assert header["MedTuning_SourceSeriesInstanceUID"] == run["written"]["series_uid"]
    assert header["MedTuning_SourceModality"] == "CT"


def test_fractional_seg_holds_the_probabilities_and_out_dcm_alone_works(run, cli):
    import highdicom as hd

    root = run["root"]
    status, events = cli(["segment", "--model", str(root / "model"), "--image", str(root / "study" / "CT"),
                          "--out", str(root / "fractional.dcm"), "--seg-type", "fractional", "--device", "cpu",
                          "--overlap", "0.25"])
    assert status == 0, events[-2:]
    assert not (root / "fractional.seg.nrrd").exists()
    seg = hd.seg.segread(str(root / "fractional.dcm"))
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
    probs = seg.get_pixels_by_source_instance(source_sop_instance_uids=run["written"]["sop_uids"],
                                              segment_numbers=[1, 2], combine_segments=False, dtype=np.float32)
    assert probs.min() >= 0.0 and probs.max() <= 1.0 and probs.max() > 0.0
    nrrd = slicerio.read_segmentation(str(root / "result.seg.nrrd"))
    for number, segment in enumerate(nrrd["segments"]):
        mask = slicerio.segment_mask(nrrd, segment).transpose(2, 1, 0).astype(bool)
        if mask.any():  # the argmax class has at least a third of the probability (background + 2 classes)
            assert probs[..., number][mask].min() >= 1 / 3 - 1 / 255
            assert probs[..., number][mask].mean() > probs[..., number][~mask].mean()


def test_a_seg_beside_the_series_does_not_make_the_folder_ambiguous(run, cli, tmp_path):
    root = run["root"]
    folder = tmp_path / "CT"
    shutil.copytree(root / "study" / "CT", folder)
    shutil.copy(root / "result.dcm", folder / "result.dcm")  # a PACS export often puts the SEG with its series
    status, events = cli(["segment", "--model", str(root / "model"), "--image", str(folder),
                          "--out", str(tmp_path / "again.seg.nrrd"), "--device", "cpu", "--overlap", "0.25"])
    assert status == 0, events[-2:]
    again = slicerio.read_segmentation(str(tmp_path / "again.seg.nrrd"))
    first = slicerio.read_segmentation(str(root / "result.seg.nrrd"))
    np.testing.assert_array_equal(again["voxels"], first["voxels"])


def test_dicom_seg_needs_a_dicom_input(run, cli, tmp_path):
    root = run["root"]
    image = tmp_path / "chest.nrrd"
    sitk.WriteImage(run["chest"], str(image))
    status, events = cli(["segment", "--model", str(root / "model"), "--image", str(image),
                          "--out", str(tmp_path / "r.dcm")])
    assert status == 2 and events[-1]["code"] == "INVALID_OPTION" and "DICOM series" in events[-1]["message"]
    assert not (tmp_path / "r.dcm").exists()


def test_a_dicom_seg_is_accepted_as_the_label_of_its_series(run, cli, tmp_path):
    """A correction saved as DICOM SEG (e.g. by a PACS viewer) goes into the library as a .seg.nrrd."""
    root = run["root"]
    status, events = cli(["cases", "add", "--library", str(tmp_path / "lib"), "--image", str(root / "study" / "CT"),
                          "--label", str(root / "result.dcm"), "--modality", "CT", "--id", "corrected"])
    assert status == 0, events[-2:]
    case = json.loads((tmp_path / "lib" / "cases.json").read_text(encoding="utf-8"))["cases"][0]
    assert case["label"].endswith(".seg.nrrd") and str(root / "result.dcm") in case["provenance"]["source"]
    stored = slicerio.read_segmentation(str(tmp_path / "lib" / case["label"]))
    original = slicerio.read_segmentation(str(root / "result.seg.nrrd"))
    assert [s["name"] for s in stored["segments"]] == SEGMENTS
    for a, b in zip(stored["segments"], original["segments"]):
        np.testing.assert_array_equal(slicerio.segment_mask(stored, a), slicerio.segment_mask(original, b))
        assert a["terminology"]["type"] == b["terminology"]["type"]
        np.testing.assert_allclose(a["color"], b["color"], atol=2 / 255)
    np.testing.assert_allclose(stored["ijkToLPS"], original["ijkToLPS"], atol=1e-4)

    # A SEG needs the series it was drawn on.
    image = tmp_path / "chest.nrrd"
    sitk.WriteImage(run["chest"], str(image))
    status, events = cli(["cases", "add", "--library", str(tmp_path / "lib"), "--image", str(image),
                          "--label", str(root / "result.dcm"), "--modality", "CT"])
    assert status == 2 and events[-1]["code"] == "INVALID_OPTION" and "DICOM SEG" in events[-1]["message"]
    other = write_series(run["chest"], tmp_path / "other")
    status, events = cli(["cases", "add", "--library", str(tmp_path / "lib"), "--image", str(tmp_path / "other"),
                          "--label", str(root / "result.dcm"), "--modality", "CT"])
    assert status == 2 and events[-1]["code"] == "LABEL_GRID_MISMATCH" and other["series_uid"] in events[-1]["message"]
    assert len(json.loads((tmp_path / "lib" / "cases.json").read_text(encoding="utf-8"))["cases"]) == 1


def test_segment_refuses_a_folder_of_several_series_and_series_picks(run, cli, tmp_path):
    root = run["root"]
    folder = tmp_path / "study"
    shutil.copytree(root / "study" / "CT", folder)
    scout = sitk.Resample(run["chest"], [128, 128, 3], sitk.Transform(), sitk.sitkNearestNeighbor,
                          run["chest"].GetOrigin(), (3.046875954, 3.046875954, 100.0), run["chest"].GetDirection())
    second = write_series(scout, folder, study_uid=run["written"]["study_uid"], description="thick", prefix="T")
    out = tmp_path / "r.dcm"
    status, events = cli(["segment", "--model", str(root / "model"), "--image", str(folder), "--out", str(out)])
    assert status == 2 and events[-1]["code"] == "DICOM_MULTIPLE_SERIES" and not out.exists()
    assert {s["series_instance_uid"] for s in events[-1]["series"]} == {run["written"]["series_uid"],
                                                                       second["series_uid"]}
    status, events = cli(["segment", "--model", str(root / "model"), "--image", str(folder), "--out", str(out),
                          "--series", run["written"]["series_uid"], "--device", "cpu", "--overlap", "0.25"])
    assert status == 0, events[-2:]
    import highdicom as hd

    assert hd.seg.segread(str(out)).ReferencedSeriesSequence[0].SeriesInstanceUID == run["written"]["series_uid"]


def test_names_beyond_ascii_reach_the_seg_and_the_nrrd_header(run, cli, tmp_path):
    import highdicom as hd
    import nrrd as pynrrd

    root = run["root"]
    model = tmp_path / "modèle poumons 中文"
    shutil.copytree(root / "model", model)
    status, events = cli(["segment", "--model", str(model), "--image", str(root / "study" / "CT"),
                          "--out", str(tmp_path / "r.seg.nrrd"), "--dicom-seg", str(tmp_path / "r.dcm"),
                          "--device", "cpu", "--overlap", "0.25"])
    assert status == 0, events[-2:]
    seg = hd.seg.segread(str(tmp_path / "r.dcm"))
    assert seg.ManufacturerModelName == model.name and model.name in seg.SeriesDescription
    assert f"model={model.name}" in seg.get_segment_description(1).algorithm_identification[0].AlgorithmParameters
    from urllib.parse import unquote

    assert unquote(pynrrd.read_header(str(tmp_path / "r.seg.nrrd"))["MedTuning_Model"]) == model.name
    status, events = cli(["segment", "--model", str(model), "--image", str(tmp_path / "missing"),
                          "--out", str(tmp_path / "m.dcm")])
    assert status == 2 and events[-1]["code"] == "FILE_NOT_FOUND"


def test_slicer_bridge_segment_command_with_series_and_dicom_seg_runs_on_the_real_backend(run, cli, tmp_path):
    from MedTuningLib.slicer_bridge.commands import SegmentParams

    root = run["root"]
    params = SegmentParams(model=root / "model", images=[root / "study" / "CT"], out=tmp_path / "r.seg.nrrd",
                           series=[run["written"]["series_uid"]], dicom_seg=tmp_path / "r.dcm", device="cpu")
    argv = params.argv()
    assert f"--series={run['written']['series_uid']}" in argv and f"--dicom-seg={tmp_path / 'r.dcm'}" in argv
    status, events = cli([*argv, "--overlap", "0.25"])
    assert status == 0, events[-2:]
    assert (tmp_path / "r.seg.nrrd").is_file() and (tmp_path / "r.dcm").is_file()
    # Nothing new is written when not asked for: the argv of a plain call is unchanged.
    assert SegmentParams(model="M", images=["a.nrrd"], out="r.seg.nrrd").argv() == \
        ["segment", "--model=M", "--image=a.nrrd", "--out=r.seg.nrrd"]


def test_a_resampled_series_gives_a_seg_nrrd_but_no_dicom_seg(run, cli, tmp_path):
    root = run["root"]
    dy = run["chest"].GetSpacing()[1]

    def shear(k, ds):  # a gantry tilt of one pixel row per slice
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:.6f}", f"{y + dy * k:.6f}", f"{z:.6f}"]

    write_series(run["chest"], tmp_path / "tilted", modify=shear)
    common = ["segment", "--model", str(root / "model"), "--image", str(tmp_path / "tilted"), "--device", "cpu",
              "--overlap", "0.25"]
    status, events = cli([*common, "--out", str(tmp_path / "r.seg.nrrd")])
    assert status == 2 and events[-1]["code"] == "DICOM_GANTRY_TILT"
    status, events = cli([*common, "--out", str(tmp_path / "r.seg.nrrd"), "--dicom-seg", str(tmp_path / "r.dcm"),
                          "--dicom-resample"])
    assert status == 2 and events[-1]["code"] == "INVALID_OPTION" and "resampled" in events[-1]["message"]
    assert not (tmp_path / "r.dcm").exists() and not (tmp_path / "r.seg.nrrd").exists()
    status, events = cli([*common, "--out", str(tmp_path / "r.seg.nrrd"), "--dicom-resample"])
    assert status == 0, events[-2:]
    assert "gantry tilt" in events[-1]["outputs"]["source"][0]["resampled"]
    assert slicerio.read_segmentation(str(tmp_path / "r.seg.nrrd"))["voxels"].shape == (128, 128, 34)
