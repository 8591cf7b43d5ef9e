"""DICOM series input that does not guess.

Hospital data arrive as folders of DICOM files, often holding several series of one study (a scout,
the thin and the thick reconstruction, contrast phases). SimpleITK's series reader would take one of
them silently and stacks whatever slices it is given; here the folder is scanned with pydicom first:

- the image series are listed (SeriesInstanceUID, modality, description, slice count); a folder with
  several is refused with DICOM_MULTIPLE_SERIES listing them, unless ``--series UID`` picks one;
  non-image objects (SEG, RTSTRUCT, SR, presentation states) are ignored, with a note;
- the chosen series' slices are checked against each other: one orientation (DICOM_MIXED_ORIENTATION),
  one matrix size and pixel spacing, one image per position (DICOM_SERIES_INCONSISTENT), slice
  positions along the slice normal (DICOM_GANTRY_TILT otherwise), evenly spaced
  (DICOM_MISSING_SLICES where a step is a multiple of the usual one, DICOM_UNEVEN_SPACING otherwise);
- SimpleITK then reads the slices in the checked order (it decodes compressed transfer syntaxes and
  applies the rescale slope / intercept) and the volume's geometry is set from the checked positions.

Refused rather than resampled: a resampled tilted or irregular series no longer lines up voxel for
voxel with its source instances, so a DICOM SEG written for it could not reference them; 3D Slicer's
DICOM module can regularise such a series (and export it as NRRD) when that is what the user wants.
What was read (:meth:`DicomSeries.provenance`) goes into the result's and the case's provenance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from MedTuningLib.errors import MedTuningError

Log = Callable[[str], Any]

# Modalities of DICOM objects that are not image slices of a volume.
NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "DOC", "PLAN"}
ORIENTATION_TOLERANCE = 1e-3  # direction cosines
TILT_TOLERANCE_DEG = 0.05  # angle between the slice stacking direction and the slice normal
# Two slice steps are "the same" within this much (mm, and relative to the usual step): DS values are
# rounded decimal strings, so positions carry small rounding errors.
SPACING_ABS_TOLERANCE = 0.01
SPACING_REL_TOLERANCE = 0.01


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file (128-byte preamble, then 'DICM')."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_folder(path: Path) -> bool:
    """A folder holding at least one DICOM file (in it or below)."""
    path = Path(path)
    return path.is_dir() and any(p.is_file() and is_dicom_file(p) for p in path.rglob("*"))


@dataclass
class SeriesInfo:
    """One series found in a folder: its UID, what it is, and its files (unsorted)."""

    uid: str
    modality: str = ""
    description: str = ""
    number: int | None = None
    study_uid: str = ""
    files: list[Path] = field(default_factory=list)
    headers: list[Any] = field(default_factory=list, repr=False)  # pydicom Datasets without pixel data
    is_image: bool = True

    @property
    def slices(self) -> int:
        return len(self.files)

    def summary(self) -> dict[str, Any]:
        return {"series_instance_uid": self.uid, "modality": self.modality, "description": self.description,
                "series_number": self.number, "slices": self.slices}

    def line(self) -> str:
        number = f"#{self.number} " if self.number is not None else ""
        return f"{self.uid} ({number}{self.modality or '?'} '{self.description}', {self.slices} slice(s))"


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value).strip() if value is not None else ""


def _is_image(ds: Any) -> bool:
    if _text(ds, "Modality").upper() in NON_IMAGE_MODALITIES:
        return False
    return "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds and "Rows" in ds


def scan_folder(folder: Path) -> list[SeriesInfo]:
    """Every series in ``folder`` (and below), image series first, in series-number order.

    FILE_UNREADABLE when the folder holds no DICOM file at all.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    by_uid: dict[str, SeriesInfo] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if not is_dicom_file(path):
            continue
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        uid = _text(ds, "SeriesInstanceUID")
        if not uid:  # DICOMDIR and other files that are not instances of a series
            continue
        info = by_uid.get(uid)
        if info is None:
            number = ds.get("SeriesNumber", None)
            try:
                number = int(number) if number not in (None, "") else None
            except (TypeError, ValueError):
                number = None
            info = by_uid[uid] = SeriesInfo(uid=uid, modality=_text(ds, "Modality"),
                                            description=_text(ds, "SeriesDescription"), number=number,
                                            study_uid=_text(ds, "StudyInstanceUID"), is_image=_is_image(ds))
        info.files.append(path)
        info.headers.append(ds)
        info.is_image = info.is_image and _is_image(ds)
    if not by_uid:
        raise MedTuningError("FILE_UNREADABLE", f"the folder {folder} holds no DICOM files",
                             "give a folder of DICOM files (one series), or a NIfTI / NRRD / MHA file",
                             path=str(folder))
    return sorted(by_uid.values(), key=lambda s: (not s.is_image, s.number if s.number is not None else 1 << 30, s.uid))


