"""DICOM series input that does not guess: real CT series (CTChest4 written slice by slice with pydicom)
read into a case library, and every refusal: several series, a --series that is not there, missing
slices, uneven spacing, gantry tilt, mixed orientations, two slices at one position."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dicom_helpers import ctchest_image, write_series


@pytest.fixture(scope="module")
def chest() -> sitk.Image:
    return ctchest_image()


@pytest.fixture
def label(slicerio_data) -> Path:
    return slicerio_data / "Segmentation.seg.nrrd"


def _add(cli, library: Path, image: Path, label: Path, *extra: str):
    return cli(["cases", "add", "--library", str(library), "--image", str(image), "--label", str(label),
                "--modality", "CT", *extra])


def test_cases_add_from_a_dicom_series_keeps_voxels_geometry_and_records_the_series(cli, tmp_path, chest, label):
    written = write_series(chest, tmp_path / "study" / "CT")
    status, events = _add(cli, tmp_path / "lib", tmp_path / "study" / "CT", label, "--id", "chest")
    assert status == 0, events[-2:]
    manifest = json.loads((tmp_path / "lib" / "cases.json").read_text(encoding="utf-8"))
    case = manifest["cases"][0]
    dicom = case["provenance"]["dicom"][0]
    assert dicom["series_instance_uid"] == written["series_uid"]
    assert dicom["study_instance_uid"] == written["study_uid"]
    assert dicom["frame_of_reference_uid"] == written["frame_uid"]
    assert (dicom["modality"], dicom["description"], dicom["slices"]) == ("CT", "CT chest", 34)
    assert dicom["first_sop_instance_uid"] == written["sop_uids"][0]
    assert "Test^Chest" not in json.dumps(manifest) and "MT-0001" not in json.dumps(manifest)  # no patient data
    assert str(tmp_path / "study" / "CT") in case["provenance"]["source"]
    stored = sitk.ReadImage(str(tmp_path / "lib" / case["images"]["CT"]))
    # The HU values and the geometry of the volume the series was made from, voxel for voxel.
    np.testing.assert_array_equal(sitk.GetArrayFromImage(stored), sitk.GetArrayFromImage(chest))
    np.testing.assert_allclose(stored.GetOrigin(), chest.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(stored.GetSpacing(), chest.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(stored.GetDirection(), chest.GetDirection(), atol=1e-6)


def _two_series(folder: Path, chest: sitk.Image) -> tuple[dict, dict]:
    """The full series and a second, thinner 'reconstruction' of the same study in one folder."""
    first = write_series(chest, folder, description="CT chest 10 mm", series_number=2, prefix="A")
    half = sitk.Resample(chest, [128, 128, 17], sitk.Transform(), sitk.sitkNearestNeighbor, chest.GetOrigin(),
                         (chest.GetSpacing()[0], chest.GetSpacing()[1], 20.0), chest.GetDirection())
    second = write_series(half, folder, study_uid=first["study_uid"], frame_uid=first["frame_uid"],
                          description="CT chest 20 mm", series_number=3, prefix="B")
    return first, second


def test_a_folder_with_several_series_is_refused_with_the_list_and_series_picks_one(cli, tmp_path, chest, label):
    folder = tmp_path / "study"
    first, second = _two_series(folder, chest)
    status, events = _add(cli, tmp_path / "lib", folder, label)
    assert status == 2
    error = events[-1]
    assert error["code"] == "DICOM_MULTIPLE_SERIES"
    listed = {s["series_instance_uid"]: s for s in error["series"]}
    assert set(listed) == {first["series_uid"], second["series_uid"]}
    assert listed[second["series_uid"]]["slices"] == 17 and listed[second["series_uid"]]["modality"] == "CT"
    assert listed[first["series_uid"]]["description"] == "CT chest 10 mm"
    assert first["series_uid"] in error["message"] and "--series" in error["hint"]
    assert not (tmp_path / "lib" / "cases.json").exists()  # nothing half-added

    status, events = _add(cli, tmp_path / "lib", folder, label, "--series", first["series_uid"])
    assert status == 0, events[-2:]
    case = json.loads((tmp_path / "lib" / "cases.json").read_text(encoding="utf-8"))["cases"][0]
    assert case["provenance"]["dicom"][0]["series_instance_uid"] == first["series_uid"]
    assert sitk.ReadImage(str(tmp_path / "lib" / case["images"]["CT"])).GetSize() == (128, 128, 34)

    status, events = _add(cli, tmp_path / "lib", folder, label, "--series", "1.2.3.4.5")
    assert status == 2 and events[-1]["code"] == "DICOM_SERIES_NOT_FOUND"
    assert {s["series_instance_uid"] for s in events[-1]["series"]} == {first["series_uid"], second["series_uid"]}


def test_non_image_objects_beside_the_series_are_ignored(tmp_path, chest):
    from MedTuningLib.data.io import read_case_inputs

    written = write_series(chest, tmp_path / "CT")
    import pydicom

    # A structured-report-like object of another series in the same folder: not an image series.
    ds = pydicom.dcmread(str(written["files"][0]))
    ds.Modality = "SR"
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    del ds.ImagePositionPatient
    ds.save_as(str(tmp_path / "CT" / "report.dcm"))
    (tmp_path / "CT" / "notes.txt").write_text("not DICOM", encoding="utf-8")
    notes: list[str] = []
    case = read_case_inputs([tmp_path / "CT"], log=notes.append)
    assert case.dicom[0].info.uid == written["series_uid"] and case.array.shape == (1, 34, 128, 128)
    assert any("non-image" in n for n in notes), notes


def _refused(tmp_path: Path, chest: sitk.Image, **kwargs) -> dict:
    from MedTuningLib.data.io import read_case_inputs
    from MedTuningLib.errors import MedTuningError

    write_series(chest, tmp_path / "CT", **kwargs)
    with pytest.raises(MedTuningError) as info:
        read_case_inputs([tmp_path / "CT"])
    return {"code": info.value.code, "message": info.value.message, **info.value.details}


def test_a_missing_slice_is_refused(tmp_path, chest):
    error = _refused(tmp_path, chest, skip=(12,))
    assert error["code"] == "DICOM_MISSING_SLICES" and error["missing"] == 1, error


def test_two_missing_slices_in_a_row_are_counted(tmp_path, chest):
    error = _refused(tmp_path, chest, skip=(5, 6))
    assert error["code"] == "DICOM_MISSING_SLICES" and error["missing"] == 2, error


def test_uneven_spacing_is_refused(tmp_path, chest):
    def shift(k, ds):
        if k >= 20:  # one step of 14 mm among steps of 10 mm: not a whole number of missing slices
            ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                                       f"{float(ds.ImagePositionPatient[2]) + 4.0:.6f}"]

    error = _refused(tmp_path, chest, modify=shift)
    assert error["code"] == "DICOM_UNEVEN_SPACING", error
    assert error["min_spacing"] == pytest.approx(10.0, abs=1e-3) and error["max_spacing"] == pytest.approx(14.0, abs=1e-3)


def test_a_gantry_tilt_is_refused(tmp_path, chest):
    tilt = math.radians(12.0)

    def shear(k, ds):  # each slice shifted along y by tan(tilt) * its distance along z: a tilted gantry
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:.6f}", f"{y + math.tan(tilt) * 10.0 * k:.6f}", f"{z:.6f}"]

    error = _refused(tmp_path, chest, modify=shear)
    assert error["code"] == "DICOM_GANTRY_TILT", error
    assert error["tilt_degrees"] == pytest.approx(12.0, abs=0.05)


def test_mixed_orientations_are_refused(tmp_path, chest):
    def rotate(k, ds):
        if k == 7:  # one slice of another stack (e.g. a localizer) with the same series UID
            ds.ImageOrientationPatient = ["0", "-1", "0", "-1", "0", "0"]

    error = _refused(tmp_path, chest, modify=rotate)
    assert error["code"] == "DICOM_MIXED_ORIENTATION" and "IM0007" in error["message"], error


def test_two_slices_at_one_position_are_refused(tmp_path, chest):
    def repeat(k, ds):
        if k == 9:
            ds.ImagePositionPatient = [f"{v:.6f}" for v in chest.TransformIndexToPhysicalPoint((0, 0, 8))]

    error = _refused(tmp_path, chest, modify=repeat)
    assert error["code"] == "DICOM_SERIES_INCONSISTENT" and "position of another" in error["message"], error


def test_slices_written_in_shuffled_order_are_read_in_position_order(tmp_path, chest):
    from MedTuningLib.data.io import read_case_inputs

    # Instance numbers and file names reversed: only the positions say where a slice belongs.
    def renumber(k, ds):
        ds.InstanceNumber = 100 - k

    write_series(chest, tmp_path / "CT", modify=renumber)
    for i, path in enumerate(sorted((tmp_path / "CT").iterdir())):
        path.rename(tmp_path / "CT" / f"x{(7919 * i) % 34:02d}-{i}.dcm")
    case = read_case_inputs([tmp_path / "CT"])
    np.testing.assert_array_equal(case.array[0], sitk.GetArrayFromImage(chest).astype(np.float32))


def test_two_modalities_from_one_folder_are_paired_with_series_in_order(tmp_path, chest):
    from MedTuningLib.data.io import read_case_inputs
    from MedTuningLib.errors import MedTuningError

    first = write_series(chest, tmp_path / "study", description="T1", prefix="A")
    inverted = sitk.Cast(3000 - chest, sitk.sitkInt32)  # another contrast on the same grid
    second = write_series(inverted, tmp_path / "study", study_uid=first["study_uid"], frame_uid=first["frame_uid"],
                          description="FLAIR", series_number=3, prefix="B")
    folder = tmp_path / "study"
    case = read_case_inputs([folder, folder], series=[second["series_uid"], first["series_uid"]])
    assert [d.info.description for d in case.dicom] == ["FLAIR", "T1"]
    np.testing.assert_array_equal(case.array[0], sitk.GetArrayFromImage(inverted).astype(np.float32))
    np.testing.assert_array_equal(case.array[1], sitk.GetArrayFromImage(chest).astype(np.float32))
    with pytest.raises(MedTuningError) as info:  # two images, one --series: which one is which is not said
        read_case_inputs([folder, folder], series=[first["series_uid"]])
    assert info.value.code == "DICOM_MULTIPLE_SERIES"
    with pytest.raises(MedTuningError) as info:
        read_case_inputs([folder, folder], series=[first["series_uid"], "9.9.9"])
    assert info.value.code == "DICOM_SERIES_NOT_FOUND" and "--series number 2" in info.value.message


def test_an_empty_result_is_still_a_valid_seg_of_every_slice(tmp_path, chest):
    """Nothing found is a result too: the SEG keeps every frame (all zero) rather than failing."""
    import highdicom as hd

    from MedTuningLib.data.dicom import read_series
    from MedTuningLib.dicomseg import write_dicom_seg

    written = write_series(chest, tmp_path / "CT")
    _, series = read_series(tmp_path / "CT")
    empty = {"Nodule": np.zeros((34, 128, 128), dtype=bool)}
    summary = write_dicom_seg(tmp_path / "empty.dcm", empty, series, scheme=None, model_name="m")
    seg = hd.seg.segread(str(tmp_path / "empty.dcm"))
    assert summary["segments"] == {"Nodule": 1} and seg.get_segment_description(1).segment_label == "Nodule"
    generic = seg.get_segment_description(1).segmented_property_type
    assert generic.scheme_designator == "SCT" and generic.meaning == "Tissue"  # Slicer's generic entry
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=written["sop_uids"], segment_numbers=[1])
    assert pixels.shape == (34, 128, 128, 1) and not pixels.any()


def test_brats_regions_as_a_fractional_seg_carry_the_region_probabilities_and_private_codes(tmp_path, chest):
    """BraTS writes overlapping regions (ET inside TC inside WT); their probability is the sum over the
    region's classes, and their codes are the MedTuning private scheme (no SNOMED concept exists)."""
    import highdicom as hd
    import torch

    from MedTuningLib.data.dicom import read_series
    from MedTuningLib.data.labels import scheme_for_task
    from MedTuningLib.dicomseg import write_dicom_seg
    from MedTuningLib.engine.infer import segment_masks, segment_probabilities

    scheme = scheme_for_task("brats", source="brats2019")
    written = write_series(chest, tmp_path / "CT")
    _, series = read_series(tmp_path / "CT")
    rng = np.random.default_rng(0)
    probs = torch.from_numpy(rng.dirichlet(np.ones(4), size=(34, 128, 128)).astype(np.float32)).permute(3, 0, 1, 2)
    region = segment_probabilities(scheme, probs)
    assert list(region) == ["ET", "TC", "WT"]
    np.testing.assert_allclose(region["WT"], probs[1:].sum(0).numpy(), atol=1e-6)
    assert np.all(region["ET"] <= region["TC"] + 1e-6) and np.all(region["TC"] <= region["WT"] + 1e-6)
    masks = segment_masks(scheme, probs.argmax(0).numpy().astype(np.uint8))
    write_dicom_seg(tmp_path / "brats.dcm", masks, series, scheme, model_name="brats", seg_type="fractional",
                    probabilities=region)
    seg = hd.seg.segread(str(tmp_path / "brats.dcm"))
    assert seg.SegmentationType == "FRACTIONAL"
    codes = [seg.get_segment_description(n).segmented_property_type for n in (1, 2, 3)]
    assert [(c.scheme_designator, c.value) for c in codes] == [("99MEDTUNING", "ET"), ("99MEDTUNING", "TC"),
                                                               ("99MEDTUNING", "WT")]
    read = seg.get_pixels_by_source_instance(source_sop_instance_uids=written["sop_uids"], segment_numbers=[1, 2, 3],
                                             dtype=np.float32)
    np.testing.assert_allclose(read[..., 2], region["WT"], atol=0.5 / 255 + 1e-6)  # stored as 0..255


