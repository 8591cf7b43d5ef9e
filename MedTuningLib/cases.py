"""The case library: labelled cases copied into one folder, listed in a ``cases.json`` manifest.

docs/method.md, "Case library": ``format_version`` and cases (id, image file per modality name in channel
order, label file, split, provenance: when added, from where — import, scene, correction — and a
free-text source). Files are copied into ``cases/<id>/``; manifest paths are relative and may not
leave the library (PATH_ESCAPES_LIBRARY). Adding a case never overwrites another: inputs are checked
first, files are copied into a temporary folder that is renamed into place, and the manifest is
replaced atomically under a lock (LIBRARY_LOCKED while another process changes the library). A kill
at any moment leaves the previous manifest, at worst with an unlisted folder beside it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from MedTuningLib.errors import MedTuningError
from MedTuningLib.fileio import FileLock, ensure_writable_dir, read_json, write_json_atomic
from MedTuningLib.schema import (LABELLED_SPLITS, PROVENANCES, SPLITS, CaseManifest, CaseRecord, Provenance,
                                 SegmentEffort)

MANIFEST_NAME = "cases.json"
LOCK_NAME = ".cases.lock"
CASES_DIR = "cases"
# File formats kept as they are; anything else (DICOM folders, .mhd + .raw, .nhdr, Analyze) is converted to NRRD.
_KEPT_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")


@dataclass
class Case:
    """One case of a library; paths in the manifest are relative to ``root``. ``label`` is None for an
    unlabelled scan (split ``unlabelled``). ``provenance`` is the JSON form of
    :class:`MedTuningLib.schema.Provenance` (typed: :attr:`provenance_record`)."""

    id: str
    images: dict[str, str]  # modality name -> relative path, in channel order
    label: str | None
    split: str = "train"
    provenance: dict[str, Any] = field(default_factory=dict)
    root: Path = field(default=Path("."), compare=False, repr=False)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # fields of newer writers

    @property
    def modalities(self) -> list[str]:
        return list(self.images)

    @property
    def image_paths(self) -> list[Path]:
        return [self.root / rel for rel in self.images.values()]

    @property
    def labelled(self) -> bool:
        return self.label is not None

    @property
    def label_path(self) -> Path:
        if self.label is None:
            raise MedTuningError("EMPTY_LABEL", f"case {self.id!r} is an unlabelled scan (split 'unlabelled')",
                                 "correct it and add the corrected case, or leave it to 'medtuning suggest'",
                                 case=self.id)
        return self.root / self.label

    @property
    def files(self) -> list[str]:
        """Relative paths of the case's files (images, then the label when there is one)."""
        return [*self.images.values(), *([self.label] if self.label is not None else [])]

    @property
    def provenance_record(self) -> Provenance:
        return Provenance.from_dict(self.provenance)

    def record(self) -> CaseRecord:
        return CaseRecord(id=self.id, images=dict(self.images), label=self.label, split=self.split,
                          provenance=Provenance.from_dict(self.provenance), extra=dict(self.extra))

    def to_dict(self) -> dict[str, Any]:
        return self.record().to_dict()

    @classmethod
    def from_record(cls, record: CaseRecord, root: Path) -> "Case":
        return cls(id=record.id, images=dict(record.images), label=record.label, split=record.split,
                   provenance=record.provenance.to_dict(), root=root, extra=dict(record.extra))

    @classmethod
    def from_dict(cls, data: Any, root: Path) -> "Case":
        return cls.from_record(CaseRecord.from_dict(data), root)


