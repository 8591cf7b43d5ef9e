"""Voxel grids: comparing them, placing cropped sub-grids, resampling modalities.

docs/method.md, "Geometry": image and label must share the grid (size, spacing, origin, direction within
1e-4 relative); a .seg.nrrd on a sub-grid of the image (same spacing and direction, integer offset —
how 3D Slicer crops segment extents) is placed into the image grid; modalities on other grids are
resampled onto the first modality's grid when their physical extents overlap. Anything else is refused
with a code, never silently shifted.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from MedTuningLib.errors import MedTuningError

# Relative tolerance for "same grid" (docs/method.md). Origins are compared in voxel units.
GRID_TOLERANCE = 1e-4
# Largest ratio between the coarsest and finest voxel spacing accepted for training / inference.
MAX_ANISOTROPY = 25.0


@dataclass(frozen=True)
class Grid:
    """A voxel grid in LPS physical space, in SimpleITK's (x, y, z) axis order."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major, columns are the axis directions

    @classmethod
    def of(cls, image: sitk.Image) -> "Grid":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    @classmethod
    def from_ijk_to_lps(cls, matrix: np.ndarray, size: tuple[int, int, int]) -> "Grid":
        """The grid of a 4x4 voxel-to-LPS matrix (as slicerio gives for a .seg.nrrd)."""
        matrix = np.asarray(matrix, dtype=float)
        axes = matrix[:3, :3]
        spacing = np.linalg.norm(axes, axis=0)
        direction = axes / np.where(spacing == 0, 1.0, spacing)
        return cls(tuple(int(s) for s in size), tuple(float(s) for s in spacing),
                   tuple(float(v) for v in matrix[:3, 3]), tuple(float(v) for v in direction.ravel()))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def index_to_physical(self) -> np.ndarray:
        """3x3 matrix taking a (continuous) index offset to a physical offset."""
        return self.direction_matrix @ np.diag(self.spacing)

    def to_dict(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    def describe(self) -> str:
        return (f"size {tuple(self.size)}, spacing {tuple(round(s, 5) for s in self.spacing)}, "
                f"origin {tuple(round(o, 4) for o in self.origin)}")


def grid_differences(a: Grid, b: Grid, tol: float = GRID_TOLERANCE) -> list[str]:
    """Which of size / spacing / origin / direction differ between two grids (empty: same grid)."""
    diffs = []
    if tuple(a.size) != tuple(b.size):
        diffs.append(f"size {_show(a.size)} vs {_show(b.size)}")
    sa, sb = np.asarray(a.spacing), np.asarray(b.spacing)
    if not np.allclose(sa, sb, rtol=tol, atol=0):
        diffs.append(f"spacing {_show(sa, 6)} vs {_show(sb, 6)}")
    # Origins are compared relative to the voxel size: 1e-4 of a voxel is far below any visible shift.
    if np.any(np.abs(np.asarray(a.origin) - np.asarray(b.origin)) > tol * max(float(sa.min()), 1e-12)):
        diffs.append(f"origin {_show(a.origin, 4)} vs {_show(b.origin, 4)}")
    if not np.allclose(a.direction_matrix, b.direction_matrix, rtol=0, atol=tol):
        diffs.append(f"direction {_show(a.direction, 4)} vs {_show(b.direction, 4)}")
    return diffs


def _show(values, digits: int | None = None) -> str:
    """``(1.0, 0.5, 2.0)`` for messages: plain numbers (NumPy 2 would write ``np.float64(1.0)``).
    Without ``digits`` the values are sizes, written as integers."""
    if digits is None:
        return "(" + ", ".join(str(int(v)) for v in values) + ")"
    return "(" + ", ".join(repr(round(float(v), digits) + 0.0) for v in values) + ")"  # + 0.0: no "-0.0"


def same_grid(a: Grid, b: Grid, tol: float = GRID_TOLERANCE) -> bool:
    return not grid_differences(a, b, tol)


def check_label_grid(image: Grid, label: Grid, label_name: str = "label") -> None:
    """Raise LABEL_GRID_MISMATCH (saying what differs) unless the label is on the image's grid."""
    diffs = grid_differences(image, label)
    if diffs:
        raise MedTuningError(
            "LABEL_GRID_MISMATCH", f"the {label_name} is not on the image's voxel grid: " + "; ".join(diffs),
            "export the label with the image as reference geometry (in 3D Slicer: Segmentations > "
            "Export to files, or set the reference volume), or resample it onto the image yourself",
            differs=[d.split(" ")[0] for d in diffs])


def subgrid_offset(image: Grid, sub: Grid, tol: float = GRID_TOLERANCE) -> tuple[int, int, int] | None:
    """The integer (x, y, z) index of ``sub``'s first voxel in ``image``, when ``sub`` is a sub-grid.

    A sub-grid has the same spacing and direction and an origin on one of the image's voxel centres
    (3D Slicer writes segmentations cropped to the segments' extent this way). ``None`` otherwise.
    """
    if not np.allclose(image.spacing, sub.spacing, rtol=tol, atol=0):
        return None
    if not np.allclose(image.direction_matrix, sub.direction_matrix, rtol=0, atol=tol):
        return None
    delta = np.asarray(sub.origin) - np.asarray(image.origin)
    index = np.linalg.solve(image.index_to_physical, delta)
    rounded = np.round(index)
    if np.any(np.abs(index - rounded) > 1e-3):  # a fraction of a voxel: not on the grid
        return None
    return tuple(int(v) for v in rounded)  # type: ignore[return-value]


def place_subgrid(array: np.ndarray, offset_xyz: tuple[int, int, int], image_size_xyz: tuple[int, int, int],
                  what: str = "label") -> np.ndarray:
    """Put ``array`` ([z, y, x], on a sub-grid at ``offset_xyz``) into a zero array of the image's size.

    Parts of the sub-grid outside the image are dropped when they hold only zeros (Slicer may pad
    extents); foreground outside the image is refused, since it cannot be represented.
    """
    out = np.zeros(tuple(reversed(image_size_xyz)), dtype=array.dtype)
    offset = tuple(reversed(offset_xyz))  # (z, y, x)
    src, dst = [], []
    for axis in range(3):
        lo = offset[axis]
        hi = lo + array.shape[axis]
        c_lo, c_hi = max(lo, 0), min(hi, out.shape[axis])
        if c_hi <= c_lo:
            src.append(slice(0, 0))
            dst.append(slice(0, 0))
            continue
        src.append(slice(c_lo - lo, c_hi - lo))
        dst.append(slice(c_lo, c_hi))
    inside = array[tuple(src)]
    if np.count_nonzero(inside) != np.count_nonzero(array):
        raise MedTuningError(
            "LABEL_GRID_MISMATCH", f"the {what} has foreground outside the image's extent",
            "crop the segmentation to the image (in 3D Slicer: set the image as the segmentation's "
            "reference geometry) and export again")
    out[tuple(dst)] = inside
    return out


def physical_bounds(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical bounding box (min, max corners) of a grid, voxel edges included."""
    corners = []
    for ijk in itertools.product(*[(-0.5, s - 0.5) for s in grid.size]):
        corners.append(np.asarray(grid.origin) + grid.index_to_physical @ np.asarray(ijk))
    corners_arr = np.asarray(corners)
    return corners_arr.min(axis=0), corners_arr.max(axis=0)


def extents_overlap(a: Grid, b: Grid) -> bool:
    """Whether two grids' physical boxes overlap (with positive volume)."""
    a_lo, a_hi = physical_bounds(a)
    b_lo, b_hi = physical_bounds(b)
    return bool(np.all(np.minimum(a_hi, b_hi) > np.maximum(a_lo, b_lo)))


def resample_onto(image: sitk.Image, reference: sitk.Image, interpolator: int = sitk.sitkLinear,
                  default: float = 0.0) -> sitk.Image:
    """``image`` resampled onto ``reference``'s grid (identity transform: both are in LPS)."""
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, default, image.GetPixelID())


def check_anisotropy(image: sitk.Image, name: str = "image", limit: float = MAX_ANISOTROPY) -> None:
    """Refuse grids whose coarsest spacing is more than ``limit`` times the finest (EXTREME_ANISOTROPY)."""
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    ratio = float(spacing.max() / max(spacing.min(), 1e-12))
    if ratio > limit:
        raise MedTuningError(
            "EXTREME_ANISOTROPY", f"the {name} has voxel spacing {_show(spacing, 4)} "
            f"(ratio {ratio:.0f}:1, more than {limit:.0f}:1)",
            "resample the volume to a less anisotropic spacing, or check that the spacing in its header is "
            "right", ratio=round(ratio, 2))
