"""Readers for volumes and labels, with the input checks of docs/method.md ("Geometry") and issue 6.

Images: NIfTI, NRRD, MHA/MHD and DICOM folders through SimpleITK, always as 3D scalar float32.
Labels: labelmaps in any SimpleITK format, or 3D Slicer segmentations (.seg.nrrd) through slicerio —
with overlapping segments in layers and extents cropped to a sub-grid of the image, which are
placed back into the image grid. Arrays are in SimpleITK's numpy order [z, y, x] = [D, H, W].
Every refusal is a :class:`MedTuningError` with a stable code and a hint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk

from MedTuningLib.data.geometry import (Grid, check_anisotropy, check_label_grid, extents_overlap,
                                        grid_differences, place_subgrid, resample_onto, same_grid, subgrid_offset)
from MedTuningLib.data.labels import GENERIC_TERMINOLOGY, LabelScheme, normalize_name, terminology_matches
from MedTuningLib.errors import MedTuningError

Log = Callable[[str], Any]


def _hint_formats() -> str:
    return "give a NIfTI (.nii/.nii.gz), NRRD, MHA file or a DICOM series folder"


def _check_exists(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise MedTuningError("FILE_NOT_FOUND", f"the {what} {path} does not exist", "check the path and its spelling",
                             path=str(path))
    return path


def _truncation(path: Path, image: sitk.Image) -> str | None:
    """Why a file that ITK read is incomplete, or None. ITK's NIfTI reader zero-fills a truncated file
    silently, so the gzip stream and the raw data size are checked here."""
    import gzip
    import struct
    import zlib

    name = path.name.lower()
    if name.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as fh:
                while fh.read(1 << 22):
                    pass
        except (EOFError, OSError, zlib.error) as exc:
            return f"its compressed data is incomplete ({exc})"
    elif name.endswith(".nii"):
        with open(path, "rb") as fh:
            header = fh.read(348)
        if len(header) == 348:
            endian = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
            vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            needed = vox_offset + int(np.prod(image.GetSize())) * image.GetNumberOfComponentsPerPixel() * bitpix // 8
            if path.stat().st_size < needed:
                return f"it has {path.stat().st_size} bytes where its header needs {needed}"
    return None


def read_sitk(path: Path, what: str = "image", series: Sequence[str] = ()) -> sitk.Image:
    """Read any SimpleITK image, refusing what is not a 3D scalar volume; keeps the pixel type.
    A DICOM folder must hold one image series, or ``series`` names the SeriesInstanceUID(s) to pick from."""
    return read_sitk_source(path, what, series)[0]


def _sheared(path: Path, what: str) -> MedTuningError:
    return MedTuningError("IMAGE_GRID_SHEARED", f"the {what} {path} has voxel axes that are not perpendicular (a "
                          "sheared grid, e.g. from a gantry tilt); MedTuning would place it wrongly",
                          "resample it onto a perpendicular grid first (3D Slicer: Resample Scalar/Vector/DWI Volume, "
                          "or Harden transform), then save it again", path=str(path))


def _nifti_affines(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The qform and sform (4x4, RAS) of a NIfTI-1 file that sets both, else None. Read from the header's
    bytes: ITK's metadata does not carry qfac (pixdim[0])."""
    import gzip
    import struct

    try:
        with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as fh:
            header = fh.read(348)
    except OSError:
        return None
    if len(header) < 348:
        return None
    endian = next((e for e in "<>" if struct.unpack(e + "i", header[:4])[0] == 348), None)
    if endian is None:  # NIfTI-2 or not NIfTI
        return None
    pixdim = struct.unpack(endian + "8f", header[76:108])
    qform_code, sform_code = struct.unpack(endian + "2h", header[252:256])
    if qform_code <= 0 or sform_code <= 0:
        return None
    b, c, d, *qoffset = struct.unpack(endian + "6f", header[256:280])
    srows = np.array(struct.unpack(endian + "12f", header[280:328]), dtype=float).reshape(3, 4)
    a = float(np.sqrt(max(0.0, 1.0 - b * b - c * c - d * d)))
    rotation = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                         [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                         [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - b * b - c * c]])
    qfac = -1.0 if pixdim[0] < 0 else 1.0
    qform, sform = np.eye(4), np.eye(4)
    qform[:3, :3] = rotation @ np.diag([pixdim[1], pixdim[2], pixdim[3] * qfac])
    qform[:3, 3] = qoffset
    sform[:3, :] = srows
    return qform, sform


