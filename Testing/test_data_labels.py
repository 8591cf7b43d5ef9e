"""Label schemes and label reading: presets, mappings, .seg.nrrd (layers, cropped extents), grids, codes."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from MedTuningLib.data.geometry import Grid
from MedTuningLib.data.io import read_image, read_label, read_segments
from MedTuningLib.data.labels import (LabelScheme, scheme_from_preset, scheme_from_segmentations,
                                      scheme_from_spec)
from MedTuningLib.errors import MedTuningError


def code_of(fn, *args, **kwargs) -> str:
    with pytest.raises(MedTuningError) as info:
        fn(*args, **kwargs)
    assert info.value.message and info.value.hint
    return info.value.code


def grid_image(size=(10, 8, 6), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    image = sitk.Image(size, sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def write_labelmap(path: Path, array: np.ndarray, like: sitk.Image) -> Path:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(like)
    sitk.WriteImage(image, str(path))
    return path


# -- schemes ------------------------------------------------------------------------------------

def test_kits_preset():
    kits = scheme_from_preset("kits")
    assert kits.num_classes == 3 and kits.write == "classes"
    assert kits.segment_names == ["Kidney", "Kidney tumour"]
    assert kits.composite == ["kidney", "tumour"]
    class_map = kits.encode(np.array([0, 1, 2, 2]))
    masks = kits.region_masks(class_map)
    assert masks["kidney"].tolist() == [False, True, True, True]
    assert masks["tumour"].tolist() == [False, False, True, True]
    assert kits.segment("Kidney").terminology["type"][1] == "64033007"  # SNOMED CT kidney
    assert code_of(kits.encode, np.array([0, 3])) == "UNKNOWN_LABEL_VALUES"


@pytest.mark.parametrize("source, values", [
    ("brats2015", {"ncr": [1, 3], "ed": [2], "et": [4]}),
    ("brats2019", {"ncr": [1], "ed": [2], "et": [4]}),
    ("brats2023", {"ncr": [1], "ed": [2], "et": [3]}),
])
def test_brats_conventions(source, values):
    scheme = scheme_from_preset("brats", source=source)
    assert scheme.write == "regions" and scheme.segment_names == ["ET", "TC", "WT"]
    labels = np.array([0] + values["ncr"] + values["ed"] + values["et"])
    regions = scheme.region_masks(scheme.encode(labels))
    n_ncr, n_ed = len(values["ncr"]), len(values["ed"])
    expected_et = [False] * (1 + n_ncr + n_ed) + [True]
    expected_tc = [False] + [True] * n_ncr + [False] * n_ed + [True]
    assert regions["ET"].tolist() == expected_et
    assert regions["TC"].tolist() == expected_tc
    assert regions["WT"].tolist() == [False] + [True] * (len(labels) - 1)
    wrong = {"brats2015": 5, "brats2019": 3, "brats2023": 4}[source]
    with pytest.raises(MedTuningError) as info:
        scheme.encode(np.array([0, wrong]))
    assert info.value.code == "UNKNOWN_LABEL_VALUES" and "--source-labels" in info.value.hint


def test_scheme_json_round_trip():
    for scheme in (scheme_from_preset("kits"), scheme_from_preset("brats", "brats2019"),
                   scheme_from_spec("Kidney=2,3;Spleen=1")):
        again = LabelScheme.from_dict(copy.deepcopy(scheme.to_dict()))
        assert again.to_dict() == scheme.to_dict()


def test_spec_parsing_and_errors():
    scheme = scheme_from_spec("Kidney = 2, 3; Spleen=1; Ribs=10-12")
    assert [(c.name, c.source_values) for c in scheme.classes] == [("Kidney", [2, 3]), ("Spleen", [1]),
                                                                   ("Ribs", [10, 11, 12])]
    # Organs the user did not name are background (TotalSegmentator labels have 60 more).
    assert scheme.encode(np.array([0, 1, 2, 3, 5, 11])).tolist() == [0, 2, 1, 1, 0, 3]
    for bad in ["", "Kidney", "Kidney=a", "Kidney=2;Spleen=2", "Kidney=0", "Kidney=2;kidney=3", "K=5-3"]:
        assert code_of(scheme_from_spec, bad) == "LABEL_SPEC_INVALID", bad


def test_scheme_from_segmentations(slicerio_data, tmp_path):
    seg = slicerio_data / "Segmentation.seg.nrrd"
    full = scheme_from_segmentations([seg, slicerio_data / "Segmentation.seg.nrrd"])
    assert full.class_names[-2:] == ["left lung", "tissue"] and len(full.class_names) == 7
    lungs = scheme_from_segmentations([seg, slicerio_data / "SegmentationOverlapping.seg.nrrd"],
                                      names=["right lung", "left lung"])
    assert lungs.segment("right lung").terminology["typeModifier"][2] == "Right"
    # All segments of the first case as classes: a case with another set is refused.
    assert code_of(scheme_from_segmentations, [seg, slicerio_data / "SegmentationOverlapping.seg.nrrd"]) \
        == "SEGMENT_NAMES_MISMATCH"
    renamed = slicerio.read_segmentation(str(seg))
    renamed["segments"][5]["name"] = "Lung L"
    path = tmp_path / "renamed.seg.nrrd"
    slicerio.write_segmentation(str(path), renamed)
    assert code_of(scheme_from_segmentations, [seg, path], names=["left lung"]) == "SEGMENT_NAMES_MISMATCH"


# -- reading labels -------------------------------------------------------------------------------

def test_ctchest_lungs_by_segment_name(slicerio_data):
    image = read_image(slicerio_data / "CTChest4.nrrd")
    scheme = scheme_from_segmentations([slicerio_data / "Segmentation.seg.nrrd"], names=["right lung", "left lung"])
    notes = []
    class_map = read_label(slicerio_data / "Segmentation.seg.nrrd", image, scheme, log=notes.append)
    assert class_map.shape == (34, 128, 128)
    counts = np.bincount(class_map.ravel(), minlength=3)
    assert counts[1] > 20_000 and counts[2] > 20_000
    assert notes and "ribs" in notes[0]
    # Right lung on the patient's right: smaller L (LPS x) than the left lung.
    xs = []
    for c in (1, 2):
        k, j, i = np.argwhere(class_map == c).mean(axis=0)
        xs.append(image.TransformContinuousIndexToPhysicalPoint((i, j, k))[0])
    assert xs[0] < xs[1]
    # Lung voxels are air in the CT.
    ct = sitk.GetArrayViewFromImage(image)
    assert np.median(ct[class_map > 0]) < -500


def test_overlapping_layers(slicerio_data):
    image = read_image(slicerio_data / "CTChest4.nrrd")
    segments = {s.name: s for s in read_segments(slicerio_data / "SegmentationOverlapping.seg.nrrd", image)}
    sphere, tissue = segments["overlapping sphere"].mask, segments["tissue"].mask
    assert sphere.any() and (sphere & tissue).any()  # layers keep both segments where they overlap
    scheme = scheme_from_segmentations([slicerio_data / "SegmentationOverlapping.seg.nrrd"],
                                       names=["tissue", "overlapping sphere"])
    class_map = read_label(slicerio_data / "SegmentationOverlapping.seg.nrrd", image, scheme)
    assert (class_map[sphere] == 2).all()  # the later class wins where classes overlap
    assert (class_map[tissue & ~sphere] == 1).all()


def test_cropped_extent_placed_into_image_grid(slicerio_data, tmp_path):
    image = read_image(slicerio_data / "CTChest4.nrrd")
    seg = slicerio.read_segmentation(str(slicerio_data / "Segmentation.seg.nrrd"))
    full = slicerio.segment_mask(seg, "left lung")
    ii, jj, kk = np.nonzero(full)
    lo = (ii.min(), jj.min(), kk.min())
    hi = (ii.max() + 1, jj.max() + 1, kk.max() + 1)
    cropped = copy.deepcopy(seg)
    cropped["voxels"] = seg["voxels"][lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].copy()
    cropped["ijkToLPS"] = seg["ijkToLPS"].copy()
    cropped["ijkToLPS"][:3, 3] = seg["ijkToLPS"][:3, :3] @ np.array(lo) + seg["ijkToLPS"][:3, 3]
    for s in cropped["segments"]:
        s.pop("extent", None)
    path = tmp_path / "cropped ü.seg.nrrd"
    slicerio.write_segmentation(str(path), cropped)
    scheme = scheme_from_segmentations([path], names=["left lung"])
    class_map = read_label(path, image, scheme)
    expected = full.transpose(2, 1, 0)
    np.testing.assert_array_equal(class_map == 1, expected)

    # Half a voxel off the image grid is not a sub-grid: refused.
    cropped["ijkToLPS"][:3, 3] += seg["ijkToLPS"][:3, 0] * 0.5
    shifted = tmp_path / "shifted.seg.nrrd"
    slicerio.write_segmentation(str(shifted), cropped)
    assert code_of(read_label, shifted, image, scheme) == "LABEL_GRID_MISMATCH"


def test_unnamed_segments_use_label_values(tmp_path):
    like = grid_image()
    values = np.zeros((6, 8, 10), np.uint8)
    values[1:3, 2:5, 2:6] = 1
    values[3:5, 2:5, 2:6] = 2
    seg = {"voxels": values.transpose(2, 1, 0).copy(), "ijkToLPS": np.diag([1.0, 1.0, 2.0, 1.0]),
           "segments": [{"id": "Segment_1", "name": "Segment_1", "labelValue": 1, "layer": 0},
                        {"id": "Segment_2", "name": "Segment_2", "labelValue": 2, "layer": 0}]}
    path = tmp_path / "imported.seg.nrrd"
    slicerio.write_segmentation(str(path), seg)
    kits = scheme_from_preset("kits")
    np.testing.assert_array_equal(read_label(path, like, kits), values)


@pytest.mark.parametrize("kind, change", [
    ("size", {"size": (10, 8, 7)}),
    ("spacing", {"spacing": (1.0, 1.1, 2.0)}),
    ("origin", {"origin": (0.0, 0.5, 0.0)}),
    ("direction", {"direction": (0, 1, 0, 1, 0, 0, 0, 0, 1)}),
])
def test_label_grid_mismatch(tmp_path, kind, change):
    image = grid_image()
    label = grid_image(**change)
    array = np.zeros(tuple(reversed(label.GetSize())), np.uint8)
    array[1, 1, 1] = 1
    path = write_labelmap(tmp_path / "label.nii.gz", array, label)
    with pytest.raises(MedTuningError) as info:
        read_label(path, image, scheme_from_preset("kits"))
    assert info.value.code == "LABEL_GRID_MISMATCH"
    assert info.value.details["differs"][0] == kind


def test_label_grid_tolerance(tmp_path):
    image = grid_image(spacing=(1.0, 1.0, 2.0))
    label = grid_image(spacing=(1.00001, 1.0, 2.0), origin=(0.00001, 0.0, 0.0))  # within 1e-4 relative
    array = np.zeros((6, 8, 10), np.uint8)
    array[2, 2, 2] = 2
    path = write_labelmap(tmp_path / "label.nrrd", array, label)
    assert read_label(path, image, scheme_from_preset("kits"))[2, 2, 2] == 2


def test_unknown_values_and_empty(tmp_path):
    image = grid_image()
    array = np.zeros((6, 8, 10), np.uint8)
    path = write_labelmap(tmp_path / "empty.nrrd", array, image)
    assert code_of(read_label, path, image, scheme_from_preset("kits")) == "EMPTY_LABEL"
    assert not read_label(path, image, scheme_from_preset("kits"), allow_empty=True).any()
    array[1, 1, 1] = 7
    path = write_labelmap(tmp_path / "seven.nrrd", array, image)
    assert code_of(read_label, path, image, scheme_from_preset("kits")) == "UNKNOWN_LABEL_VALUES"
    assert code_of(read_label, tmp_path / "missing.nrrd", image, scheme_from_preset("kits")) == "FILE_NOT_FOUND"
    broken = tmp_path / "broken.seg.nrrd"
    broken.write_bytes(b"NRRD0004\ntype: what\n")
    assert code_of(read_label, broken, image, scheme_from_preset("kits")) == "FILE_UNREADABLE"


def test_labelmap_for_name_scheme_is_refused(tmp_path, slicerio_data):
    image = grid_image()
    array = np.zeros((6, 8, 10), np.uint8)
    array[1, 1, 1] = 1
    path = write_labelmap(tmp_path / "l.nrrd", array, image)
    scheme = scheme_from_segmentations([slicerio_data / "Segmentation.seg.nrrd"], names=["left lung"])
    assert code_of(read_label, path, image, scheme) == "LABEL_SPEC_INVALID"


@pytest.mark.shared_data
def test_brats2015_regions_on_real_cases(shared_data):
    root = shared_data / "brats2015"
    cases = sorted(root.glob("brats_*"))
    if not cases:
        pytest.skip(f"no BraTS cases under {root}")
    scheme = scheme_from_preset("brats", source="brats2015")
    for case in cases:
        image = read_image(case / "Flair_subtrMeanDivStd.nii.gz")
        raw = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "OTMultiClass.nii.gz")))
        class_map = read_label(case / "OTMultiClass.nii.gz", image, scheme)
        regions = scheme.region_masks(class_map)
        np.testing.assert_array_equal(regions["ET"], raw == 4)
        np.testing.assert_array_equal(regions["TC"], np.isin(raw, [1, 3, 4]))
        np.testing.assert_array_equal(regions["WT"], np.isin(raw, [1, 2, 3, 4]))
        assert regions["WT"].sum() > regions["TC"].sum() > 0
    # The 2019 convention has no label 3: reading 2015 files with it is refused with a hint.
    with pytest.raises(MedTuningError) as info:
        read_label(cases[0] / "OTMultiClass.nii.gz", image, scheme_from_preset("brats", source="brats2019"))
    assert info.value.code == "UNKNOWN_LABEL_VALUES" or not np.isin(3, raw)


@pytest.mark.shared_data
def test_kidneys_from_totalsegmentator_labels(shared_data):
    ct = shared_data / "abdomen-ct-mr" / "ct.nii.gz"
    if not ct.is_file():
        pytest.skip(f"{ct} is absent")
    image = read_image(ct)
    scheme = scheme_from_spec("Kidney=2,3")
    class_map = read_label(shared_data / "abdomen-ct-mr" / "ct_seg.nii.gz", image, scheme)
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "abdomen-ct-mr" / "ct_seg.nii.gz")))
    np.testing.assert_array_equal(class_map == 1, np.isin(raw, [2, 3]))
    assert Grid.of(image).size == (122, 101, 112)