def manifest_to_dict(cases: Iterable[Case], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return CaseManifest(cases=[c.record() for c in cases], extra=dict(extra or {})).to_dict()


def parse_manifest(data: Any, root: Path, where: str = MANIFEST_NAME) -> list[Case]:
    """Cases from a manifest object, with every check (LIBRARY_INVALID, LIBRARY_TOO_NEW, PATH_ESCAPES_LIBRARY)."""
    manifest = CaseManifest.from_dict(data, where)
    cases = [Case.from_record(record, root) for record in manifest.cases]
    for case in cases:
        for rel in case.files:
            resolve_inside(root, rel)
    return cases


def resolve_inside(root: Path, rel: str) -> Path:
    """``root / rel`` if it stays inside ``root`` (symbolic links followed), else PATH_ESCAPES_LIBRARY."""
    candidate = Path(rel)
    base = Path(root).resolve()
    if not rel or candidate.is_absolute() or candidate.drive or ".." in candidate.parts:
        escapes = True
    else:
        target = (base / candidate).resolve()
        escapes = target != base and base not in target.parents
    if escapes:
        raise MedTuningError("PATH_ESCAPES_LIBRARY", f"the case library manifest names {rel!r}, which is outside the "
                             f"library folder {root}", "a manifest may only name files inside its library; restore "
                             "cases.json from a backup, or re-add the case with 'medtuning cases add'", path=rel)
    return base / candidate


def _slug(text: str) -> str:
    """A folder-safe form of an id (letters of any script, digits, '.', '-', '_')."""
    text = unicodedata.normalize("NFC", text).strip()
    text = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in text)
    text = re.sub(r"_+", "_", text).strip("._") or "case"
    return text[:80]


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (*_KEPT_SUFFIXES, ".mhd", ".nhdr", ".hdr", ".img"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem or name


def _kept_suffix(path: Path) -> str | None:
    if path.is_dir():
        return None
    name = path.name.lower()
    for suffix in _KEPT_SUFFIXES:
        if name.endswith(suffix):
            if suffix == ".nrrd" and _detached_nrrd(path):
                return None
            return suffix
    return None


def _detached_nrrd(path: Path) -> bool:
    """A .nrrd whose voxels live in another file cannot be copied alone."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
        return b"\ndata file:" in head or b"\ndatafile:" in head
    except OSError:
        return False


def _copy_into(src: Path, folder: Path, base_name: str) -> str:
    """Copy (or convert to NRRD) ``src`` into ``folder``; returns the file name used."""
    suffix = _kept_suffix(src)
    if suffix is not None:
        name = base_name + suffix
        shutil.copyfile(src, folder / name)
        return name
    from MedTuningLib.data.io import read_sitk

    import SimpleITK as sitk

    name = base_name + ".nrrd"
    sitk.WriteImage(read_sitk(src), str(folder / name), useCompression=True)
    return name


class CaseLibrary:
    """A case library folder; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.manifest_path = self.root / MANIFEST_NAME

    # -- reading ----------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def _load(self) -> list[Case]:
        if not self.manifest_path.exists():
            if not self.root.exists():
                raise MedTuningError("FILE_NOT_FOUND", f"there is no case library at {self.root}",
                                     "check the --library path, or create it with 'medtuning cases add'",
                                     path=str(self.root))
            if not self.root.is_dir():
                raise MedTuningError("LIBRARY_INVALID", f"{self.root} is a file, not a case library folder",
                                     "give the folder that holds cases.json")
            if any(p.name not in (LOCK_NAME, CASES_DIR) for p in self.root.iterdir()):
                raise MedTuningError("LIBRARY_INVALID", f"{self.root} has files but no {MANIFEST_NAME}",
                                     "give a case library folder, or an empty folder to start one")
            return []  # an empty folder is an empty library
        data = read_json(self.manifest_path, "LIBRARY_INVALID", "case library manifest")
        cases = parse_manifest(data, self.root, str(self.manifest_path))
        self._extra = CaseManifest.from_dict(data, str(self.manifest_path)).extra  # written back unchanged
        return cases

    def cases(self, split: str | None = None) -> list[Case]:
        """The library's cases in the order they were added, optionally of one split."""
        return [c for c in self._load() if split is None or c.split == split]

    def get(self, case_id: str) -> Case:
        for case in self._load():
            if case.id == case_id:
                return case
        raise MedTuningError("CASE_NOT_FOUND", f"the library {self.root} has no case {case_id!r}",
                             "see the case ids with 'medtuning cases list'", case=case_id)

    def modalities(self) -> list[str] | None:
        """The modality names of the library's cases (the first case's), or None when empty."""
        cases = self._load()
        return cases[0].modalities if cases else None

    # -- changing ---------------------------------------------------------------------------------
    def _lock(self) -> FileLock:
        return FileLock(self.root / LOCK_NAME, code="LIBRARY_LOCKED", what="case library")

    def _save(self, cases: Sequence[Case]) -> None:
        write_json_atomic(self.manifest_path, manifest_to_dict(cases, getattr(self, "_extra", None)), "case library")

    def add(self, images: Sequence[Path], label: Path | None, modalities: Sequence[str] | None = None, split: str = "train",
            case_id: str | None = None, provenance: str = "import", source: str | None = None,
            log: Callable[[str], Any] | None = None, details: dict[str, Any] | None = None) -> Case:
        """Check a labelled case, copy its files into the library and list it; returns the new case.
        ``details`` are added to the case's provenance (e.g. ``{"dicom": [...]}``: the series read)."""
        from MedTuningLib.data.io import inspect_label, read_case_images

        images = [Path(p) for p in images]
        label = Path(label) if label is not None else None
        if not images:
            raise MedTuningError("MODALITY_COUNT_MISMATCH", "a case needs at least one image", "give --image FILE")
        if modalities is None:
            modalities = ["image"] if len(images) == 1 else [f"image{i}" for i in range(1, len(images) + 1)]
        modalities = [str(m).strip() for m in modalities]
        if len(modalities) != len(images):
            raise MedTuningError("MODALITY_COUNT_MISMATCH", f"{len(images)} image(s) but {len(modalities)} modality "
                                 "name(s)", "give one --modality per --image, in the same order")
        if len(set(modalities)) != len(modalities) or not all(modalities):
            raise MedTuningError("INVALID_OPTION", f"modality names must be distinct and non-empty: {modalities}",
                                 "name each modality once, e.g. --modality T1 --modality FLAIR")
        if split not in SPLITS:
            raise MedTuningError("INVALID_OPTION", f"split {split!r} is not one of {', '.join(SPLITS)}",
                                 "use --split train, val, test or unlabelled")
        if label is None and split != "unlabelled":
            raise MedTuningError("INVALID_OPTION", f"a case of split {split!r} needs a --label",
                                 "give --label FILE, or add the scan with --split unlabelled (never trained on; "
                                 "'medtuning suggest' ranks such scans for correction)")
        if label is not None and split == "unlabelled":
            raise MedTuningError("INVALID_OPTION", "--split unlabelled is for scans without a label, but a --label "
                                 "was given", "drop --label, or choose --split train, val or test")
        if provenance not in PROVENANCES:
            raise MedTuningError("INVALID_OPTION", f"provenance {provenance!r} is not one of {', '.join(PROVENANCES)}",
                                 "use import, scene or correction")
        if case_id is not None and not case_id.strip():
            raise MedTuningError("INVALID_OPTION", "the case id is empty", "give a non-empty --id")
        # Check everything before touching the library: readable images on overlapping grids, a label on the grid.
        _, reference = read_case_images(images, log=log)
        info = inspect_label(label, reference) if label is not None else None
        if info is not None and info.empty_segments and log is not None:
            log(f"{label.name}: segment(s) {', '.join(map(repr, info.empty_segments))} are empty (no voxels); "
                "the case is added, but it teaches nothing about those structures")

        ensure_writable_dir(self.root, "case library")
        with self._lock():
            cases = self._load()
            existing_modalities = cases[0].modalities if cases else None
            if existing_modalities is not None and len(existing_modalities) != len(modalities):
                raise MedTuningError(
                    "MODALITY_COUNT_MISMATCH", f"the library's cases have {len(existing_modalities)} modalities "
                    f"({', '.join(existing_modalities)}) but this case has {len(modalities)}",
                    "add the same modalities to every case of a library, or use another library")
            if existing_modalities is not None and existing_modalities != list(modalities) and log is not None:
                log(f"modality names {list(modalities)} differ from the library's {existing_modalities}")
            ids = {c.id for c in cases}
            if case_id is not None:
                case_id = case_id.strip()
                if case_id in ids:
                    raise MedTuningError("CASE_EXISTS", f"the library already has a case {case_id!r}",
                                         "choose another --id, or remove the old case first", case=case_id)
            else:
                base = _stem(images[0]) or "case"
                case_id, n = base, 1
                while case_id in ids:
                    n += 1
                    case_id = f"{base}-{n}"
            cases_dir = self.root / CASES_DIR
            cases_dir.mkdir(exist_ok=True)
            # Staging folders of adds that were killed: under the lock no add is running, so any
            # one left is an orphan copy (never listed in the manifest) and can go.
            for orphan in cases_dir.glob(".adding-*"):
                shutil.rmtree(orphan, ignore_errors=True)
            folder_name, n = _slug(case_id), 1
            while (cases_dir / folder_name).exists():  # also skips folders left by an interrupted add
                n += 1
                folder_name = f"{_slug(case_id)}-{n}"
            staging = Path(tempfile.mkdtemp(prefix=".adding-", dir=cases_dir))
            try:
                rel_images = {}
                for modality, src in zip(modalities, images):
                    name = _copy_into(src, staging, _slug(modality))
                    rel_images[modality] = f"{CASES_DIR}/{folder_name}/{name}"
                label_name = _copy_into(label, staging, "label") if label is not None else None
                os.replace(staging, cases_dir / folder_name)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            case = Case(id=case_id, images=rel_images,
                        label=f"{CASES_DIR}/{folder_name}/{label_name}" if label_name is not None else None, split=split,
                        provenance={**(details or {}), "added": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                    "from": provenance, "source": source if source is not None else
                                    ", ".join(str(p) for p in [*images, *([label] if label else [])])},
                        root=self.root)
            self._save([*cases, case])
        return case

    def remove(self, case_id: str) -> Case:
        """Unlist a case, then delete its files (only files inside the library)."""
        with self._lock():
            cases = self._load()
            case = next((c for c in cases if c.id == case_id), None)
            if case is None:
                raise MedTuningError("CASE_NOT_FOUND", f"the library {self.root} has no case {case_id!r}",
                                     "see the case ids with 'medtuning cases list'", case=case_id)
            self._save([c for c in cases if c.id != case_id])
            # The manifest is updated first: a kill here leaves unlisted files, never a listed case without files.
            still_used = {resolve_inside(self.root, rel) for c in cases if c.id != case_id
                          for rel in c.files}
            folders = set()
            for rel in case.files:
                path = resolve_inside(self.root, rel)
                if path not in still_used and path.is_file():
                    path.unlink()
                    folders.add(path.parent)
            for folder in folders:
                if folder != self.root.resolve() and not any(folder.iterdir()):
                    folder.rmdir()
        return case

    def set_split(self, case_id: str, split: str) -> Case:
        if split not in SPLITS:
            raise MedTuningError("INVALID_OPTION", f"split {split!r} is not one of {', '.join(SPLITS)}",
                                 "use train, val, test or unlabelled")
        with self._lock():
            cases = self._load()
            for case in cases:
                if case.id == case_id:
                    if case.label is None and split != "unlabelled":
                        raise MedTuningError("INVALID_OPTION", f"case {case_id!r} has no label: it can only be in "
                                             "split 'unlabelled'", "add the corrected (labelled) scan as a new case "
                                             "with 'medtuning cases add'", case=case_id)
                    case.split = split
                    self._save(cases)
                    return case
        raise MedTuningError("CASE_NOT_FOUND", f"the library {self.root} has no case {case_id!r}",
                             "see the case ids with 'medtuning cases list'", case=case_id)


def correction_effort(model_dir: Path, model_output: Path, corrected: Path, images: Sequence[Path],
                      log: Callable[[str], Any] | None = None) -> dict[str, SegmentEffort]:
    """Per segment the model writes: how much ``corrected`` (the radiologist's label) changed
    ``model_output`` (the model's result for these images). Both are read on the first image's grid
    and mapped with the model's label scheme (BraTS regions as the overlapping ET / TC / WT segments);
    mm³ from the image spacing. A label the scheme cannot map is refused with the model named."""
    import numpy as np

    from MedTuningLib.data.io import read_case_images, read_label
    from MedTuningLib.data.labels import LabelScheme
    from MedTuningLib.schema import ModelManifest

    MODEL_MANIFEST = "medtuning.json"  # (engine.modelfolder.MANIFEST_NAME; that module needs torch)

    model_dir = Path(model_dir)
    if not (model_dir / MODEL_MANIFEST).is_file():
        raise MedTuningError("MODEL_FOLDER_INVALID", f"--from-model {model_dir} is not a model folder (no "
                             f"{MODEL_MANIFEST})", "give the model folder whose result was corrected")
    record = ModelManifest.from_dict(read_json(model_dir / MODEL_MANIFEST, "MODEL_FOLDER_INVALID",
                                               "model description"), str(model_dir / MODEL_MANIFEST))
    if len(images) != len(record.modalities):
        raise MedTuningError("MODALITY_COUNT_MISMATCH", f"the model {model_dir} reads {len(record.modalities)} "
                             f"image(s) ({', '.join(record.modalities)}); this case has {len(images)}",
                             "name the model that produced the corrected result")
    scheme = LabelScheme.from_dict(record.label_scheme)
    _, reference = read_case_images(list(images), log=log)
    before = read_label(Path(model_output), reference, scheme, allow_empty=True, log=log)
    after = read_label(Path(corrected), reference, scheme, allow_empty=True, log=log)
    voxel_mm3 = float(np.prod(reference.GetSpacing()))
    masks_before, masks_after = scheme.output_masks(before), scheme.output_masks(after)
    effort: dict[str, SegmentEffort] = {}
    for name in masks_before:
        b, a = masks_before[name], masks_after[name]
        added, removed = int((a & ~b).sum()), int((b & ~a).sum())
        total = int(a.sum()) + int(b.sum())
        effort[name] = SegmentEffort(dice=2.0 * int((a & b).sum()) / total if total else 1.0, voxels_added=added,
                                     voxels_removed=removed, mm3_added=added * voxel_mm3,
                                     mm3_removed=removed * voxel_mm3, model_voxels=int(b.sum()),
                                     corrected_voxels=int(a.sum()))
    return effort
