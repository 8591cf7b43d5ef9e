"""The working spacing: chosen at training, recorded in the model folder, inputs resampled to it and results
brought back onto each input's own grid (real NRRD files, real training, real segment / evaluate)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from MedTuningLib.data.spacing import (choose_spacing, parse_spacing_option, to_input_grid, to_working_grid,
                                       working_shape)
from MedTuningLib.errors import MedTuningError
from MedTuningLib.schema import FORMAT_VERSION, ModelManifest
from engine_helpers import TINY_TRAIN, make_blob_library, write_blob_case


def test_spacing_option_and_choice():
    assert parse_spacing_option(None) == "auto" and parse_spacing_option("native") == "native"
    assert parse_spacing_option("0.8,0.7,2.5") == (2.5, 0.7, 0.8)  # X,Y,Z in, (z, y, x) array order out
    assert parse_spacing_option("1.5") == (1.5, 1.5, 1.5)
    for bad in ("1,2", "fast", "0,1,1", "nan,1,1"):
        with pytest.raises(MedTuningError) as info:
            parse_spacing_option(bad)
        assert info.value.code == "INVALID_OPTION"
    # Isotropic enough: the median per axis.
    assert choose_spacing([(1.5, 0.7, 0.7), (2.0, 0.8, 0.8), (1.8, 0.9, 0.9)], [(100, 512, 512)] * 3) == (1.8, 0.8, 0.8)
    # nnU-Net's anisotropy rule: thick slices on most scans, one thin-slice scan: the 10th percentile along z.
    assert choose_spacing([(5.0, 0.7, 0.7), (5.0, 0.8, 0.8), (1.0, 0.75, 0.75)], [(40, 512, 512)] * 3) == (1.8, 0.75, 0.75)


def test_resampling_to_the_working_grid_and_back_keeps_a_structure():
    z, y, x = np.mgrid[:30, :64, :64]
    sphere = ((z - 15) * 2.0) ** 2 + ((y - 30) * 0.8) ** 2 + ((x - 33) * 0.8) ** 2 < 14 ** 2  # mm
    spacing, working = (2.0, 0.8, 0.8), (1.5, 1.5, 1.5)
    label = to_working_grid(sphere.astype(np.uint8), spacing, working, nearest=True)
    assert label.shape == working_shape(sphere.shape, spacing, working) == (40, 34, 34)
    assert set(np.unique(label)) == {0, 1}  # nearest: no new label values
    # Probabilities of background / sphere, to the working grid and back: argmax on the input grid.
    probs = np.stack([1.0 - sphere, sphere]).astype(np.float32)
    back = to_input_grid(to_working_grid(probs, spacing, working), working, spacing, sphere.shape)
    assert back.shape == (2,) + sphere.shape
    mask = back.argmax(0) == 1
    dice = 2 * (mask & sphere).sum() / (mask.sum() + sphere.sum())
    assert dice > 0.95, dice
    assert abs(mask.sum() - sphere.sum()) < 0.05 * sphere.sum()  # no shift nor scaling of the structure
    assert to_working_grid(probs, spacing, None) is probs and to_working_grid(probs, spacing, spacing) is probs


def test_the_way_back_interpolates_as_simpleitk_does_on_the_same_grids():
    """to_input_grid (PyTorch) against SimpleITK's linear resampling with the voxel edges aligned: the same
    values wherever SimpleITK interpolates; past the working grid's last voxel centre both take edge values."""
    from MedTuningLib.data.spacing import _resample

    rng = np.random.default_rng(0)
    spacing, working, shape = (1.68, 0.72, 0.72), (1.5, 1.5, 1.5), (20, 51, 53)
    grid = working_shape(shape, spacing, working)
    probs = rng.dirichlet(np.ones(3), size=grid).transpose(3, 0, 1, 2).astype(np.float32)
    back = to_input_grid(probs, working, spacing, shape)
    assert back.shape == (3, *shape)
    reference = np.stack([_resample(p, working, shape, spacing, False) for p in probs])
    # Input voxels whose centres lie within the working grid's buffer (continuous index <= n - 0.5 on every axis).
    inside = [((np.arange(n) + 0.5) * s / t - 0.5) <= m - 0.5 for n, s, t, m in zip(shape, spacing, working, grid)]
    region = np.ix_(*[np.flatnonzero(axis) for axis in inside])
    assert not all(axis.all() for axis in inside)  # the grid has input voxels past the working grid's edge
    np.testing.assert_allclose(back[(slice(None), *region)], reference[(slice(None), *region)], atol=1e-5)
    np.testing.assert_allclose(back.sum(0), 1.0, atol=1e-5)  # still probabilities everywhere


