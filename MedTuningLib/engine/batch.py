"""The scans of a batch segmentation (``medtuning segment --batch-list``): a CSV list or a folder.

CSV (UTF-8, Excel's BOM accepted; one header row; '#' rows are comments; relative paths are relative
to the CSV's folder), one row per scan:

- one column per model modality, named as the modality (e.g. ``CT``, ``FLAIR``), or ``image`` for a
  one-modality model, or ``image1`` … ``imageN`` in channel order — a file or a DICOM series folder;
- ``out``: the result, ``.seg.nrrd`` or ``.dcm`` (DICOM SEG); optional when ``--out DIR`` is given
  (then ``DIR/<id>.seg.nrrd`` and/or ``.dcm`` as ``--batch-format`` says);
- optional ``id``, ``labelmap``, ``dicom_seg`` (a DICOM SEG besides the .seg.nrrd), ``series``
  (SeriesInstanceUIDs, separated by ``;`` or spaces, as ``--series`` takes them).

Folder: every sub-folder is one scan — a DICOM series folder, a folder with one image file, or (for
several modalities) files or DICOM folders named as the modalities; results go to ``--out DIR``.
A scan that cannot be described (missing column value, no image) becomes a job that fails with its
code, so the rest of the batch still runs.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from MedTuningLib.errors import MedTuningError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr")
FORMATS = ("seg.nrrd", "dcm", "both")


@dataclass
class ScanJob:
    """One scan of a batch: its images and the outputs to write."""

    id: str
    images: list[Path] = field(default_factory=list)
    out: Path | None = None  # .seg.nrrd
    dicom_seg: Path | None = None
    labelmap: Path | None = None
    series: list[str] = field(default_factory=list)
    error: MedTuningError | None = None  # set when the row / folder itself is unusable

    @property
    def outputs(self) -> list[Path]:
        return [p for p in (self.out, self.dicom_seg, self.labelmap) if p is not None]


def output_complete(path: Path) -> bool:
    """A result that a finished run wrote: it exists and its header reads (outputs are written to a
    temporary name and renamed, so a killed run leaves no partial file under the final name)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return False
    name = path.name.lower()
    try:
        if name.endswith(".nrrd"):
            import nrrd

            nrrd.read_header(str(path))
        elif name.endswith(".dcm"):
            import pydicom

            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
            return str(ds.get("Modality", "")) == "SEG"
    except Exception:
        return False
    return True


def split_series(text: str | None) -> list[str]:
    return [s for s in re.split(r"[;,\s]+", text or "") if s]


def _image_columns(modalities: Sequence[str], header: Sequence[str]) -> list[str] | None:
    lower = {h.lower(): h for h in header}
    for names in ([m.lower() for m in modalities],
                  ["image"] if len(modalities) == 1 else [],
                  [f"image{i}" for i in range(1, len(modalities) + 1)]):
        if names and all(n in lower for n in names):
            return [lower[n] for n in names]
    return None


def _default_outputs(out_dir: Path, name: str, fmt: str) -> tuple[Path | None, Path | None]:
    seg = out_dir / f"{name}.seg.nrrd" if fmt in ("seg.nrrd", "both") else None
    dcm = out_dir / f"{name}.dcm" if fmt in ("dcm", "both") else None
    return seg, dcm


def _classify_out(path: Path) -> tuple[Path | None, Path | None]:
    name = path.name.lower()
    if name.endswith(".seg.nrrd"):
        return path, None
    if name.endswith(".dcm"):
        return None, path
    raise MedTuningError("BATCH_LIST_INVALID", f"the output {path} must end in .seg.nrrd or .dcm (DICOM SEG)",
                         "name each row's out e.g. case1.seg.nrrd or case1.dcm")