def _series_list(series: Sequence[SeriesInfo]) -> str:
    return "; ".join(s.line() for s in series)


def select_series(folder: Path, series: Sequence[SeriesInfo], wanted: Sequence[str] = (),
                  log: Log | None = None) -> SeriesInfo:
    """The one image series of ``folder`` to read.

    ``wanted`` are the acceptable SeriesInstanceUIDs (from ``--series``). One image series and no
    wish: that one. Several: the one wanted, else DICOM_MULTIPLE_SERIES with the list.
    """
    images = [s for s in series if s.is_image]
    others = [s for s in series if not s.is_image]
    listing = [s.summary() for s in images]
    if not images:
        raise MedTuningError("FILE_UNREADABLE", f"the folder {folder} holds no DICOM image series (only "
                             f"{_series_list(others)})", "give the folder of the scan itself (CT, MR, PT slices)",
                             path=str(folder), series=[s.summary() for s in others])
    if others and log is not None:
        log(f"{folder}: ignored {len(others)} non-image DICOM series ({_series_list(others)})")
    picked = [s for s in images if s.uid in set(wanted)]
    if len(picked) == 1:
        return picked[0]
    if len(picked) > 1:
        raise MedTuningError("DICOM_MULTIPLE_SERIES", f"the folder {folder} holds {len(picked)} of the series named "
                             f"by --series: {_series_list(picked)}",
                             "give one --series per --image, in the same order as the --image options",
                             path=str(folder), series=listing)
    if len(images) == 1:
        return images[0]
    raise MedTuningError("DICOM_MULTIPLE_SERIES", f"the folder {folder} holds {len(images)} image series: "
                         f"{_series_list(images)}",
                         "choose one with --series SERIES_INSTANCE_UID (the first value of each entry above)",
                         path=str(folder), series=listing)


@dataclass
class DicomSeries:
    """A checked series: its headers sorted along the slice normal, and the volume geometry they give."""

    folder: Path
    info: SeriesInfo
    headers: list[Any]  # sorted: index k is the volume's slice k
    files: list[Path]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]  # x, y, z as SimpleITK orders them
    direction: tuple[float, ...]  # 3x3 row-major, columns = row cosine, column cosine, slice normal
    regularized: str = ""  # why the slices were resampled onto a regular grid ("" when they were not)

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.headers]

    def provenance(self) -> dict[str, Any]:
        """What was read, for the result's and the case's records (no patient names or ids)."""
        first = self.headers[0]
        return {"format": "dicom", "folder": str(self.folder), **self.info.summary(),
                "study_instance_uid": self.info.study_uid,
                "frame_of_reference_uid": _text(first, "FrameOfReferenceUID"),
                "sop_class_uid": _text(first, "SOPClassUID"),
                "spacing": [round(v, 6) for v in self.spacing],
                "size": [int(first.Columns), int(first.Rows), len(self.headers)],
                "first_sop_instance_uid": self.sop_instance_uids[0],
                "last_sop_instance_uid": self.sop_instance_uids[-1],
                **({"resampled": self.regularized} if self.regularized else {})}


def _floats(ds: Any, keyword: str, count: int) -> np.ndarray | None:
    value = ds.get(keyword, None)
    try:
        array = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return array if array.size == count and np.all(np.isfinite(array)) else None


