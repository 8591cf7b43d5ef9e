"""Intensity normalisation, and the record of it that a model folder keeps.

CT: Hounsfield units clipped to a window, then z-scored (with statistics fitted on the training
cases when :meth:`Preprocessing.fit` was called — foreground percentiles as nnU-Net does, widened to at
least the soft-tissue window — else per volume).
MRI: z-score inside the non-zero region (BraTS skull-stripped volumes: zero stays zero). The grid
is kept as it is (native orientation and spacing) and recorded so, so inference reproduces it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from MedTuningLib.errors import MedTuningError

KINDS = ("CT", "MR")
DEFAULT_CT_CLIP = (-1000.0, 1000.0)
# The narrowest CT window fitted on training data (HU): the usual abdominal soft-tissue window.
SOFT_TISSUE_WINDOW = (-160.0, 240.0)
_MR_NAMES = ("MR", "MRI", "T1", "T2", "FLAIR", "PD", "ADC", "DWI", "T1C", "T1CE", "T1GD", "T2W", "T1W", "SWI")


@dataclass
class Preprocessing:
    """How volumes are turned into network input; stored in ``medtuning.json``."""

    modalities: list[str]
    kinds: list[str]  # "CT" or "MR" per modality
    ct_clip: tuple[float, float] = DEFAULT_CT_CLIP
    # Dataset statistics of the clipped CT values (None: z-score each volume on its own).
    ct_mean: float | None = None
    ct_std: float | None = None
    orientation: str = "native"  # the volume's own axes; nothing is reoriented
    target_spacing: list[float] | None = None  # None: native spacing, nothing is resampled
    version: int = 1

    def __post_init__(self) -> None:
        if len(self.kinds) != len(self.modalities):
            raise MedTuningError("MODALITY_COUNT_MISMATCH", f"{len(self.modalities)} modalities but {len(self.kinds)} "
                                 "modality kinds", "give one kind (CT or MR) per modality")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise MedTuningError("INVALID_OPTION", f"unknown modality kind(s) {bad}", "use CT or MR")
        self.ct_clip = (float(self.ct_clip[0]), float(self.ct_clip[1]))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ct_clip"] = list(self.ct_clip)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        """The record read from a model folder: every value of the type and range it must have (issue 15:
        a text or infinite value ended in a traceback, or in silently wrong input to the network)."""
        import math

        def bad(what: str) -> MedTuningError:
            return MedTuningError("MODEL_FOLDER_INVALID", f"the preprocessing in medtuning.json {what}",
                                  "the model folder is damaged or was edited: train it again or copy it again")

        def finite(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if not isinstance(data, dict):
            raise bad("is not an object")
        known = {f for f in cls.__dataclass_fields__}  # readers ignore fields a newer version added
        values = {k: v for k, v in data.items() if k in known}
        for key in ("modalities", "kinds"):
            if not isinstance(values.get(key), list) or not all(isinstance(v, str) for v in values[key]):
                raise bad(f"has '{key}' that are not a list of names")
        clip = values.get("ct_clip", DEFAULT_CT_CLIP)
        if not isinstance(clip, (list, tuple)) or len(clip) != 2 or not all(finite(v) for v in clip) \
                or not clip[0] < clip[1]:
            raise bad(f"has a CT window {clip!r} that is not two finite numbers, low then high")
        for key in ("ct_mean", "ct_std"):
            if values.get(key) is not None and not finite(values[key]):
                raise bad(f"has a {key} {values[key]!r} that is not a finite number")
        if values.get("ct_std") is not None and not values["ct_std"] > 0:
            raise bad(f"has a ct_std {values['ct_std']!r} that is not positive")
        if values.get("orientation", "native") != "native":
            raise bad(f"has an orientation {values['orientation']!r}; this MedTuning keeps the native one")
        spacing = values.get("target_spacing")
        if spacing is not None and (not isinstance(spacing, list) or len(spacing) != 3
                                    or not all(finite(v) and v > 0 for v in spacing)):
            raise bad(f"has a target spacing {spacing!r} that is not three positive sizes")
        return cls(**values)

    @staticmethod
    def guess_kind(name: str, array: np.ndarray | None = None) -> str:
        """CT or MR from the modality name, else from the values (CT has air at about -1000 HU)."""
        upper = name.upper().replace("-", "").replace("_", "")
        if upper.startswith("CT"):
            return "CT"
        if any(upper.startswith(m) for m in _MR_NAMES):
            return "MR"
        if array is not None and array.size:
            sample = array.ravel()[:: max(1, array.size // 200_000)]
            if float(np.percentile(sample, 1)) < -500 and float(sample.max()) > 100:
                return "CT"
        return "MR"

    @classmethod
    def infer(cls, modality_names: Sequence[str], images: Sequence[Any]) -> "Preprocessing":
        """Guess CT vs MR per modality from names and values (``images``: arrays [D,H,W] or a [C,D,H,W] array
        or SimpleITK images)."""
        arrays = [_as_array(im) for im in images]
        if len(arrays) == 1 and arrays[0].ndim == 4:
            arrays = list(arrays[0])
        if len(arrays) != len(modality_names):
            raise MedTuningError("MODALITY_COUNT_MISMATCH", f"{len(modality_names)} modality names for "
                                 f"{len(arrays)} images", "give one name per image")
        kinds = [cls.guess_kind(n, a) for n, a in zip(modality_names, arrays)]
        return cls(modalities=list(modality_names), kinds=kinds)

    def fit(self, cases: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> "Preprocessing":
        """Fit the CT window and statistics on training cases: (image [C,D,H,W], class map or None) pairs.

        The window covers the 0.5–99.5 percentiles of the labelled voxels, as nnU-Net does, widened to
        at least the soft-tissue window (-160, 240) HU: a window of the labelled structure alone (lungs:
        about -930 to -290 HU) would flatten the anatomy around it (heart, vessels, chest wall) that a
        model needs for context. Mean and standard deviation come from the clipped voxels of the whole
        volumes. Without labelled voxels the fixed window is kept. Only the first CT channel is used.
        """
        if "CT" not in self.kinds:
            return self
        c = self.kinds.index("CT")
        foreground, everything = [], []
        for image, label in cases:
            channel = image[c]
            everything.append(channel.ravel()[:: max(1, channel.size // 200_000)])
            values = channel[label > 0] if label is not None and label.any() else None
            if values is not None and values.size:
                foreground.append(values[:: max(1, values.size // 100_000)])
        if foreground:
            lo, hi = np.percentile(np.concatenate(foreground).astype(np.float64), [0.5, 99.5])
            lo, hi = min(float(lo), SOFT_TISSUE_WINDOW[0]), max(float(hi), SOFT_TISSUE_WINDOW[1])
            self.ct_clip = (lo, hi)
            clipped = np.clip(np.concatenate(everything).astype(np.float64), lo, hi)
            self.ct_mean, self.ct_std = float(clipped.mean()), float(max(clipped.std(), 1e-6))
        return self


def _as_array(image: Any) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    import SimpleITK as sitk

    return sitk.GetArrayViewFromImage(image)


def normalize_intensity(array: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Normalised float32 copy of a [C, D, H, W] volume (see the module docstring)."""
    array = np.asarray(array)
    if array.ndim != 4 or array.shape[0] != len(prep.kinds):
        raise MedTuningError("MODALITY_COUNT_MISMATCH", f"the volume has {array.shape[0] if array.ndim == 4 else '?'} "
                             f"channel(s) but the model expects {len(prep.kinds)} ({', '.join(prep.modalities)})",
                             "give one image per modality, in the model's order")
    out = np.empty(array.shape, dtype=np.float32)
    for c, kind in enumerate(prep.kinds):
        channel = array[c].astype(np.float32, copy=False)
        if kind == "CT":
            clipped = np.clip(channel, *prep.ct_clip)
            if prep.ct_mean is not None and prep.ct_std:
                mean, std = prep.ct_mean, prep.ct_std
            else:
                mean, std = float(clipped.mean()), float(clipped.std())
            out[c] = (clipped - mean) / max(std, 1e-6)
        else:
            nonzero = channel != 0
            out[c] = 0.0
            if nonzero.any():
                values = channel[nonzero]
                mean, std = float(values.mean()), float(values.std())
                out[c][nonzero] = (values - mean) / max(std, 1e-6)
    return out