def read_batch_csv(path: Path, modalities: Sequence[str], out_dir: Path | None = None,
                   fmt: str = "seg.nrrd") -> list[ScanJob]:
    """The scans of a batch CSV (see the module docstring); BATCH_LIST_INVALID when it cannot be used."""
    path = Path(path)
    base = path.parent
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MedTuningError("BATCH_LIST_INVALID", f"the batch list {path} cannot be read ({exc})",
                             "give a UTF-8 CSV file with a header row") from exc
    rows = [r for r in rows if any(c.strip() for c in r) and not r[0].lstrip().startswith("#")]
    if not rows:
        raise MedTuningError("BATCH_LIST_INVALID", f"the batch list {path} is empty",
                             "give a header row and one row per scan")
    header = [h.strip() for h in rows[0]]
    columns = _image_columns(modalities, header)
    expected = ", ".join(modalities) if len(modalities) > 1 else f"{modalities[0]} or image"
    if columns is None:
        raise MedTuningError("BATCH_LIST_INVALID", f"the batch list {path} has no image column(s) for the model's "
                             f"modalities ({expected}); its columns are {header}",
                             f"name the image columns {expected} (or image1..image{len(modalities)}), and add out")
    lower = {h.lower(): i for i, h in enumerate(header)}
    out_col = lower.get("out", lower.get("output"))
    if out_col is None and out_dir is None:
        raise MedTuningError("BATCH_LIST_INVALID", f"the batch list {path} has no 'out' column",
                             "add an out column (result .seg.nrrd or .dcm per scan), or give --out DIR")

    def cell(row: list[str], name: str | None) -> str:
        index = lower.get(name.lower()) if name is not None else None
        return row[index].strip() if index is not None and index < len(row) else ""

    def resolve(text: str) -> Path:
        p = Path(text).expanduser()
        return p if p.is_absolute() else base / p

    jobs: list[ScanJob] = []
    for number, row in enumerate(rows[1:], start=2):
        images_text = [cell(row, c) for c in columns]
        out_text = row[out_col].strip() if out_col is not None and out_col < len(row) else ""
        scan_id = cell(row, "id") or (Path(out_text).name.split(".")[0] if out_text else "") or \
            (Path(images_text[0]).name if images_text[0] else f"row{number}")
        job = ScanJob(id=scan_id, series=split_series(cell(row, "series")))
        try:
            if not all(images_text):
                missing = [c for c, t in zip(columns, images_text) if not t]
                raise MedTuningError("BATCH_LIST_INVALID", f"row {number} of {path} has no {', '.join(missing)}",
                                     "fill in one image per modality column")
            job.images = [resolve(t) for t in images_text]
            if out_text:
                job.out, job.dicom_seg = _classify_out(resolve(out_text))
            else:
                assert out_dir is not None
                job.out, job.dicom_seg = _default_outputs(out_dir, scan_id, fmt)
            if cell(row, "dicom_seg"):
                job.dicom_seg = resolve(cell(row, "dicom_seg"))
            if cell(row, "labelmap"):
                job.labelmap = resolve(cell(row, "labelmap"))
        except MedTuningError as exc:
            job.error = exc
        jobs.append(job)
    if not jobs:
        raise MedTuningError("BATCH_LIST_INVALID", f"the batch list {path} has a header but no scans",
                             "add one row per scan")
    _check_unique_outputs(jobs, str(path))
    return jobs


def _check_unique_outputs(jobs: Sequence[ScanJob], where: str) -> None:
    seen: dict[Path, str] = {}
    for job in jobs:
        for out in job.outputs:
            key = Path(out).absolute()
            if key in seen:
                raise MedTuningError("BATCH_LIST_INVALID", f"{where}: scans {seen[key]!r} and {job.id!r} would both "
                                     f"write {out}", "give every scan its own output")
            seen[key] = job.id


def _image_entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and
                  p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))


def read_batch_folder(folder: Path, modalities: Sequence[str], out_dir: Path, fmt: str = "seg.nrrd"
                      ) -> list[ScanJob]:
    """One scan per sub-folder of ``folder`` (see the module docstring)."""
    from MedTuningLib.data.dicom import is_dicom_file, is_dicom_folder

    folder = Path(folder)
    out_abs = Path(out_dir).absolute()
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and p.absolute() != out_abs)
    if not subs:
        raise MedTuningError("BATCH_LIST_INVALID", f"the batch folder {folder} has no sub-folders",
                             "put each scan in its own sub-folder (a DICOM series folder, or a folder with its image "
                             "file(s)), or give a CSV list")
    jobs = []
    for sub in subs:
        seg, dcm = _default_outputs(Path(out_dir), sub.name, fmt)
        job = ScanJob(id=sub.name, out=seg, dicom_seg=dcm)
        entries = {_stem(p).lower(): p for p in sub.iterdir() if not p.name.startswith(".")}
        named = [entries.get(m.lower()) for m in modalities]
        if all(p is not None and (p.is_dir() or p.name.lower().endswith(IMAGE_SUFFIXES)) for p in named):
            job.images = [p for p in named if p is not None]
        elif len(modalities) == 1 and any(is_dicom_file(p) for p in sub.iterdir() if p.is_file()):
            job.images = [sub]
        elif len(modalities) == 1 and len(_image_entries(sub)) == 1:
            job.images = _image_entries(sub)
        elif len(modalities) == 1 and is_dicom_folder(sub):
            job.images = [sub]  # DICOM files in folders below (e.g. a study/series tree)
        else:
            job.error = MedTuningError(
                "BATCH_LIST_INVALID", f"the scan folder {sub} holds no usable image: expected "
                + (f"files or DICOM folders named {', '.join(modalities)}" if len(modalities) > 1 else
                   "DICOM files or exactly one image file"),
                "put one scan per sub-folder" + (" with its modalities named as the model's" if len(modalities) > 1
                                                  else ""))
        jobs.append(job)
    _check_unique_outputs(jobs, str(folder))
    return jobs


def _stem(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def describe(job: ScanJob) -> dict[str, Any]:
    return {"scan": job.id, "images": [str(p) for p in job.images], "outputs": [str(p) for p in job.outputs]}