def check_series(folder: Path, info: SeriesInfo, regularize: bool = False) -> DicomSeries:
    """Sort and check the slices of one series (see the module docstring); the codes say what is wrong.

    ``regularize`` (``--dicom-resample``): a gantry tilt, uneven spacing or missing slices are not
    refused but recorded in :attr:`DicomSeries.regularized`, and :func:`read_series` resamples the
    slices onto a regular grid (a mixed, inconsistent or duplicated series is still refused)."""
    where = f"series {info.uid} in {folder}"
    hint_export = ("re-export the complete series from the PACS or scanner; 3D Slicer's DICOM module can load it "
                   "(regularising its geometry) and save it as NRRD, which MedTuning reads as it is")
    hint_resample = ("or pass --dicom-resample to resample it onto a regular grid (logged; the result is then a "
                     ".seg.nrrd on that grid, not a DICOM SEG of the source slices)")
    frames = {int(ds.get("NumberOfFrames", 1) or 1) for ds in info.headers}
    if max(frames) > 1:
        raise MedTuningError("DICOM_SERIES_UNSUPPORTED", f"the {where} is stored as multi-frame images "
                             "(enhanced DICOM); MedTuning reads series of single-frame slices",
                             "convert it with 3D Slicer (DICOM module, save as NRRD) or dcm2niix", path=str(folder))
    if info.slices < 2:
        raise MedTuningError("IMAGE_DIMENSION", f"the {where} has a single slice, not a volume",
                             "give a series of several slices (a 3D scan)", path=str(folder))
    orientations, positions = [], []
    for path, ds in zip(info.files, info.headers):
        iop, ipp = _floats(ds, "ImageOrientationPatient", 6), _floats(ds, "ImagePositionPatient", 3)
        if iop is None or ipp is None:
            raise MedTuningError("DICOM_SERIES_INCONSISTENT", f"the {where}: {path.name} has no valid image position "
                                 "or orientation", hint_export, path=str(path))
        orientations.append(iop)
        positions.append(ipp)
    iop0 = orientations[0]
    differing = [i for i, o in enumerate(orientations) if np.abs(o - iop0).max() > ORIENTATION_TOLERANCE]
    if differing:
        raise MedTuningError("DICOM_MIXED_ORIENTATION", f"the {where} mixes slice orientations: "
                             f"{len(differing)} of {info.slices} slices (e.g. {info.files[differing[0]].name}) are "
                             f"oriented {np.round(orientations[differing[0]], 4).tolist()}, the others "
                             f"{np.round(iop0, 4).tolist()} (a localizer or several stacks in one series?)",
                             hint_export, path=str(folder))
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in info.headers}
    pixel = {tuple(np.round(_floats(ds, "PixelSpacing", 2) if _floats(ds, "PixelSpacing", 2) is not None
                            else (np.nan, np.nan), 6)) for ds in info.headers}
    if len(shapes) > 1 or len(pixel) > 1:
        raise MedTuningError("DICOM_SERIES_INCONSISTENT", f"the {where} has slices of different sizes or pixel "
                             f"spacings ({sorted(shapes)}, {sorted(pixel)})", hint_export, path=str(folder))
    row, col = iop0[:3] / np.linalg.norm(iop0[:3]), iop0[3:] / np.linalg.norm(iop0[3:])
    normal = np.cross(row, col)
    along = np.array([p @ normal for p in positions])
    order = np.argsort(along, kind="stable")
    along, positions = along[order], [positions[i] for i in order]
    steps = np.diff(along)
    step = float(np.median(steps))
    tolerance = max(SPACING_ABS_TOLERANCE, SPACING_REL_TOLERANCE * abs(step))
    if step <= tolerance or np.any(steps <= tolerance):
        dup = int(np.count_nonzero(steps <= tolerance))
        raise MedTuningError("DICOM_SERIES_INCONSISTENT", f"the {where} has {dup} slice(s) at the position of "
                             "another one (several acquisitions, echoes or time points in one series?)",
                             "give a series with one image per position; split it by acquisition or echo in "
                             "3D Slicer's DICOM module or the PACS", path=str(folder))
    # Gantry tilt: the slices are stacked along another direction than their normal.
    stack = positions[-1] - positions[0]
    cos_angle = abs(float(stack @ normal)) / float(np.linalg.norm(stack))
    tilt = math.degrees(math.acos(min(1.0, cos_angle)))
    problems: list[str] = []
    if tilt > TILT_TOLERANCE_DEG and regularize:
        problems.append(f"gantry tilt of {tilt:.2f} degrees")
    elif tilt > TILT_TOLERANCE_DEG:
        raise MedTuningError("DICOM_GANTRY_TILT", f"the {where} was acquired with a gantry tilt of {tilt:.2f} "
                             "degrees (its slices are sheared, not stacked along their normal)",
                             "reconstruct the scan without tilt, load it in 3D Slicer's DICOM module with "
                             "'Acquisition geometry regularization' and save it as NRRD, " + hint_resample,
                             path=str(folder),
                             tilt_degrees=round(tilt, 3))
    off = np.abs(steps - step) > tolerance
    if off.any() and regularize:
        problems.append(f"slice steps from {float(steps.min()):.4g} to {float(steps.max()):.4g} mm")
    elif off.any():
        multiples = steps[off] / step
        if np.all(np.abs(multiples - np.round(multiples)) * step <= tolerance) and np.all(np.round(multiples) >= 2):
            missing = int(np.sum(np.round(multiples) - 1))
            gaps = [round(float(along[i]), 3) for i in np.nonzero(off)[0]]
            raise MedTuningError("DICOM_MISSING_SLICES", f"the {where} is missing {missing} slice(s): the slices are "
                                 f"{step:.4g} mm apart except after the position(s) {gaps[:5]} mm along the normal",
                                 "re-send or re-export the complete series (an interrupted transfer?), "
                                 + hint_resample + " (the gap is interpolated)",
                                 path=str(folder), missing=missing)
        raise MedTuningError("DICOM_UNEVEN_SPACING", f"the {where} has uneven slice spacing: steps from "
                             f"{float(steps.min()):.4g} to {float(steps.max()):.4g} mm (usually {step:.4g} mm)",
                             hint_export + "; " + hint_resample, path=str(folder), min_spacing=float(steps.min()),
                             max_spacing=float(steps.max()))
    headers = [info.headers[i] for i in order]
    files = [info.files[i] for i in order]
    pixel_spacing = _floats(headers[0], "PixelSpacing", 2)
    if pixel_spacing is None:
        raise MedTuningError("DICOM_SERIES_INCONSISTENT", f"the {where} has no valid PixelSpacing", hint_export,
                             path=str(folder))
    # Mean step from first to last: the most exact spacing the rounded positions give (a regularised
    # series keeps its usual step instead).
    z = float((along[-1] - along[0]) / (len(along) - 1)) if not problems else step
    direction = tuple(float(v) for v in np.column_stack([row, col, normal]).ravel())
    return DicomSeries(folder=Path(folder), info=info, headers=headers, files=files,
                       origin=tuple(float(v) for v in positions[0]),  # type: ignore[arg-type]
                       spacing=(float(pixel_spacing[1]), float(pixel_spacing[0]), z), direction=direction,
                       regularized="; ".join(problems))


