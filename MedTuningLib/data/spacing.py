"""The working spacing of a model: the voxel size every input is resampled to before the network sees it.

Chosen at training from the training cases (``--spacing auto``: their median spacing, with nnU-Net's rule for
anisotropic data), given (``--spacing X,Y,Z`` in mm) or ``native`` (no resampling: each scan is used on its own
grid, the behaviour of models written before the working spacing existed). Recorded in the model folder.

Images are resampled linearly, labels by nearest neighbour; predictions go back to the input's own grid as
probabilities (linear) before the argmax, so a result keeps the input geometry exactly. The working grid
covers the same physical extent as the input (voxel edges aligned, as nnU-Net's resize does): only the
spacing changes, so resampling is a pure change of scale and needs no origin or direction.

Arrays here are ``[D, H, W]`` (or ``[C, D, H, W]``) with spacings in the same order ``(z, y, x)``; the
manifest and the command line spell spacings as SimpleITK and Slicer do, ``(x, y, z)``.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from MedTuningLib.errors import MedTuningError

Spacing = tuple[float, float, float]  # (z, y, x) mm, array order
SpacingOption = Union[str, Spacing]  # "auto", "native" or (z, y, x)

# nnU-Net (ExperimentPlanner.determine_fullres_target_spacing): an axis is "anisotropic" when its median
# spacing is over 3 times the finest other one (and it has under a third of their voxels); it then takes
# the 10th percentile of that axis's spacings rather than the median, so thin-slice scans are not thrown away.
ANISOTROPY_RATIO = 3.0
ANISOTROPIC_PERCENTILE = 10
# Spacings within this relative difference of the working spacing are used as they are (no resampling).
SAME_SPACING_RTOL = 1e-3


def parse_spacing_option(text: str | None) -> SpacingOption:
    """``auto`` / ``native`` / ``X,Y,Z`` (mm, SimpleITK order) or one number for all axes -> an option."""
    value = (text or "auto").strip().lower()
    if value in ("auto", "native"):
        return value
    try:
        numbers = [float(part) for part in value.replace("x", ",").split(",")]
    except ValueError:
        numbers = []
    if len(numbers) == 1:
        numbers = numbers * 3
    if len(numbers) != 3 or not all(np.isfinite(n) and 0.01 <= n <= 100 for n in numbers):
        raise MedTuningError("INVALID_OPTION", f"--spacing {text!r} is not a spacing",
                             "use auto (from the training cases), native (each scan's own grid), one size in mm "
                             "(1.5) or X,Y,Z in mm (0.8,0.8,2.5), each between 0.01 and 100")
    x, y, z = numbers
    return (z, y, x)


def choose_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> Spacing:
    """The working spacing of a set of training cases: per axis the median, unless one axis is anisotropic
    (nnU-Net's rule), which then takes the 10th percentile of its spacings (never finer than the other axes)."""
    spacing_array = np.asarray(spacings, dtype=float)
    shape_array = np.asarray(shapes, dtype=float)
    target = np.median(spacing_array, axis=0)
    target_shape = np.median(shape_array * spacing_array / target, axis=0)
    worst = int(np.argmax(target))
    others = [axis for axis in range(3) if axis != worst]
    anisotropic_spacing = target[worst] > ANISOTROPY_RATIO * max(target[others])
    anisotropic_voxels = target_shape[worst] * ANISOTROPY_RATIO < min(target_shape[others])
    if anisotropic_spacing and anisotropic_voxels:
        along = float(np.percentile(spacing_array[:, worst], ANISOTROPIC_PERCENTILE))
        target[worst] = max(along, float(max(target[others])) + 1e-5)
    return tuple(round(float(s), 6) for s in target)  # type: ignore[return-value]


def working_spacing_for(option: SpacingOption, cases: Sequence[dict]) -> Spacing | None:
    """The working spacing for ``option`` over training ``cases`` (dicts with ``spacing`` (z, y, x) and
    ``image`` ``[C, D, H, W]``); None for native."""
    if option == "native":
        return None
    if option == "auto":
        return choose_spacing([c["spacing"] for c in cases], [c["image"].shape[-3:] for c in cases])
    return tuple(float(s) for s in option)  # type: ignore[return-value]


def same_spacing(a: Sequence[float], b: Sequence[float] | None) -> bool:
    return b is None or all(abs(x - y) <= SAME_SPACING_RTOL * max(abs(x), abs(y)) for x, y in zip(a, b))


def working_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, int, int]:
    """Voxels of the working grid covering the extent of ``shape`` at ``spacing`` (at least one per axis)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))  # type: ignore


def _resample(volume: np.ndarray, spacing: Sequence[float], out_shape: Sequence[int],
              out_spacing: Sequence[float], nearest: bool) -> np.ndarray:
    """One ``[D, H, W]`` array resampled onto a grid of ``out_shape`` x ``out_spacing`` with the same extent."""
    import SimpleITK as sitk

    source = sitk.GetImageFromArray(np.ascontiguousarray(volume))
    source.SetSpacing([float(s) for s in reversed(spacing)])
    reference = sitk.Image([int(n) for n in reversed(out_shape)], source.GetPixelID())
    reference.SetSpacing([float(s) for s in reversed(out_spacing)])
    # Voxel edges aligned: the first voxel's centre sits half a voxel in from the common edge.
    reference.SetOrigin([(o - s) / 2 for o, s in zip(reversed(out_spacing), reversed(spacing))])
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    resampled = sitk.Resample(source, reference, sitk.Transform(), interpolator, 0.0, source.GetPixelID(),
                              True)  # nearest-neighbour extrapolation at the border half-voxels
    return sitk.GetArrayFromImage(resampled)


def to_working_grid(array: np.ndarray, spacing: Sequence[float], target: Sequence[float] | None,
                    nearest: bool = False) -> np.ndarray:
    """``[D, H, W]`` or ``[C, D, H, W]`` at ``spacing`` onto the working spacing ``target`` (linear for
    images, ``nearest`` for labels); unchanged when the spacing already is the working one."""
    if same_spacing(spacing, target):
        return array
    shape = working_shape(array.shape[-3:], spacing, target)
    if array.ndim == 3:
        return _resample(array, spacing, shape, target, nearest)
    return np.stack([_resample(channel, spacing, shape, target, nearest) for channel in array])


def to_input_grid(probs: np.ndarray, target: Sequence[float] | None, spacing: Sequence[float],
                  shape: Sequence[int]) -> np.ndarray:
    """Probabilities ``[K, d, h, w]`` on the working grid back onto the input grid (``shape`` at ``spacing``),
    linearly, so the argmax is taken on the input grid.

    PyTorch's trilinear interpolation with the spacing ratio as its scale and ``align_corners=False`` places the
    grids as :func:`_resample` does (voxel edges aligned) and is several times faster than SimpleITK on a
    clinical grid (5.2 s against 1.0 s for 3 x 512 x 512 x 200 on two cores). One replicated voxel at the far
    edges lets the output cover ``shape``: voxels past the working grid's last centre take its edge values,
    interpolated along the other axes (SimpleITK's nearest-neighbour extrapolation does not interpolate there).
    """
    if same_spacing(spacing, target) and tuple(probs.shape[-3:]) == tuple(shape):
        return probs
    import torch
    import torch.nn.functional as F

    d, h, w = (int(n) for n in shape)
    with torch.inference_mode():
        source = torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32))[None]
        source = F.pad(source, (0, 1, 0, 1, 0, 1), mode="replicate")
        scale = [float(t) / float(s) for t, s in zip(target, spacing)]  # type: ignore[arg-type]
        out = F.interpolate(source, scale_factor=scale, mode="trilinear", align_corners=False,
                            recompute_scale_factor=False)
    if any(n < m for n, m in zip(out.shape[-3:], (d, h, w))):
        raise RuntimeError(f"resampled grid {tuple(out.shape[-3:])} does not cover the input grid {(d, h, w)}")
    return out[0, :, :d, :h, :w].numpy()  # a view: no copy of a clinical-size array


def describe(spacing: Sequence[float] | None) -> str:
    """``0.8 x 0.8 x 2.5 mm`` in (x, y, z) order, or ``native``."""
    if spacing is None:
        return "native (each scan's own grid)"
    return " x ".join(f"{s:g}" for s in reversed(spacing)) + " mm"