def test_a_manifest_without_spacing_means_native():
    data = {"format_version": FORMAT_VERSION, "architecture": {"arch": "vit_upernet"}, "base_weights": "none",
            "modalities": ["CT"], "label_scheme": {}, "preprocessing": {}, "crop": [4, 32, 32], "stored": "full"}
    assert ModelManifest.from_dict(data).spacing is None
    assert ModelManifest.from_dict({**data, "spacing": [0.8, 0.8, 2.5]}).to_dict()["spacing"] == [0.8, 0.8, 2.5]
    with pytest.raises(MedTuningError) as info:
        ModelManifest.from_dict({**data, "spacing": [0.8, "x"]})
    assert info.value.code == "MODEL_FOLDER_INVALID"


def test_bad_spacing_is_refused_before_anything_is_written(tmp_path, cli):
    status, events = cli(["train", "--library", str(tmp_path / "lib"), "--out", str(tmp_path / "m"),
                          "--spacing", "1,2", *TINY_TRAIN])
    assert status == 2 and events[-1]["code"] == "INVALID_OPTION" and not (tmp_path / "m.partial").exists()


def test_train_segment_and_evaluate_at_a_working_spacing(tmp_path, cli):
    library = make_blob_library(cli, tmp_path)  # cases at 1 x 1 x 1.2 mm
    model = tmp_path / "model"
    status, events = cli(["train", "--library", str(library), "--out", str(model), "--labels", "Blob=1", *TINY_TRAIN,
                          "--crop", "4x16x16", "--spacing", "2,2,1.2", "--epochs", "3", "--steps-per-epoch", "2",
                          "--seed", "1"])
    assert status == 0, events[-3:]
    manifest = json.loads((model / "medtuning.json").read_text(encoding="utf-8"))
    assert manifest["spacing"] == [2.0, 2.0, 1.2]
    assert any("working spacing 2 x 2 x 1.2 mm" in e.get("message", "") for e in events if e["event"] == "log")
    assert manifest["test"]["cases"]  # held-out scores computed through the working grid, on the case's own grid

    # A scan on another grid (0.8 mm in-plane, shifted origin, tilted axes): the result keeps its geometry exactly.
    image, _ = write_blob_case(tmp_path / "other", "fine", seed=5, shape=(8, 50, 50), spacing=(1.2, 0.8, 0.8),
                               origin=(-12.5, 30.0, 7.0))
    img = sitk.ReadImage(str(image))
    img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(image), True)
    out = tmp_path / "fine.seg.nrrd"
    status, events = cli(["segment", "--model", str(model), "--image", str(image), "--out", str(out),
                          "--device", "cpu"])
    assert status == 0, events[-3:]
    assert any("working spacing" in e.get("message", "") for e in events if e["event"] == "log")
    seg = sitk.ReadImage(str(out))
    assert seg.GetSize()[:3] == img.GetSize()
    assert np.allclose(seg.GetSpacing(), img.GetSpacing()) and np.allclose(seg.GetOrigin(), img.GetOrigin())
    assert np.allclose(seg.GetDirection(), img.GetDirection())

    status, events = cli(["evaluate", "--model", str(model), "--library", str(library), "--split", "test",
                          "--device", "cpu"])
    assert status == 0, events[-3:]
    dice = [e["value"] for e in events if e["event"] == "metric" and e["name"].startswith("dice/")]
    assert dice and all(0.0 <= d <= 1.0 for d in dice)

    # A warm start keeps the model's working spacing; a --spacing that contradicts it is refused.
    status, events = cli(["train", "--library", str(library), "--out", str(tmp_path / "warm"), "--init-from",
                          str(model), *TINY_TRAIN, "--crop", "4x16x16", "--spacing", "native", "--epochs", "1"])
    assert status == 2 and events[-1]["code"] == "INVALID_OPTION", events[-3:]
    assert "2 x 2 x 1.2 mm" in events[-1]["message"] and not (tmp_path / "warm").exists()
