"""``cases add --slices``: a slab keeps its physical place and its segments."""

from __future__ import annotations

import numpy as np
import slicerio
import SimpleITK as sitk


def test_slab_of_a_slicer_segmentation(cli, tmp_path, slicerio_data):
    library = tmp_path / "lib"
    status, events = cli(["cases", "add", "--library", str(library), "--image", str(slicerio_data / "CTChest4.nrrd"),
                          "--label", str(slicerio_data / "Segmentation.seg.nrrd"), "--slices", "24:", "--id", "top",
                          "--split", "test"])
    assert status == 0, events[-1]
    case_dir = library / "cases" / "top"
    image = sitk.ReadImage(str(case_dir / "image.nrrd"))
    full = sitk.ReadImage(str(slicerio_data / "CTChest4.nrrd"))
    assert image.GetSize() == (128, 128, 10)
    np.testing.assert_allclose(image.GetOrigin(), full.TransformIndexToPhysicalPoint((0, 0, 24)), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(full)[24:])
    seg = slicerio.read_segmentation(str(case_dir / "label.seg.nrrd"))
    original = slicerio.read_segmentation(str(slicerio_data / "Segmentation.seg.nrrd"))
    assert [s["name"] for s in seg["segments"]] == [s["name"] for s in original["segments"]]
    right = slicerio.extract_segments(seg, [("right lung", 1)])["voxels"]
    right_full = slicerio.extract_segments(original, [("right lung", 1)])["voxels"]
    assert right.sum() == right_full[:, :, 24:].sum() > 0


def test_bad_slice_range_is_refused_and_nothing_added(cli, tmp_path, slicerio_data):
    library = tmp_path / "lib"
    status, events = cli(["cases", "add", "--library", str(library), "--image", str(slicerio_data / "CTChest4.nrrd"),
                          "--label", str(slicerio_data / "Segmentation.seg.nrrd"), "--slices", "40:50"])
    assert status == 2 and events[-1]["code"] == "INVALID_OPTION"
    assert not (library / "cases").exists() or not any((library / "cases").iterdir())
