"""Uniform crops and per-(column, channel) intensity augmentation: the official data/BraTS.py
Random_Crop and Random_intencity_shift, as MONAI dict transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MedTuningLib.data.transforms import RandColumnIntensityd, training_transforms


def _coordinates(shape):
    """A 3-channel image whose channels hold each voxel's (z, y, x): a crop shows where it was taken."""
    d, h, w = shape
    z, y, x = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([z, y, x]).astype(np.float32)


def test_uniform_crops_reach_every_start_equally():
    shape, crop = (6, 9, 7), (4, 4, 4)
    image = _coordinates(shape)
    label = np.zeros((1, *shape), np.uint8)
    label[0, 0, 0, 0] = 1  # foreground sampling would be drawn to this corner; uniform sampling is not
    t = training_transforms(crop, sampling="uniform", flip_prob=0.0, scale=0.0, shift=0.0, seed=3)
    counts: dict[tuple, int] = {}
    n = 1200
    for _ in range(n):
        out = t({"image": image, "label": label})
        corner = tuple(int(v) for v in np.asarray(out["image"])[:, 0, 0, 0])
        assert np.asarray(out["image"]).shape == (3, *crop)
        counts[corner] = counts.get(corner, 0) + 1
    # Official: random.randint(0, size - crop) per axis (both ends included), i.e. every start equally likely.
    starts = [(z, y, x) for z in range(shape[0] - crop[0] + 1) for y in range(shape[1] - crop[1] + 1)
              for x in range(shape[2] - crop[2] + 1)]
    assert sorted(counts) == sorted(starts)
    expected = n / len(starts)
    chi2 = sum((counts[s] - expected) ** 2 / expected for s in starts)
    assert chi2 < 130  # 59 degrees of freedom: p ≈ 1e-7 for a uniform draw to exceed this


def test_per_column_intensity_draws_one_scale_and_shift_per_channel_and_column():
    t = RandColumnIntensityd(keys="image", factor=0.1)
    t.set_random_state(seed=5)
    ones = {"image": np.ones((2, 3, 4, 5), np.float32)}
    a = np.asarray(t(ones)["image"])
    t.set_random_state(seed=5)
    b = np.asarray(t({"image": 2 * np.ones((2, 3, 4, 5), np.float32)})["image"])
    scale, shift = b - a, 2 * a - b  # x·s + b at x = 1 and x = 2
    # Official sizes [1, W, 1, C] over [H, W, D, C] arrays: constant along slices and rows, one per (channel, column).
    assert np.allclose(scale, scale[:, :1, :1, :]) and np.allclose(shift, shift[:, :1, :1, :])
    per = scale[:, 0, 0, :]
    assert len(np.unique(np.round(per, 6))) == per.size  # every (channel, column) its own draw
    assert (per >= 0.9).all() and (per <= 1.1).all()
    assert (shift >= -0.1 - 1e-6).all() and (shift <= 0.1 + 1e-6).all()


def test_global_intensity_stays_the_project_default():
    t = training_transforms((2, 4, 4), flip_prob=0.0, seed=1)
    out = t({"image": np.ones((2, 2, 4, 4), np.float32), "label": np.ones((1, 2, 4, 4), np.uint8)})
    out = np.asarray((out[0] if isinstance(out, list) else out)["image"])
    assert np.allclose(out, out.flat[0])  # one scale and one shift for the whole crop
    with pytest.raises(ValueError):
        training_transforms((2, 4, 4), sampling="everywhere")


def test_shuffle_order_gives_every_case_once_per_pass_split_among_processes():
    """--case-order shuffle: DistributedSampler(shuffle=True) as the official code uses it."""
    from MedTuningLib.engine.train import CropSampler

    cases = [{"image": np.full((1, 2, 4, 4), 10.0 * i, np.float32), "label": np.zeros((1, 2, 4, 4), np.uint8)}
             for i in range(5)]

    def draws(rank: int, epoch: int, n: int) -> list[int]:
        sampler = CropSampler(cases, (2, 4, 4), 2, sampling="uniform", order="shuffle")
        sampler.reseed(100 * rank + epoch)  # the per-rank crop seed: it must not change the case order
        sampler.start_epoch(seed=0, epoch=epoch, rank=rank, world=2)
        images, _ = sampler.batch(n)
        return [int(round(float(img.mean()) / 10)) for img in images]

    first, second = draws(0, 1, 3), draws(1, 1, 3)
    # 5 cases padded to 6 by repeating the order's first; rank 0 takes positions 0, 2, 4, rank 1 positions 1, 3, 5.
    assert sorted(set(first + second)) == [0, 1, 2, 3, 4] and len(first + second) == 6
    assert draws(0, 1, 3) == first  # reproducible (resume)
    assert [draws(0, e, 3) + draws(1, e, 3) for e in (2, 3, 4)] != [first + second] * 3  # a fresh order per epoch
    # A second pass in the same epoch: again every case, in another order.
    assert sorted(set(draws(0, 1, 6)[3:] + draws(1, 1, 6)[3:])) == [0, 1, 2, 3, 4]


def test_crop_centres_are_indexed_once_per_case_and_exclude_the_foreground_from_the_background():
    """Foreground sampling reads the precomputed indices (no scan of the label per crop); the background
    indices are every voxel outside the label (MONAI's own torch path would count the foreground in too)."""
    from MedTuningLib.data.transforms import BG_INDICES, FG_INDICES, crop_centre_indices
    from MedTuningLib.engine.train_data import CropDataset, CropKey

    label = np.zeros((1, 20, 40, 40), np.uint8)
    label[0, 5:10, 10:20, 10:20] = 1
    indices = crop_centre_indices(label, (8, 16, 16))
    assert len(indices[FG_INDICES]) == 500 and len(indices[BG_INDICES]) == 20 * 40 * 40 - 500
    assert indices[BG_INDICES].dtype == np.int32
    assert not np.isin(indices[FG_INDICES], indices[BG_INDICES]).any()
    assert crop_centre_indices(label, (8, 64, 64)) == {}  # padded first: the crop computes them itself

    image = np.random.default_rng(0).random((1, 20, 40, 40)).astype(np.float32)
    dataset = CropDataset([{"image": image, "label": label}], (8, 16, 16), 2)
    assert dataset.indices[0]  # computed at construction
    first = [dataset._transform(CropKey(0, seed)) for seed in range(12)]
    again = [dataset._transform(CropKey(0, seed)) for seed in range(12)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    with_foreground = sum(int(crop_label.sum() > 0) for _, crop_label in first)
    assert with_foreground >= 6  # positive:negative 2:1 around a label that fills a third of a crop