def _check_geometry(image: sitk.Image, path: Path, what: str) -> None:
    """Refuse a volume whose place in space is not certain (issue 15): voxel axes that are not
    perpendicular (ITK reads a sheared NRRD without a word), or a NIfTI whose qform and sform disagree
    (readers differ in which one they believe, so a label made elsewhere may sit elsewhere)."""
    if image.GetDimension() != 3:
        return
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise _sheared(path, what)
    affines = _nifti_affines(path) if path.name.lower().endswith((".nii", ".nii.gz")) else None
    if affines is None:
        return
    size = image.GetSize()
    corners = np.array([[i, j, k, 1.0] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)])
    qform, sform = affines
    gap = float(np.max(np.linalg.norm((corners @ qform.T - corners @ sform.T)[:, :3], axis=1)))
    if gap > 0.5 * min(image.GetSpacing()):
        raise MedTuningError("IMAGE_GEOMETRY_AMBIGUOUS", f"the {what} {path} has a qform and an sform that place it "
                             f"up to {gap:.1f} mm apart; programs differ in which one they use",
                             "fix the header so that both agree (or set one of qform_code / sform_code to 0), e.g. "
                             "load it in 3D Slicer, check it lines up, and save it as NRRD", path=str(path))


def read_sitk_source(path: Path, what: str = "image", series: Sequence[str] = (), log: Log | None = None,
                     info: Any = None, regularize: bool = False) -> tuple[sitk.Image, Any]:
    """:func:`read_sitk`, and the :class:`~MedTuningLib.data.dicom.DicomSeries` read (None for files)."""
    path = _check_exists(Path(path), what)
    source = None
    try:
        if path.is_dir():  # one checked series, never a guess between several (MedTuningLib.data.dicom)
            from MedTuningLib.data.dicom import read_series

            image, source = read_series(path, series, log, info=info, regularize=regularize)
        else:
            image = sitk.ReadImage(str(path))
    except MedTuningError:
        raise
    except Exception as exc:  # ITK raises RuntimeError for truncated, corrupt and non-image files
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        if "orthonormal" in first_line:  # ITK's NIfTI reader on a sheared sform / qform
            raise _sheared(path, what) from exc
        raise MedTuningError("FILE_UNREADABLE", f"the {what} {path} cannot be read: it is truncated, corrupt or "
                             f"not an image ({first_line[:200]})", _hint_formats(), path=str(path)) from exc
    if path.is_file():
        _check_geometry(image, path, what)
        reason = _truncation(path, image)
        if reason:
            raise MedTuningError("FILE_UNREADABLE", f"the {what} {path} is truncated: {reason}",
                                 "copy or export the file again (an interrupted download or copy?)", path=str(path))
    size = image.GetSize()
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise MedTuningError("IMAGE_DIMENSION", f"the {what} {path} has {image.GetNumberOfComponentsPerPixel()} "
                             "components per voxel (a vector or colour image), not one",
                             "give a scalar (grey-value) volume; split multi-channel files into one file per "
                             "modality", path=str(path))
    if image.GetDimension() != 3 or min(size) < 2:
        raise MedTuningError("IMAGE_DIMENSION", f"the {what} {path} is {image.GetDimension()}D with size "
                             f"{tuple(size)}, not a 3D volume", "give a 3D volume (one file per volume; split "
                             "4D series into 3D frames, stack 2D slices into a volume)", path=str(path))
    return image, source


def read_image(path: Path, what: str = "image", series: Sequence[str] = ()) -> sitk.Image:
    """A 3D scalar float32 volume from a file or DICOM folder (FILE_NOT_FOUND, FILE_UNREADABLE,
    IMAGE_DIMENSION, NON_FINITE_VOXELS; DICOM_* codes for series that are ambiguous or irregular)."""
    return _as_float_volume(read_sitk(path, what, series), path, what)