def _shear_one_pixel(chest: sitk.Image):
    """A gantry tilt that moves each slice by exactly one pixel row (about 17 degrees at these spacings)."""
    dy = chest.GetSpacing()[1]

    def shear(k, ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:.6f}", f"{y + dy * k:.6f}", f"{z:.6f}"]

    return shear


def test_dicom_resample_undoes_a_gantry_tilt_voxel_for_voxel(tmp_path, chest):
    from MedTuningLib.data.io import read_case_inputs

    write_series(chest, tmp_path / "CT", modify=_shear_one_pixel(chest))
    notes: list[str] = []
    case = read_case_inputs([tmp_path / "CT"], log=notes.append, regularize=True)
    assert "gantry tilt of 16.9" in case.dicom[0].regularized and any("resampled" in n for n in notes)
    assert case.provenance()[0]["resampled"] == case.dicom[0].regularized
    out = case.reference
    source = sitk.GetArrayFromImage(chest)
    array = case.array[0]
    # Every source pixel, placed where its slice's own position says, is found there in the result.
    checked = 0
    for k in (0, 5, 20, 33):
        corner = np.array(chest.TransformIndexToPhysicalPoint((0, 0, k))) + np.array([0.0, chest.GetSpacing()[1] * k, 0])
        index = out.TransformPhysicalPointToIndex(tuple(corner))
        assert index[0] == 0 and index[2] == k
        rows = source.shape[1] - abs(index[1])
        lo = max(0, index[1])
        np.testing.assert_allclose(array[k, lo:lo + rows], source[k, lo - index[1]:lo - index[1] + rows], atol=1e-3)
        checked += rows
    assert checked > 300


