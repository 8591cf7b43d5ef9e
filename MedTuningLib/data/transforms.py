"""MONAI dict transforms for training and validation (paper: random crops, flips on three axes,
intensity scale 0.9–1.1 and shift ±0.1).

Samples are ``{"image": [C, D, H, W] float32, "label": [1, D, H, W] class indices}``. By default crops
oversample foreground (positive:negative 2:1, or per class) so that small tumours are seen, and the
intensity scale and shift are one draw per crop; ``sampling="uniform"`` and ``intensity="per_column"``
are the official Med-Tuning choices (``--recipe paper``; docs/method.md says why the defaults differ).
Volumes smaller than the crop are padded first. Seeds are set with ``set_random_state``.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import (Compose, EnsureTyped, MapTransform, RandCropByLabelClassesd, RandCropByPosNegLabeld,
                              RandFlipd, RandomizableTransform, RandScaleIntensityd, RandShiftIntensityd,
                              RandSpatialCropd, SpatialPadd)
from monai.utils import convert_to_dst_type

KEYS = ("image", "label")
CROP_SAMPLINGS = ("foreground", "uniform")
INTENSITY_MODES = ("global", "per_column")
# Keys of a sample's precomputed crop-centre indices (crop_centre_indices), read by the foreground crop sampling.
FG_INDICES, BG_INDICES = "label_fg_indices", "label_bg_indices"


class RandColumnIntensityd(RandomizableTransform, MapTransform):
    """Official Med-Tuning intensity augmentation (``data/BraTS.py: Random_intencity_shift``): ``x·s + b`` with
    ``s ~ U(1 − f, 1 + f)`` and ``b ~ U(−f, f)`` drawn for every (channel, image column), i.e. arrays of shape
    ``[C, 1, 1, W]`` for a ``[C, D, H, W]`` image.

    The official draws have shape ``[1, W, 1, C]`` over its ``[H, W, D, C]`` arrays, whose W becomes the last
    axis of the network input ``[C, D, H, W]``: so here too the columns are the last axis of what the network sees.
    """

    backend = ["torch", "numpy"]

    def __init__(self, keys: KeysCollection, factor: float = 0.1, prob: float = 1.0,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.factor = float(factor)
        self._scale: np.ndarray | None = None
        self._shift: np.ndarray | None = None

    def randomize(self, shape: Sequence[int]) -> None:  # type: ignore[override]
        super().randomize(None)
        size = (int(shape[0]),) + (1,) * (len(shape) - 2) + (int(shape[-1]),)
        self._scale = self.R.uniform(1.0 - self.factor, 1.0 + self.factor, size=size)
        self._shift = self.R.uniform(-self.factor, self.factor, size=size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = self.first_key(d)
        if first == ():
            return d
        self.randomize(d[first].shape)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            image = d[key]
            scale = convert_to_dst_type(self._scale, image, dtype=image.dtype)[0]
            shift = convert_to_dst_type(self._shift, image, dtype=image.dtype)[0]
            d[key] = image * scale + shift
        return d


def training_transforms(crop: Sequence[int], num_samples: int = 1, pos: float = 2.0, neg: float = 1.0,
                        num_classes: int | None = None, class_ratios: Sequence[float] | None = None,
                        flip_prob: float = 0.5, scale: float = 0.1, shift: float = 0.1,
                        seed: int | None = None, flip_axes: Sequence[int] = (0, 1, 2), sampling: str = "foreground",
                        intensity: str = "global") -> Compose:
    """Random crops of ``crop`` (D, H, W), flips, intensity scale and shift.

    ``sampling="uniform"``: every crop position equally likely (``RandSpatialCropd``, the official sampling).
    ``intensity="per_column"``: :class:`RandColumnIntensityd` (official) instead of one scale and one shift
    per crop. Foreground sampling: with ``class_ratios`` (one per class, background first; needs
    ``num_classes``) crops are centred on each class in that proportion (``RandCropByLabelClassesd``), else on foreground vs background in
    ``pos:neg`` (``RandCropByPosNegLabeld``). ``num_samples`` crops come from each volume.
    """
    crop = [int(c) for c in crop]
    if sampling not in CROP_SAMPLINGS:
        raise ValueError(f"crop sampling must be one of {CROP_SAMPLINGS}, not {sampling!r}")
    if intensity not in INTENSITY_MODES:
        raise ValueError(f"intensity augmentation must be one of {INTENSITY_MODES}, not {intensity!r}")
    if sampling == "uniform":
        cropper = RandSpatialCropd(keys=KEYS, roi_size=crop, random_size=False)
    elif class_ratios is not None:
        if num_classes is None or len(class_ratios) != num_classes:
            raise ValueError("class_ratios needs one ratio per class (background first) and num_classes")
        cropper = RandCropByLabelClassesd(keys=KEYS, label_key="label", spatial_size=crop, ratios=list(class_ratios),
                                          num_classes=num_classes, num_samples=num_samples, warn=False)
    else:
        cropper = RandCropByPosNegLabeld(keys=KEYS, label_key="label", spatial_size=crop, pos=pos, neg=neg,
                                         num_samples=num_samples, fg_indices_key=FG_INDICES, bg_indices_key=BG_INDICES)
    transforms = Compose([
        # Constant padding: 0 is the mean of a normalised volume and background in the label.
        SpatialPadd(keys=KEYS, spatial_size=crop, mode="constant"),
        cropper,
        # The paper flips all three axes; ``flip_axes`` leaves out the left-right axis for lateral labels.
        *[RandFlipd(keys=KEYS, prob=flip_prob, spatial_axis=axis) for axis in flip_axes],
        *([RandColumnIntensityd(keys="image", factor=scale)] if intensity == "per_column" else [
            RandScaleIntensityd(keys="image", factors=scale, prob=1.0),
            RandShiftIntensityd(keys="image", offsets=shift, prob=1.0)]),
        EnsureTyped(keys=KEYS, track_meta=False),
    ])
    if seed is not None:
        transforms.set_random_state(seed=seed)
    return transforms


def crop_centre_indices(label: np.ndarray, crop: Sequence[int]) -> dict[str, np.ndarray]:
    """The foreground and background voxel indices of a ``[1, D, H, W]`` label, computed once per case for the
    foreground crop sampling (which otherwise scans the whole label for every crop: 1.6 s per crop on a
    512x512x154 CT). Passed with the sample, they give the same crops as the scan would. Empty for a label
    smaller than the crop (it is padded first, which moves its indices)."""
    from monai.transforms.utils import map_binary_to_indices

    if any(int(n) < int(c) for n, c in zip(label.shape[-3:], crop)):
        return {}
    foreground, background = map_binary_to_indices(np.asarray(label), None, 0.0)  # as the crop itself computes
    # int32 halves the memory of the background indices (every voxel but the foreground) where they fit.
    dtype = np.int32 if label.size < 2**31 else np.int64
    return {FG_INDICES: np.asarray(foreground).astype(dtype, copy=False),
            BG_INDICES: np.asarray(background).astype(dtype, copy=False)}


def validation_transforms() -> Compose:
    """Whole volumes as tensors (validation runs sliding-window inference over them)."""
    return Compose([EnsureTyped(keys=KEYS, track_meta=False)])