def _as_float_volume(image: sitk.Image, path: Path, what: str) -> sitk.Image:
    image = sitk.Cast(image, sitk.sitkFloat32)
    array = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        raise MedTuningError("NON_FINITE_VOXELS", f"the {what} {path} has {bad} NaN or infinite voxels",
                             "repair or re-export the volume (NaN often comes from a failed resampling or division)",
                             path=str(path), count=bad)
    return image


def check_image_content(image: sitk.Image, path: Path | str, what: str = "image") -> None:
    """Checks an image must pass to be trained on or segmented: not constant, not extremely anisotropic."""
    array = sitk.GetArrayViewFromImage(image)
    if float(array.min()) == float(array.max()):
        raise MedTuningError("CONSTANT_IMAGE", f"the {what} {path} has the value {float(array.min())} everywhere",
                             "check that the right file was chosen (an empty or blank export?)", path=str(path))
    check_anisotropy(image, f"{what} {path}")


@dataclass
class CaseImages:
    """The images of one case as read: stacked channels, the reference grid, and per image the DICOM
    series it came from (None for files)."""

    array: np.ndarray  # float32 [C, D, H, W]
    reference: sitk.Image
    dicom: list[Any] = field(default_factory=list)  # MedTuningLib.data.dicom.DicomSeries | None per image

    def provenance(self) -> list[dict[str, Any]]:
        """What was read, per image: the DICOM series (UIDs, modality, description, slices) or the file."""
        return [d.provenance() if d is not None else {"format": "file"} for d in self.dicom]


def read_case_images(paths: Sequence[Path], log: Log | None = None, series: Sequence[str] = ()
                     ) -> tuple[np.ndarray, sitk.Image]:
    """Modalities stacked channels-first, float32 [C, D, H, W], and the first modality's image
    (see :func:`read_case_inputs`)."""
    case = read_case_inputs(paths, log=log, series=series)
    return case.array, case.reference


def read_case_inputs(paths: Sequence[Path], log: Log | None = None, series: Sequence[str] = (),
                     regularize: bool = False) -> CaseImages:
    """Modalities stacked channels-first, float32 [C, D, H, W], and the first modality's image.

    A path may be a DICOM folder; ``series`` (``--series``) picks among several series
    (:func:`MedTuningLib.data.dicom.pick_series`); ``regularize`` resamples irregular series
    (``--dicom-resample``) instead of refusing them.

    All modalities end up on the first one's grid: identical grids are stacked as they are, others
    are resampled (linear) onto it when their physical extents overlap — with a note to ``log`` —
    and refused with MODALITY_GRID_MISMATCH otherwise.
    """
    if not paths:
        raise MedTuningError("MODALITY_COUNT_MISMATCH", "no image was given", "give one image per modality")
    picked: list[Any] = [None] * len(paths)
    if any(Path(p).is_dir() for p in paths) or series:
        from MedTuningLib.data.dicom import pick_series

        picked = pick_series([Path(p) for p in paths], series, log)
    reference: sitk.Image | None = None
    channels = []
    sources = []
    for index, path in enumerate(paths):
        what = f"image {index + 1}"
        image, source = read_sitk_source(Path(path), what, log=log, info=picked[index], regularize=regularize)
        image = _as_float_volume(image, path, what)
        sources.append(source)
        check_image_content(image, path, f"image {index + 1}")
        if reference is None:
            reference = image
        else:
            ref_grid, grid = Grid.of(reference), Grid.of(image)
            if not same_grid(ref_grid, grid):
                if not extents_overlap(ref_grid, grid):
                    raise MedTuningError(
                        "MODALITY_GRID_MISMATCH", f"image {index + 1} ({Path(path).name}) does not overlap image 1 "
                        f"({Path(paths[0]).name}) in space: " + "; ".join(grid_differences(ref_grid, grid)),
                        "give modalities of the same scan and study (co-registered), in the same patient space",
                        path=str(path))
                if log is not None:
                    log(f"image {index + 1} ({Path(path).name}) is on another grid than image 1 ("
                        + "; ".join(grid_differences(ref_grid, grid)) + "): resampled onto image 1's grid")
                image = resample_onto(image, reference)
        channels.append(sitk.GetArrayFromImage(image))
    assert reference is not None
    return CaseImages(np.stack(channels).astype(np.float32, copy=False), reference, sources)


