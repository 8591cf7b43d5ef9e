"""Image readers: formats written and read back, and every input check with its error code."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from MedTuningLib.data.io import read_case_images, read_image
from MedTuningLib.errors import MedTuningError


def make_image(size=(12, 10, 8), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=None, seed=0,
               dtype=np.int16) -> sitk.Image:
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 1000, size=tuple(reversed(size))).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def code_of(fn, *args, **kwargs) -> str:
    with pytest.raises(MedTuningError) as info:
        fn(*args, **kwargs)
    assert info.value.message and info.value.hint
    return info.value.code


@pytest.mark.parametrize("name", ["vol.nrrd", "vol.nii.gz", "vol.nii", "vol.mha", "with space é/vol ü.nrrd"])
def test_formats_round_trip(tmp_path, name):
    image = make_image(origin=(3.0, -2.0, 5.5), direction=(0, 1, 0, -1, 0, 0, 0, 0, 1))
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    read = read_image(path)
    assert read.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(read.GetOrigin(), image.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(read.GetDirection(), image.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image).astype(np.float32))


def test_dicom_folder(tmp_path):
    image = make_image(size=(16, 16, 5), spacing=(0.8, 0.8, 2.5), origin=(10.0, 20.0, 30.0))
    folder = tmp_path / "dicom séries"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        origin = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {"0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
                           "0020|000e": "1.2.826.0.1.3680043.2.1125.2", "0020|0013": str(k + 1),
                           "0020|0032": "\\".join(map(str, origin)), "0020|0037": "1\\0\\0\\0\\1\\0",
                           "0018|0050": "2.5", "0028|0030": "0.8\\0.8"}.items():
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(piece)
    read = read_image(folder)
    assert read.GetSize() == (16, 16, 5)
    np.testing.assert_allclose(read.GetSpacing(), (0.8, 0.8, 2.5), atol=1e-4)
    np.testing.assert_allclose(read.GetOrigin(), (10.0, 20.0, 30.0), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image).astype(np.float32))


def test_file_not_found(tmp_path):
    assert code_of(read_image, tmp_path / "nope.nii.gz") == "FILE_NOT_FOUND"


def test_truncated_and_non_images(tmp_path):
    good = tmp_path / "good.nii.gz"
    sitk.WriteImage(make_image(size=(40, 40, 20)), str(good))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert code_of(read_image, truncated) == "FILE_UNREADABLE"
    raw = tmp_path / "raw.nrrd"
    sitk.WriteImage(make_image(size=(40, 40, 20)), str(raw), useCompression=False)
    cut = tmp_path / "cut.nrrd"
    cut.write_bytes(raw.read_bytes()[:-5000])
    assert code_of(read_image, cut) == "FILE_UNREADABLE"
    plain = tmp_path / "plain.nii"
    sitk.WriteImage(make_image(size=(40, 40, 20)), str(plain))
    cut_nii = tmp_path / "cut.nii"
    cut_nii.write_bytes(plain.read_bytes()[:-100])
    assert code_of(read_image, cut_nii) == "FILE_UNREADABLE"
    text = tmp_path / "notes.nii.gz"
    text.write_bytes(gzip.compress(b"these are not voxels"))
    assert code_of(read_image, text) == "FILE_UNREADABLE"
    other = tmp_path / "report.txt"
    other.write_text("hello", encoding="utf-8")
    assert code_of(read_image, other) == "FILE_UNREADABLE"
    empty_dir = tmp_path / "empty folder"
    empty_dir.mkdir()
    assert code_of(read_image, empty_dir) == "FILE_UNREADABLE"


def test_dimensions(tmp_path):
    two_d = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((8, 8), np.int16)), str(two_d))
    assert code_of(read_image, two_d) == "IMAGE_DIMENSION"
    four_d = tmp_path / "series.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((3, 4, 8, 8), np.int16)), str(four_d))
    assert code_of(read_image, four_d) == "IMAGE_DIMENSION"
    vector = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 8, 8, 3), np.uint8), isVector=True), str(vector))
    assert code_of(read_image, vector) == "IMAGE_DIMENSION"
    one_slice = tmp_path / "one.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((1, 8, 8), np.int16)), str(one_slice))
    assert code_of(read_image, one_slice) == "IMAGE_DIMENSION"


def test_non_finite(tmp_path):
    array = np.zeros((4, 8, 8), np.float32)
    array[1, 2, 3] = np.nan
    array[2, 2, 2] = np.inf
    path = tmp_path / "nan.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    assert code_of(read_image, path) == "NON_FINITE_VOXELS"


def test_constant_and_anisotropic(tmp_path):
    constant = tmp_path / "constant.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 8, 8), 7, np.int16)), str(constant))
    assert code_of(read_case_images, [constant]) == "CONSTANT_IMAGE"
    thin = tmp_path / "thin.nrrd"
    sitk.WriteImage(make_image(spacing=(0.3, 0.3, 12.0)), str(thin))
    assert code_of(read_case_images, [thin]) == "EXTREME_ANISOTROPY"


def test_modalities_stacked_on_same_grid(tmp_path):
    a, b = tmp_path / "t1 ü.nii.gz", tmp_path / "flair.nrrd"
    sitk.WriteImage(make_image(seed=1), str(a))
    sitk.WriteImage(make_image(seed=2), str(b))
    array, reference = read_case_images([a, b])
    assert array.shape == (2, 8, 10, 12) and array.dtype == np.float32
    assert reference.GetSize() == (12, 10, 8)
    np.testing.assert_array_equal(array[1], sitk.GetArrayFromImage(make_image(seed=2)))


def test_modality_resampled_when_overlapping(tmp_path):
    a, b = tmp_path / "ct.nrrd", tmp_path / "pet.nrrd"
    ref = make_image(size=(20, 20, 10), spacing=(1.0, 1.0, 1.0))
    sitk.WriteImage(ref, str(a))
    coarse = sitk.Image(10, 10, 5, sitk.sitkFloat32) + 5.0
    coarse[9, 9, 4] = 6.0  # not constant
    coarse.SetSpacing((2.0, 2.0, 2.0))
    coarse.SetOrigin((0.5, 0.5, 0.5))  # same physical box as ref
    sitk.WriteImage(coarse, str(b))
    notes = []
    array, reference = read_case_images([a, b], log=notes.append)
    assert array.shape == (2, 10, 20, 20)
    assert notes and "resampled" in notes[0]
    assert np.allclose(array[1, 1:6, 1:12, 1:12], 5.0)


def test_modality_grid_mismatch_when_disjoint(tmp_path):
    a, b = tmp_path / "a.nrrd", tmp_path / "b.nrrd"
    sitk.WriteImage(make_image(seed=1), str(a))
    sitk.WriteImage(make_image(seed=2, origin=(500.0, 0.0, 0.0)), str(b))
    assert code_of(read_case_images, [a, b]) == "MODALITY_GRID_MISMATCH"