def _regular_volume(series: DicomSeries):
    """The slices of an irregular series resampled onto a regular grid: the first slice's plane, the usual
    step along the normal. Each output slice interpolates linearly between the two input slices around it
    along the normal, each shifted in its plane by its own offset (which undoes a gantry tilt's shear)."""
    import SimpleITK as sitk
    from scipy import ndimage

    direction = np.asarray(series.direction, dtype=float).reshape(3, 3)
    row, col, normal = direction[:, 0], direction[:, 1], direction[:, 2]
    dx, dy, step = series.spacing
    origin = np.asarray(series.origin, dtype=float)
    positions = [np.array([float(v) for v in ds.ImagePositionPatient]) for ds in series.headers]
    along = np.array([(p - origin) @ normal for p in positions])
    slices = [sitk.GetArrayFromImage(sitk.ReadImage(str(f)))[0].astype(np.float32) for f in series.files]
    count = int(math.floor(along[-1] / step + 1e-6)) + 1
    out = np.empty((count, *slices[0].shape), dtype=np.float32)
    shifted: dict[int, np.ndarray] = {}

    def in_plane(k: int) -> np.ndarray:  # slice k moved onto the first slice's in-plane grid
        if k not in shifted:
            offset = origin - positions[k]
            # Beyond the slice's edge: its edge values ("nearest"), so that positions rounded in the header
            # (a shift of 4.999999 pixels) do not turn a border row into padding.
            shifted[k] = ndimage.shift(slices[k], (-(offset @ col) / dy, -(offset @ row) / dx), order=1,
                                       mode="nearest")
        return shifted[k]

    for t in range(count):
        z = t * step
        k = int(np.clip(np.searchsorted(along, z, side="right") - 1, 0, len(along) - 2))
        w = float(np.clip((z - along[k]) / (along[k + 1] - along[k]), 0.0, 1.0))
        out[t] = (1.0 - w) * in_plane(k) + w * in_plane(k + 1)
    image = sitk.GetImageFromArray(out)
    return image


def read_series(folder: Path, wanted: Sequence[str] = (), log: Log | None = None,
                info: SeriesInfo | None = None, regularize: bool = False):
    """Read one checked series as a SimpleITK image; returns ``(image, DicomSeries)``. With ``regularize``
    an irregular series (tilt, uneven spacing, missing slices) is resampled, with a note to ``log``."""
    import SimpleITK as sitk

    folder = Path(folder)
    if info is None:
        info = select_series(folder, scan_folder(folder), wanted, log)
    series = check_series(folder, info, regularize)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in series.files])
    try:
        if series.regularized:
            image = _regular_volume(series)
            if log is not None:
                log(f"series {info.uid} in {folder} has {series.regularized}: resampled (linear) onto a regular "
                    f"grid of {image.GetSize()[2]} slices {series.spacing[2]:.4g} mm apart (--dicom-resample)")
        else:
            image = reader.Execute()
    except RuntimeError as exc:
        raise MedTuningError("FILE_UNREADABLE", f"the series {info.uid} in {folder} cannot be decoded "
                             f"({str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else 'ITK error'})",
                             "re-export it uncompressed, or convert it with 3D Slicer", path=str(folder)) from exc
    # The checked geometry, not what the reader inferred from its first slices.
    image.SetOrigin(series.origin)
    image.SetSpacing(series.spacing)
    image.SetDirection(series.direction)
    if log is not None:
        log(f"read DICOM series {info.uid} ({info.modality} '{info.description}', {info.slices} slices, "
            f"{series.spacing[0]:.4g} x {series.spacing[1]:.4g} x {series.spacing[2]:.4g} mm) from {folder}")
    return image, series