# -- labels -------------------------------------------------------------------------------------

def is_segmentation_file(path: Path) -> bool:
    """A 3D Slicer segmentation: .seg.nrrd, or a NRRD whose header describes segments."""
    name = Path(path).name.lower()
    if name.endswith(".seg.nrrd"):
        return True
    if name.endswith(".nrrd") and Path(path).is_file():
        try:
            import nrrd

            return any(key.startswith("Segment0_") for key in nrrd.read_header(str(path)))
        except Exception:
            return False
    return False


def read_segmentation_header(path: Path) -> dict[str, Any]:
    """slicerio's description of a .seg.nrrd without its voxels (segment names, colours, terminology)."""
    return _read_segmentation(Path(path), skip_voxels=True)


def _read_segmentation(path: Path, skip_voxels: bool = False) -> dict[str, Any]:
    import slicerio

    path = _check_exists(path, "segmentation")
    try:
        seg = slicerio.read_segmentation(str(path), skip_voxels=skip_voxels)
    except Exception as exc:
        raise MedTuningError("FILE_UNREADABLE", f"the segmentation {path} cannot be read: it is truncated, corrupt "
                             f"or not a .seg.nrrd ({str(exc)[:200]})",
                             "save the segmentation again from 3D Slicer (File > Save, .seg.nrrd)",
                             path=str(path)) from exc
    seg.setdefault("segments", [])
    _check_segment_names(path, seg["segments"])
    return seg


def _check_segment_names(path: Path, segments: list[dict[str, Any]]) -> None:
    """Segment names go into every file MedTuning writes from this label: refuse names that would
    break them (control characters) and two segments of one name, naming the file (issue 15)."""
    from MedTuningLib.data.labels import normalize_name, text_problem

    seen: dict[str, str] = {}
    for segment in segments:
        name = segment.get("name", segment.get("id", ""))
        problem = text_problem(name, "segment name", "\\")
        if problem:
            raise MedTuningError("LABEL_SPEC_INVALID", f"{path}: {problem}",
                                 "rename the segment in 3D Slicer (Segment Editor: double-click the name) and save "
                                 "again", path=str(path))
        key = normalize_name(str(name))
        if key in seen:
            raise MedTuningError("LABEL_SPEC_INVALID", f"{path} has two segments named {seen[key]!r} and {name!r}",
                                 "give every segment its own name in 3D Slicer, or merge the two, and save again",
                                 path=str(path))
        seen[key] = str(name)


@dataclass
class SegmentMask:
    """One segment of a .seg.nrrd on the image grid."""

    name: str
    mask: np.ndarray  # bool [D, H, W]
    label_value: int
    terminology: dict[str, Any] = field(default_factory=dict)
    color: tuple[float, ...] = ()


def read_segments(path: Path, reference: sitk.Image) -> list[SegmentMask]:
    """The segments of a .seg.nrrd, each as a mask on ``reference``'s grid.

    Layers (overlapping segments) are read per segment; a segmentation cropped to its segments'
    extent (a sub-grid: same spacing and direction, integer offset) is placed into the image grid;
    any other grid is LABEL_GRID_MISMATCH.
    """
    import slicerio

    seg = _read_segmentation(Path(path))
    voxels = seg["voxels"]
    if voxels is None or voxels.ndim not in (3, 4):
        raise MedTuningError("FILE_UNREADABLE", f"the segmentation {path} has no 3D voxel data",
                             "save the segmentation again from 3D Slicer", path=str(path))
    ref_grid = Grid.of(reference)
    seg_grid = Grid.from_ijk_to_lps(seg["ijkToLPS"], voxels.shape[-3:])
    if same_grid(ref_grid, seg_grid):
        offset = None
    else:
        offset = subgrid_offset(ref_grid, seg_grid)
        if offset is None:
            check_label_grid(ref_grid, seg_grid, f"segmentation {Path(path).name}")  # raises, saying what differs
    out = []
    for segment in seg["segments"]:
        ijk = slicerio.segment_mask(seg, segment)
        mask = np.ascontiguousarray(ijk.transpose(2, 1, 0))  # slicerio gives (i, j, k); SimpleITK arrays are (k, j, i)
        if offset is not None:
            mask = place_subgrid(mask, offset, ref_grid.size, f"segmentation {Path(path).name}")
        out.append(SegmentMask(name=str(segment.get("name", segment.get("id", ""))), mask=mask,
                               label_value=int(segment.get("labelValue", 1)),
                               terminology=dict(segment.get("terminology") or {}),
                               color=tuple(segment.get("color", ()))))
    return out


