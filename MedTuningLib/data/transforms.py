"""MONAI dict transforms for training and validation (paper: random crops, flips on three axes,
intensity scale 0.9–1.1 and shift ±0.1).

Samples are ``{"image": [C, D, H, W] float32, "label": [1, D, H, W] class indices}``. Crops
oversample foreground (positive:negative 2:1 by default, or per class) so that small tumours are
seen; volumes smaller than the crop are padded first. Seeds are set with ``set_random_state``.
"""

from __future__ import annotations

from typing import Sequence

from monai.transforms import (Compose, EnsureTyped, RandCropByLabelClassesd, RandCropByPosNegLabeld, RandFlipd,
                              RandScaleIntensityd, RandShiftIntensityd, SpatialPadd)

KEYS = ("image", "label")


def training_transforms(crop: Sequence[int], num_samples: int = 1, pos: float = 2.0, neg: float = 1.0,
                        num_classes: int | None = None, class_ratios: Sequence[float] | None = None,
                        flip_prob: float = 0.5, scale: float = 0.1, shift: float = 0.1,
                        seed: int | None = None, flip_axes: Sequence[int] = (0, 1, 2)) -> Compose:
    """Random foreground-weighted crops of ``crop`` (D, H, W), flips, intensity scale and shift.

    With ``class_ratios`` (one per class, background first; needs ``num_classes``) crops are centred on
    each class in that proportion (``RandCropByLabelClassesd``), else on foreground vs background in
    ``pos:neg`` (``RandCropByPosNegLabeld``). ``num_samples`` crops come from each volume.
    """
    crop = [int(c) for c in crop]
    if class_ratios is not None:
        if num_classes is None or len(class_ratios) != num_classes:
            raise ValueError("class_ratios needs one ratio per class (background first) and num_classes")
        cropper = RandCropByLabelClassesd(keys=KEYS, label_key="label", spatial_size=crop, ratios=list(class_ratios),
                                          num_classes=num_classes, num_samples=num_samples, warn=False)
    else:
        cropper = RandCropByPosNegLabeld(keys=KEYS, label_key="label", spatial_size=crop, pos=pos, neg=neg,
                                         num_samples=num_samples)
    transforms = Compose([
        # Constant padding: 0 is the mean of a normalised volume and background in the label.
        SpatialPadd(keys=KEYS, spatial_size=crop, mode="constant"),
        cropper,
        # The paper flips all three axes; ``flip_axes`` leaves out the left-right axis for lateral labels.
        *[RandFlipd(keys=KEYS, prob=flip_prob, spatial_axis=axis) for axis in flip_axes],
        RandScaleIntensityd(keys="image", factors=scale, prob=1.0),
        RandShiftIntensityd(keys="image", offsets=shift, prob=1.0),
        EnsureTyped(keys=KEYS, track_meta=False),
    ])
    if seed is not None:
        transforms.set_random_state(seed=seed)
    return transforms


def validation_transforms() -> Compose:
    """Whole volumes as tensors (validation runs sliding-window inference over them)."""
    return Compose([EnsureTyped(keys=KEYS, track_meta=False)])
