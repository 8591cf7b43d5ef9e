"""Intensity normalisation, its record, the MONAI training transforms and the preprocessed-case cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MedTuningLib.data.cache import CaseCache
from MedTuningLib.data.labels import scheme_from_preset
from MedTuningLib.data.preprocess import Preprocessing, normalize_intensity
from MedTuningLib.data.transforms import training_transforms, validation_transforms
from MedTuningLib.errors import MedTuningError


def test_ct_and_mr_normalisation():
    rng = np.random.default_rng(0)
    ct = rng.normal(0, 400, (8, 16, 16)).astype(np.float32)
    ct[0] = -3000  # outside the window: clipped
    mr = np.zeros((8, 16, 16), np.float32)
    mr[2:6, 4:12, 4:12] = rng.normal(500, 50, (4, 8, 8))
    prep = Preprocessing.infer(["CT", "FLAIR"], [ct, mr])
    assert prep.kinds == ["CT", "MR"]
    out = normalize_intensity(np.stack([ct, mr]), prep)
    assert out.dtype == np.float32 and out.shape == (2, 8, 16, 16)
    assert abs(out[0].mean()) < 1e-4 and abs(out[0].std() - 1) < 1e-3
    assert (out[1][mr == 0] == 0).all()  # MR background stays zero
    inside = out[1][mr != 0]
    assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1) < 1e-3
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    with pytest.raises(MedTuningError) as info:
        normalize_intensity(np.stack([ct]), prep)
    assert info.value.code == "MODALITY_COUNT_MISMATCH"


def test_kind_guessed_from_values():
    hu = np.full((4, 8, 8), -1000, np.float32)
    hu[:, 2:6, 2:6] = 300
    assert Preprocessing.infer(["image"], [hu]).kinds == ["CT"]
    zscored = np.random.default_rng(1).normal(0, 1, (4, 8, 8)).astype(np.float32)
    assert Preprocessing.infer(["image"], [zscored]).kinds == ["MR"]


def test_ct_fit_uses_foreground_window_at_least_soft_tissue():
    rng = np.random.default_rng(2)
    image = rng.normal(40, 20, (1, 8, 16, 16)).astype(np.float32)
    label = np.zeros((8, 16, 16), np.uint8)
    label[2:6, 4:12, 4:12] = 1
    image[0][label > 0] += 400  # a bright structure (contrast-filled kidney): window reaches above 240 HU
    prep = Preprocessing(["CT"], ["CT"]).fit([(image, label)])
    lo, hi = prep.ct_clip
    assert lo == -160 and 440 < hi < 520
    assert prep.ct_mean is not None and 40 < prep.ct_mean < 440
    assert Preprocessing.from_dict(prep.to_dict()).ct_clip == prep.ct_clip
    # Air-filled structures (lungs) keep their percentile floor and the soft-tissue ceiling.
    lungs = np.where(label > 0, -850.0, 40.0)[None].astype(np.float32)
    lo, hi = Preprocessing(["CT"], ["CT"]).fit([(lungs, label)]).ct_clip
    assert lo == -850 and hi == 240


def sample(shape=(1, 12, 20, 20)):
    image = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    label = np.zeros((1, *shape[1:]), np.uint8)
    label[0, 5:7, 9:11, 9:11] = 1  # a small "tumour"
    return {"image": image, "label": label}


def test_training_crops_oversample_foreground_and_are_seeded():
    crop = (8, 16, 16)
    t1 = training_transforms(crop, num_samples=6, seed=7)
    t2 = training_transforms(crop, num_samples=6, seed=7)
    out1, out2 = t1(sample()), t2(sample())
    assert len(out1) == 6
    for a, b in zip(out1, out2):
        assert tuple(a["image"].shape) == (1, *crop) and tuple(a["label"].shape) == (1, *crop)
        assert isinstance(a["image"], torch.Tensor)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    with_fg = sum(bool(o["label"].any()) for o in out1)
    assert with_fg >= 3  # pos:neg 2:1


def test_small_volume_padded_and_class_sampling():
    crop = (16, 32, 32)
    small = sample((1, 6, 10, 10))
    out = training_transforms(crop, num_samples=2, num_classes=2, class_ratios=[1, 3], seed=1)(small)
    assert all(tuple(o["image"].shape) == (1, *crop) for o in out)
    assert all(o["label"].sum() == small["label"].sum() > 0 for o in out)  # padded: the whole label in every crop
    whole = validation_transforms()(sample())
    assert tuple(whole["image"].shape) == (1, 12, 20, 20)


def test_cache_round_trip_and_invalidation(tmp_path):
    src = tmp_path / "in put é.nrrd"
    src.write_bytes(b"x" * 10)
    lab = tmp_path / "label.nrrd"
    lab.write_bytes(b"y")
    cache = CaseCache(tmp_path / "cache")
    prep = Preprocessing(["CT"], ["CT"])
    scheme = scheme_from_preset("kits")
    calls = []

    def compute():
        calls.append(1)
        return np.ones((1, 2, 3, 4), np.float32), np.zeros((2, 3, 4), np.uint8), {"note": "ok"}

    image, label, meta = cache.get_or_compute([src], lab, prep, scheme, compute)
    image2, label2, meta2 = cache.get_or_compute([src], lab, prep, scheme, compute)
    assert len(calls) == 1 and meta2["note"] == "ok"
    np.testing.assert_array_equal(image, image2)
    # Another scheme, another preprocessing or a changed file is another entry.
    cache.get_or_compute([src], lab, prep, scheme_from_preset("brats"), compute)
    cache.get_or_compute([src], lab, Preprocessing(["CT"], ["MR"]), scheme, compute)
    src.write_bytes(b"z" * 11)
    cache.get_or_compute([src], lab, prep, scheme, compute)
    assert len(calls) == 4
    assert not list((tmp_path / "cache").glob("*.pkl"))
    # A damaged entry is recomputed, never trusted.
    key = cache.key([src], lab, prep, scheme)
    (tmp_path / "cache" / f"{key}.npz").write_bytes(b"garbage")
    cache.get_or_compute([src], lab, prep, scheme, compute)
    assert len(calls) == 5


def test_cache_get_or_build_for_library_cases(tmp_path):
    from types import SimpleNamespace

    image_file, label_file = tmp_path / "ct.nrrd", tmp_path / "label.seg.nrrd"
    image_file.write_bytes(b"1")
    label_file.write_bytes(b"2")
    case = SimpleNamespace(id="c1", image_paths=[image_file], label_path=label_file)
    cache = CaseCache(tmp_path / "cache")
    calls = []

    def build():
        calls.append(1)
        return {"image": np.ones((1, 2, 2, 2), np.float32), "label": np.ones((1, 2, 2, 2), np.uint8),
                "spacing": (2.0, 1.0, 1.0)}

    first = cache.get_or_build(case, scheme_from_preset("kits"), Preprocessing(["CT"], ["CT"]), build)
    again = cache.get_or_build(case, scheme_from_preset("kits"), Preprocessing(["CT"], ["CT"]), build)
    assert len(calls) == 1 and again["spacing"] == (2.0, 1.0, 1.0)
    np.testing.assert_array_equal(again["label"], first["label"])