def _match(segments: list[SegmentMask], name: str, terminology: dict[str, Any] | None) -> list[SegmentMask]:
    """Segments that are ``name``: by name first, else by terminology (category, type, modifier)."""
    key = normalize_name(name)
    by_name = [s for s in segments if normalize_name(s.name) == key]
    if by_name:
        return by_name
    # The generic "Tissue" entry (Slicer's default for any new segment) identifies nothing.
    if not terminology or terminology_matches(terminology, GENERIC_TERMINOLOGY):
        return []
    return [s for s in segments if terminology_matches(s.terminology, terminology)]


def _classes_from_segments(segments: list[SegmentMask], scheme: LabelScheme, path: Path,
                           log: Log | None) -> np.ndarray:
    shape = segments[0].mask.shape if segments else None
    dtype = np.uint8 if scheme.num_classes < 256 else np.int16
    # 1. Segments named (or coded) as the scheme's written segments: regions for BraTS-like schemes
    #    (ET / TC / WT written by MedTuning and corrected in Slicer), else classes (custom schemes too).
    region_hits: dict[str, np.ndarray] = {}
    if scheme.write == "regions":
        for region in scheme.regions:
            seg_def = scheme.segment(region.name)
            hits = _match(segments, region.name, seg_def.terminology if seg_def else None)
            if hits:
                region_hits[region.name] = np.logical_or.reduce([h.mask for h in hits])
    # 2. Segments named as the scheme's classes.
    class_hits: dict[int, list[SegmentMask]] = {}
    if not region_hits:
        for index, cls in enumerate(scheme.classes, start=1):
            seg_def = scheme.segment(cls.name) if scheme.write == "classes" else None
            hits = _match(segments, cls.name, seg_def.terminology if seg_def else None)
            if hits:
                class_hits[index] = hits
    if class_hits:
        missing = [c.name for i, c in enumerate(scheme.classes, start=1) if i not in class_hits]
        if missing and scheme.by_segment_name:
            raise MedTuningError(
                "SEGMENT_NAMES_MISMATCH", f"{path} has no segment named {', '.join(map(repr, missing))} "
                f"(it has {', '.join(repr(s.name) for s in segments)})",
                "name the segments as in the other cases (Segment Editor: double-click a name to rename)",
                path=str(path), missing=missing)
        used = {id(s) for hits in class_hits.values() for s in hits}
        ignored = [s.name for s in segments if id(s) not in used]
        if ignored and log is not None:
            log(f"{Path(path).name}: segments {ignored} are not in the label scheme and are treated as background")
        out = np.zeros(shape, dtype=dtype)
        overlap = np.zeros(shape, dtype=bool)
        for index in sorted(class_hits):  # classes are disjoint: where segments overlap, the later class wins
            mask = np.logical_or.reduce([h.mask for h in class_hits[index]])
            overlap |= mask & (out != 0)
            out[mask] = index
        if overlap.any() and log is not None:
            log(f"{Path(path).name}: {int(overlap.sum())} voxels belong to several segments; the later class "
                "in the scheme is used there")
        return out
    if region_hits:
        return scheme.decode_regions(region_hits)
    if scheme.by_segment_name:
        raise MedTuningError(
            "SEGMENT_NAMES_MISMATCH", f"{path} has none of the segments {scheme.class_names} "
            f"(it has {', '.join(repr(s.name) for s in segments) or 'no segments'})",
            "name the segments as in the other cases (Segment Editor: double-click a name to rename)",
            path=str(path))
    # 3. Unnamed segments (e.g. a labelmap imported into Slicer): their label values are the source values.
    source = np.zeros(shape, dtype=np.int32)
    for s in segments:
        source[s.mask] = s.label_value
    return scheme.encode(source, f"segmentation {Path(path).name}")


