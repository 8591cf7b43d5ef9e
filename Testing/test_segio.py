"""Results written as 3D Slicer writes them: slicerio reads back names, colours, terminology, layers, geometry."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from MedTuningLib.data.io import read_image, read_label
from MedTuningLib.data.labels import scheme_from_preset, scheme_from_segmentations
from MedTuningLib.errors import MedTuningError
from MedTuningLib.segio import ijk_to_lps, write_labelmap, write_segmentation


@pytest.fixture
def chest(slicerio_data):
    return read_image(slicerio_data / "CTChest4.nrrd")


def brats_like_class_map(reference: sitk.Image) -> np.ndarray:
    class_map = np.zeros(tuple(reversed(reference.GetSize())), np.uint8)
    class_map[5:15, 30:80, 30:80] = 2  # oedema
    class_map[7:13, 40:70, 40:70] = 1  # necrosis
    class_map[9:11, 50:60, 50:60] = 3  # enhancing
    return class_map


def test_brats_regions_as_layers(chest, tmp_path):
    scheme = scheme_from_preset("brats")
    class_map = brats_like_class_map(chest)
    path = tmp_path / "résultat 1.seg.nrrd"
    write_segmentation(path, scheme.output_masks(class_map), chest, scheme)
    seg = slicerio.read_segmentation(str(path))
    np.testing.assert_allclose(seg["ijkToLPS"], ijk_to_lps(chest), atol=1e-6)
    assert seg["voxels"].shape == (3, 128, 128, 34)  # three overlapping segments: three layers
    assert [s["name"] for s in seg["segments"]] == ["ET", "TC", "WT"]
    for written, expected in zip(seg["segments"], scheme.segments):
        np.testing.assert_allclose(written["color"], expected.color, atol=1e-6)
        assert written["terminology"]["type"] == expected.terminology["type"]
        assert written["terminology"]["contextName"] == expected.terminology["contextName"]
        assert written["terminology"]["anatomicRegion"][2] == "Brain"
    masks = scheme.output_masks(class_map)
    for name, mask in masks.items():
        np.testing.assert_array_equal(slicerio.segment_mask(seg, name).transpose(2, 1, 0), mask)
    # Read back (a corrected result added to the library) gives the same classes.
    np.testing.assert_array_equal(read_label(path, chest, scheme), class_map)
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind


def test_kits_classes_single_layer(chest, tmp_path):
    scheme = scheme_from_preset("kits")
    class_map = np.zeros(tuple(reversed(chest.GetSize())), np.uint8)
    class_map[10:20, 20:40, 20:40] = 1
    class_map[12:15, 25:30, 25:30] = 2
    path = tmp_path / "kits.seg.nrrd"
    write_segmentation(path, scheme.output_masks(class_map), chest, scheme)
    seg = slicerio.read_segmentation(str(path))
    assert seg["voxels"].ndim == 3  # disjoint classes share one layer, label values 1 and 2
    assert [(s["name"], s["labelValue"], s["layer"]) for s in seg["segments"]] == \
        [("Kidney", 1, 0), ("Kidney tumour", 2, 0)]
    assert seg["segments"][0]["terminology"]["type"] == ["SCT", "64033007", "Kidney"]
    np.testing.assert_array_equal(read_label(path, chest, scheme), class_map)


def test_custom_scheme_keeps_source_terminology(chest, slicerio_data, tmp_path):
    scheme = scheme_from_segmentations([slicerio_data / "Segmentation.seg.nrrd"], names=["right lung", "left lung"])
    truth = read_label(slicerio_data / "Segmentation.seg.nrrd", chest, scheme)
    path = tmp_path / "lungs.seg.nrrd"
    write_segmentation(path, scheme.output_masks(truth), chest, scheme)
    written = slicerio.read_segmentation(str(path))
    original = slicerio.read_segmentation(str(slicerio_data / "Segmentation.seg.nrrd"))
    for name in ("right lung", "left lung"):
        a, b = slicerio.segment_from_name(written, name), slicerio.segment_from_name(original, name)
        assert a["terminology"] == b["terminology"]
        np.testing.assert_allclose(a["color"], b["color"], atol=1e-6)
        np.testing.assert_array_equal(slicerio.segment_mask(written, name), slicerio.segment_mask(original, name))
    np.testing.assert_allclose(written["ijkToLPS"], original["ijkToLPS"], atol=1e-5)


def test_empty_segment_is_written(chest, tmp_path):
    scheme = scheme_from_preset("kits")
    class_map = np.zeros(tuple(reversed(chest.GetSize())), np.uint8)
    class_map[1, 1, 1] = 1
    path = tmp_path / "empty tumour.seg.nrrd"
    write_segmentation(path, scheme.output_masks(class_map), chest, scheme)
    seg = slicerio.read_segmentation(str(path))
    assert not slicerio.segment_mask(seg, "Kidney tumour").any()


def test_labelmap(chest, tmp_path):
    class_map = brats_like_class_map(chest)
    for name in ("map ü.nii.gz", "map.nrrd"):
        write_labelmap(tmp_path / name, class_map, chest)
        read = sitk.ReadImage(str(tmp_path / name))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read), class_map)
        np.testing.assert_allclose(read.GetOrigin(), chest.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(read.GetDirection(), chest.GetDirection(), atol=1e-6)


def test_output_not_writable(chest, tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("x", encoding="utf-8")
    scheme = scheme_from_preset("kits")
    masks = scheme.output_masks(np.zeros(tuple(reversed(chest.GetSize())), np.uint8))
    with pytest.raises(MedTuningError) as info:
        write_segmentation(blocker / "out.seg.nrrd", masks, chest, scheme)
    assert info.value.code == "OUTPUT_NOT_WRITABLE"
    with pytest.raises(ValueError):
        write_segmentation(tmp_path / "bad.seg.nrrd", {"Kidney": np.zeros((2, 2, 2), bool)}, chest, scheme)
    assert not list(tmp_path.glob("*.seg.nrrd")) and not list(tmp_path.glob(".*"))
