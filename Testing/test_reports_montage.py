"""Overlay montages: centred on the region, the overlay visible in each of the three panels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from MedTuningLib.reports.montage import VIEWS, centre_of_region, region_montage

GREEN = (0.0, 1.0, 0.0)


def _sphere(shape, centre, radius_mm, spacing) -> np.ndarray:
    grids = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij")
    return sum((g - c * s) ** 2 for g, c, s in zip(grids, centre, spacing)) <= radius_mm ** 2


def _green_pixels(png: Path, box: tuple[int, int, int, int]) -> np.ndarray:
    """(row, col) of the pixels in ``box`` that are clearly green (the overlay), in panel-relative units."""
    import matplotlib.image as mpimg

    pixels = mpimg.imread(png)[..., :3]
    left, top, right, bottom = box
    crop = pixels[top:bottom, left:right]
    green = crop[..., 1] - np.maximum(crop[..., 0], crop[..., 2]) > 0.25
    rows, cols = np.nonzero(green)
    return np.stack([(rows + 0.5) / crop.shape[0], (cols + 0.5) / crop.shape[1]], axis=1)


def _expected_fraction(view: str, slices_shape: tuple[int, int, int], centre) -> tuple[float, float]:
    """Where a voxel centre lands inside a panel, as (row, col) fractions (top-left origin)."""
    d, h, w = slices_shape
    z, y, x = centre
    if view == "axial":
        return (y + 0.5) / h, (x + 0.5) / w
    if view == "coronal":  # superior (high z) at the top
        return 1 - (z + 0.5) / d, (x + 0.5) / w
    return 1 - (z + 0.5) / d, (y + 0.5) / h


@pytest.fixture(scope="module")
def synthetic():
    shape, spacing = (30, 80, 100), (3.0, 1.0, 0.8)
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, shape).astype(np.float32)
    image += 3 * _sphere(shape, (15, 40, 50), 35, spacing)  # an "organ" in the middle
    centre = (7, 58, 25)  # off-centre on every axis
    reference = _sphere(shape, centre, 10, spacing)
    prediction = _sphere(shape, (7, 59, 26), 9, spacing)
    return image, reference, prediction, spacing, centre


def test_montage_is_centred_on_the_reference_region(tmp_path, synthetic):
    image, reference, prediction, spacing, centre = synthetic
    result = region_montage(image, prediction, reference, GREEN, spacing, tmp_path / "m.png", title="case <1> — kidney")
    assert result["centred_on"] == "reference"
    assert result["slices"] == {"axial": 7, "coronal": 58, "sagittal": 25}
    assert np.allclose(result["centre"], centre, atol=0.01)

    png = tmp_path / "m.png"
    assert png.read_bytes().startswith(b"\x89PNG")
    for view in VIEWS:
        found = _green_pixels(png, result["panels"][view])
        assert len(found) > 50, f"no overlay visible in the {view} panel"
        expected = _expected_fraction(view, image.shape, centre)
        assert np.allclose(found.mean(axis=0), expected, atol=0.06), (view, found.mean(axis=0), expected)


def test_panels_have_the_physical_aspect_ratio(tmp_path, synthetic):
    image, reference, prediction, spacing, _ = synthetic
    result = region_montage(image, prediction, reference, GREEN, spacing, tmp_path / "m.png")
    d, h, w = (n * s for n, s in zip(image.shape, spacing))  # extent in mm
    expected = {"axial": h / w, "coronal": d / w, "sagittal": d / h}
    for view, (left, top, right, bottom) in result["panels"].items():
        assert (bottom - top) / (right - left) == pytest.approx(expected[view], rel=0.05), view


def test_centre_falls_back_to_prediction_then_volume(tmp_path, synthetic):
    image, _, prediction, spacing, _ = synthetic
    empty = np.zeros(image.shape, bool)
    by_prediction = region_montage(image, prediction, empty, GREEN, spacing, tmp_path / "p.png")
    assert by_prediction["centred_on"] == "prediction"
    assert by_prediction["slices"] == {"axial": 7, "coronal": 59, "sagittal": 26}
    by_volume = region_montage(image, empty, None, GREEN, spacing, tmp_path / "v.png")
    assert by_volume["centred_on"] == "volume"
    assert by_volume["slices"] == {"axial": 14, "coronal": 40, "sagittal": 50}  # round((n - 1) / 2)
    assert centre_of_region(None, (3, 5, 7)) == (1.0, 2.0, 3.0)


def test_hollow_region_gets_slices_that_cut_it(tmp_path):
    shape, spacing = (20, 40, 40), (1.0, 1.0, 1.0)
    shell = _sphere(shape, (10, 20, 20), 8, spacing) & ~_sphere(shape, (10, 20, 20), 6, spacing)
    shell[:, :, 17:24] = False  # a gap through the centre along x
    result = region_montage(np.zeros(shape, np.float32), shell, shell, (255, 0, 0), spacing, tmp_path / "s.png")
    k, j, i = (result["slices"][v] for v in VIEWS)
    assert shell[k].any() and shell[:, j].any() and shell[:, :, i].any()
    assert i in (16, 24)


def test_shape_mismatch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        region_montage(np.zeros((4, 5, 6)), np.zeros((4, 5, 5), bool), None, GREEN, (1, 1, 1), tmp_path / "x.png")


@pytest.mark.shared_data
def test_montage_on_real_spleen_ct(tmp_path, shared_data):
    import SimpleITK as sitk
    from scipy import ndimage

    folder = shared_data / "spleen-ct"
    if not (folder / "ct.nii.gz").is_file():
        pytest.skip(f"{folder} has no ct.nii.gz")
    ct = sitk.ReadImage(str(folder / "ct.nii.gz"))
    image = sitk.GetArrayFromImage(ct).astype(np.float32)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "ct_seg.nii.gz"))) == 1
    prediction = ndimage.binary_erosion(reference, iterations=2)  # a plausible, slightly small prediction
    spacing = ct.GetSpacing()[::-1]

    result = region_montage(image, prediction, reference, GREEN, spacing, tmp_path / "spleen.png",
                            title="spleen-ct — spleen")
    zz, yy, xx = np.nonzero(reference)
    k, j, i = (result["slices"][v] for v in VIEWS)
    assert reference[k].any() and reference[:, j].any() and reference[:, :, i].any()
    assert abs(k - zz.mean()) <= 1 and abs(j - yy.mean()) <= 1 and abs(i - xx.mean()) <= 1
    for view in VIEWS:
        assert len(_green_pixels(tmp_path / "spleen.png", result["panels"][view])) > 20, view


def test_zoom_to_a_small_region_keeps_it_centred(tmp_path, synthetic):
    image, reference, prediction, spacing, centre = synthetic
    result = region_montage(image, prediction, reference, GREEN, spacing, tmp_path / "z.png", margin_mm=5,
                            window=(-2.0, 5.0))
    # bounding box y 48..68, x 13..37 (radius 10 mm at 1 x 0.8 mm) plus 5 mm = 5 rows, 7 columns
    assert result["zoom"]["axial"] == ((43, 73), (6, 44))
    for view in VIEWS:
        found = _green_pixels(tmp_path / "z.png", result["panels"][view])
        assert len(found) > 200, view
        # the region now fills the middle of every panel
        assert np.allclose(found.mean(axis=0), (0.5, 0.5), atol=0.08), (view, found.mean(axis=0))


def test_ras_stored_volumes_are_turned_to_the_radiological_order():
    """A NIfTI stored RAS (x towards the patient's right, y anterior) and permuted is drawn like an LPS volume."""
    import SimpleITK as sitk

    from MedTuningLib.reports.montage import to_lps_arrays

    shape = (4, 5, 6)  # [D, H, W]
    reference = sitk.Image(shape[2], shape[1], shape[0], sitk.sitkFloat32)
    reference.SetSpacing((0.8, 1.0, 3.0))
    reference.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS in ITK's LPS world
    grey = np.zeros(shape, np.float32)
    grey[1, 0, 0] = 7.0  # the voxel nearest the patient's right and front
    mask = grey > 0
    (oriented_grey, oriented_mask, missing), spacing = to_lps_arrays(reference, grey, mask, None)
    assert missing is None and oriented_mask.dtype == bool
    assert spacing == (3.0, 1.0, 0.8)
    assert oriented_grey[1, 4, 5] == 7.0 and oriented_mask[1, 4, 5] and oriented_mask.sum() == 1
    # an already LPS volume is left as it is
    reference.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    (same,), _ = to_lps_arrays(reference, grey)
    assert np.array_equal(same, grey)