def read_label(path: Path, reference: sitk.Image, scheme: LabelScheme, allow_empty: bool = False,
               log: Log | None = None) -> np.ndarray:
    """Class indices [D, H, W] (uint8; 0 = background) on ``reference``'s grid.

    Accepts labelmaps (any SimpleITK format; their grid must equal the image's) and .seg.nrrd
    (layers, cropped extents; segments matched to classes by name / terminology, else by label
    value). LABEL_GRID_MISMATCH, UNKNOWN_LABEL_VALUES, EMPTY_LABEL (unless ``allow_empty``).
    """
    path = _check_exists(Path(path), "label")
    if is_segmentation_file(path):
        segments = read_segments(path, reference)
        if not segments:
            out = np.zeros(tuple(reversed(reference.GetSize())), dtype=np.uint8)
        else:
            out = _classes_from_segments(segments, scheme, path, log)
    else:
        label = read_sitk(path, "label")
        check_label_grid(Grid.of(reference), Grid.of(label), f"label {path.name}")
        array = sitk.GetArrayViewFromImage(label)
        out = scheme.encode(array, f"label {path.name}")
        if not allow_empty and not out.any():
            found = [int(v) for v in np.unique(array) if v != 0]
            mapping = "; ".join(f"{c.name}={','.join(map(str, c.source_values))}" for c in scheme.classes)
            raise MedTuningError("EMPTY_LABEL", f"the label {path} has no voxels of the classes ({mapping}); the "
                                 f"values it holds are {found[:20] or 'only 0 (background)'}",
                                 "map the values it holds (e.g. --labels \"Name=" + (str(found[0]) if found else "1")
                                 + "\"), or draw the structures; an empty label teaches the model nothing",
                                 path=str(path), values=found[:20])
    if not allow_empty and not out.any():
        raise MedTuningError("EMPTY_LABEL", f"the label {path} has no foreground voxels of the classes "
                             f"{scheme.class_names}", "draw the structures (or remove this case from the library); "
                             "an empty label teaches the model nothing", path=str(path))
    return out


@dataclass
class LabelInfo:
    """What a label file holds, checked against an image grid but not against a scheme."""

    kind: str  # "labelmap" or "segmentation"
    values: list[int] = field(default_factory=list)  # labelmap values, or segment label values
    segment_names: list[str] = field(default_factory=list)
    empty_segments: list[str] = field(default_factory=list)


def inspect_label(path: Path, reference: sitk.Image) -> LabelInfo:
    """Check a label against an image grid without a scheme (for ``cases add``): readable, same grid
    (or a placeable sub-grid), integer values, some foreground (EMPTY_LABEL)."""
    path = _check_exists(Path(path), "label")
    if is_segmentation_file(path):
        segments = read_segments(path, reference)
        info = LabelInfo("segmentation", sorted({s.label_value for s in segments}), [s.name for s in segments],
                         [s.name for s in segments if not s.mask.any()])
        foreground = any(s.mask.any() for s in segments)
    else:
        label = read_sitk(path, "label")
        check_label_grid(Grid.of(reference), Grid.of(label), f"label {path.name}")
        array = sitk.GetArrayViewFromImage(label)
        values = np.unique(array)
        if values.dtype.kind == "f" and (not np.all(np.isfinite(values)) or np.any(values != np.round(values))):
            raise MedTuningError("UNKNOWN_LABEL_VALUES", f"the label {path} holds non-integer values: is it an image "
                                 "rather than a label?", "give a labelmap with integer label values", path=str(path))
        info = LabelInfo("labelmap", [int(v) for v in values if v != 0])
        if any(v < 0 for v in info.values):
            raise MedTuningError("UNKNOWN_LABEL_VALUES", f"the label {path} holds negative values "
                                 f"{[v for v in info.values if v < 0][:10]}: label values are 0 (background) or "
                                 "positive", "fix the labelmap (is it an image rather than a label?)", path=str(path))
        foreground = bool(info.values)
    if not foreground:
        raise MedTuningError("EMPTY_LABEL", f"the label {path} has no foreground voxels",
                             "draw the structures first; an empty label teaches the model nothing", path=str(path))
    return info