def test_dicom_resample_interpolates_a_missing_slice_and_an_uneven_step(tmp_path, chest):
    from MedTuningLib.data.io import read_case_inputs

    source = sitk.GetArrayFromImage(chest).astype(np.float32)
    write_series(chest, tmp_path / "gap", skip=(12,))
    gap = read_case_inputs([tmp_path / "gap"], regularize=True)
    assert gap.array.shape == (1, 34, 128, 128) and gap.reference.GetSpacing()[2] == pytest.approx(10.0)
    np.testing.assert_allclose(gap.array[0, 12], (source[11] + source[13]) / 2, atol=1e-3)
    np.testing.assert_array_equal(gap.array[0, 11], source[11])

    def shift(k, ds):
        if k >= 20:
            ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                                       f"{float(ds.ImagePositionPatient[2]) + 4.0:.6f}"]

    write_series(chest, tmp_path / "uneven", modify=shift)
    uneven = read_case_inputs([tmp_path / "uneven"], regularize=True)
    assert "slice steps from 10 to 14 mm" in uneven.dicom[0].regularized
    np.testing.assert_array_equal(uneven.array[0, 19], source[19])
    w = 10.0 / 14.0  # output slice 20 lies at 200 mm: between input 19 (190 mm) and input 20 (204 mm)
    np.testing.assert_allclose(uneven.array[0, 20], (1 - w) * source[19] + w * source[20], atol=1e-2)


def test_cases_add_resamples_only_when_asked_and_records_it(cli, tmp_path, chest, label):
    write_series(chest, tmp_path / "CT", modify=_shear_one_pixel(chest))
    status, events = _add(cli, tmp_path / "lib", tmp_path / "CT", label)
    assert status == 2 and events[-1]["code"] == "DICOM_GANTRY_TILT" and "--dicom-resample" in events[-1]["hint"]
    status, events = _add(cli, tmp_path / "lib", tmp_path / "CT", label, "--dicom-resample")
    # The label was drawn on the unsheared volume's grid, which is the resampled grid: it fits.
    assert status == 0, events[-2:]
    case = json.loads((tmp_path / "lib" / "cases.json").read_text(encoding="utf-8"))["cases"][0]
    assert "gantry tilt" in case["provenance"]["dicom"][0]["resampled"]
    assert any("resampled" in e.get("message", "") for e in events if e["event"] == "log")