def pick_series(paths: Sequence[Path], series: Sequence[str] = (), log: Log | None = None
                ) -> list[SeriesInfo | None]:
    """The series each input stands for (None for files that are not DICOM folders).

    ``series`` (from ``--series``, repeatable) either has one UID per input, in input order, or is a set
    of UIDs each folder picks from; every UID given must be used (DICOM_SERIES_NOT_FOUND otherwise).
    """
    series = [s.strip() for s in series if s and s.strip()]
    paired = bool(series) and len(series) == len(paths)
    picked: list[SeriesInfo | None] = []
    found: list[SeriesInfo] = []
    scan_cache: dict[Path, list[SeriesInfo]] = {}
    for index, path in enumerate(paths):
        path = Path(path)
        if not path.is_dir():
            picked.append(None)
            continue
        key = path.resolve()
        if key not in scan_cache:  # two modalities from one folder: scanned once
            scan_cache[key] = scan_folder(path)
            found.extend(s for s in scan_cache[key] if s.is_image)
        infos = scan_cache[key]
        wanted = [series[index]] if paired else series
        if paired and not any(s.uid == series[index] for s in infos):
            raise MedTuningError("DICOM_SERIES_NOT_FOUND", f"the folder {path} has no series {series[index]} "
                                 f"(--series number {index + 1}); it holds {_series_list([s for s in infos if s.is_image])}",
                                 "copy the SeriesInstanceUID from this list", path=str(path),
                                 series=[s.summary() for s in infos if s.is_image])
        picked.append(select_series(path, infos, wanted, log))
    if not paired:  # one folder of several series standing for several images: which is which is not said
        multi = [Path(p).resolve() for p, info in zip(paths, picked) if info is not None
                 and sum(1 for s in scan_cache.get(Path(p).resolve(), []) if s.is_image) > 1]
        repeated = sorted({str(f) for f in multi if multi.count(f) > 1})
        if repeated:
            raise MedTuningError("DICOM_MULTIPLE_SERIES", f"the folder {repeated[0]} holds several series and is "
                                 "given for several images, but not which series is which image",
                                 "give one --series per --image, in the same order as the --image options",
                                 path=repeated[0])
    used = {p.uid for p in picked if p is not None}
    unused = [s for s in series if s not in used]
    if unused:
        raise MedTuningError("DICOM_SERIES_NOT_FOUND", f"--series {', '.join(unused)} is not among the series read "
                             f"({_series_list(found) or 'no DICOM folder was given'})",
                             "copy the SeriesInstanceUID from this list, or drop --series for image files",
                             series=[s.summary() for s in found])
    return picked


def series_table(folder: Path) -> list[dict[str, Any]]:
    """The series of a folder as rows (for listings and the Slicer module)."""
    return [{**s.summary(), "image": s.is_image} for s in scan_folder(folder)]



def series_to_files(paths: Sequence[Path], series: Sequence[str], folder: Path, log: Log | None = None,
                    regularize: bool = False) -> tuple[list[Path], list[DicomSeries | None]]:
    """DICOM folders among ``paths`` read (checked) and written as NRRD files into ``folder``; other paths
    stay as they are. Returns the paths to use and, per input, the series read (or None).
    Used by ``cases add``, which stores volumes, not DICOM folders."""
    import SimpleITK as sitk

    picked = pick_series([Path(p) for p in paths], series, log)
    out: list[Path] = []
    provenance: list[DicomSeries | None] = []
    for path, info in zip(paths, picked):
        if info is None:
            out.append(Path(path))
            provenance.append(None)
            continue
        image, read = read_series(Path(path), (), log, info=info, regularize=regularize)
        name, n = Path(path).name or "dicom", 1
        target = Path(folder) / f"{name}.nrrd"
        while target.exists():
            n += 1
            target = Path(folder) / f"{name}-{n}.nrrd"
        sitk.WriteImage(image, str(target), useCompression=True)
        out.append(target)
        provenance.append(read)
    return out, provenance
