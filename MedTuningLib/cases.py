"""The case library: labelled cases copied into one folder, listed in a ``cases.json`` manifest.

DESIGN.md, "Case library": ``format_version`` and cases (id, image file per modality name in channel
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

from MedTuningLib import FORMAT_VERSION, __version__
from MedTuningLib.errors import MedTuningError
from MedTuningLib.fileio import FileLock, ensure_writable_dir, read_json, write_json_atomic

MANIFEST_NAME = "cases.json"
LOCK_NAME = ".cases.lock"
CASES_DIR = "cases"
SPLITS = ("train", "val", "test")
PROVENANCES = ("import", "scene", "correction")
# File formats kept as they are; anything else (DICOM folders, .mhd + .raw, .nhdr, Analyze) is converted to NRRD.
_KEPT_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")


@dataclass
class Case:
    """One labelled case of a library; paths in the manifest are relative to ``root``."""

    id: str
    images: dict[str, str]  # modality name -> relative path, in channel order
    label: str
    split: str = "train"
    provenance: dict[str, Any] = field(default_factory=dict)
    root: Path = field(default=Path("."), compare=False, repr=False)

    @property
    def modalities(self) -> list[str]:
        return list(self.images)

    @property
    def image_paths(self) -> list[Path]:
        return [self.root / rel for rel in self.images.values()]

    @property
    def label_path(self) -> Path:
        return self.root / self.label

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "images": dict(self.images), "label": self.label, "split": self.split,
                "provenance": dict(self.provenance)}

    @classmethod
    def from_dict(cls, data: Any, root: Path) -> "Case":
        if not isinstance(data, dict):
            raise ValueError("a case is not a JSON object")
        images = data.get("images")
        if not isinstance(images, dict) or not images or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in images.items()):
            raise ValueError(f"case {data.get('id')!r} has no valid 'images' mapping")
        if not isinstance(data.get("id"), str) or not data["id"]:
            raise ValueError("a case has no id")
        if not isinstance(data.get("label"), str):
            raise ValueError(f"case {data['id']!r} has no label path")
        split = data.get("split", "train")
        if split not in SPLITS:
            raise ValueError(f"case {data['id']!r} has split {split!r}, not one of {SPLITS}")
        provenance = data.get("provenance") or {}
        if not isinstance(provenance, dict):
            raise ValueError(f"case {data['id']!r} has a provenance that is not an object")
        return cls(id=data["id"], images=dict(images), label=data["label"], split=split,
                   provenance=dict(provenance), root=root)


def manifest_to_dict(cases: Iterable[Case]) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "medtuning_version": __version__,
            "cases": [c.to_dict() for c in cases]}


def parse_manifest(data: Any, root: Path, where: str = MANIFEST_NAME) -> list[Case]:
    """Cases from a manifest object, with every check (LIBRARY_INVALID, LIBRARY_TOO_NEW, PATH_ESCAPES_LIBRARY)."""
    if not isinstance(data, dict) or "cases" not in data or not isinstance(data["cases"], list):
        raise MedTuningError("LIBRARY_INVALID", f"{where} is not a MedTuning case manifest (no 'cases' list)",
                             "restore cases.json from a backup, or start a new library folder")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MedTuningError("LIBRARY_INVALID", f"{where} has no valid format_version",
                             "restore cases.json from a backup")
    if version > FORMAT_VERSION:
        raise MedTuningError("LIBRARY_TOO_NEW", f"{where} has format version {version}; MedTuning {__version__} "
                             f"reads up to {FORMAT_VERSION}", "update MedTuning to use this case library")
    cases: list[Case] = []
    seen: set[str] = set()
    for entry in data["cases"]:
        try:
            case = Case.from_dict(entry, root)
        except ValueError as exc:
            raise MedTuningError("LIBRARY_INVALID", f"{where}: {exc}", "restore cases.json from a backup") from exc
        if case.id in seen:
            raise MedTuningError("LIBRARY_INVALID", f"{where} lists case {case.id!r} twice",
                                 "remove the duplicate entry from cases.json")
        seen.add(case.id)
        for rel in [*case.images.values(), case.label]:
            resolve_inside(root, rel)
        cases.append(case)
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
        return parse_manifest(data, self.root, str(self.manifest_path))

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
        write_json_atomic(self.manifest_path, manifest_to_dict(cases), "case library")

    def add(self, images: Sequence[Path], label: Path, modalities: Sequence[str] | None = None, split: str = "train",
            case_id: str | None = None, provenance: str = "import", source: str | None = None,
            log: Callable[[str], Any] | None = None, details: dict[str, Any] | None = None) -> Case:
        """Check a labelled case, copy its files into the library and list it; returns the new case.
        ``details`` are added to the case's provenance (e.g. ``{"dicom": [...]}``: the series read)."""
        from MedTuningLib.data.io import inspect_label, read_case_images

        images = [Path(p) for p in images]
        label = Path(label)
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
                                 "use --split train, val or test")
        if provenance not in PROVENANCES:
            raise MedTuningError("INVALID_OPTION", f"provenance {provenance!r} is not one of {', '.join(PROVENANCES)}",
                                 "use import, scene or correction")
        if case_id is not None and not case_id.strip():
            raise MedTuningError("INVALID_OPTION", "the case id is empty", "give a non-empty --id")
        # Check everything before touching the library: readable images on overlapping grids, a label on the grid.
        _, reference = read_case_images(images, log=log)
        info = inspect_label(label, reference)
        if info.empty_segments and log is not None:
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
                label_name = _copy_into(label, staging, "label")
                os.replace(staging, cases_dir / folder_name)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            case = Case(id=case_id, images=rel_images, label=f"{CASES_DIR}/{folder_name}/{label_name}", split=split,
                        provenance={**(details or {}), "added": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                    "from": provenance, "source": source if source is not None else
                                    ", ".join(str(p) for p in [*images, label])},
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
                          for rel in [*c.images.values(), c.label]}
            folders = set()
            for rel in [*case.images.values(), case.label]:
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
                                 "use train, val or test")
        with self._lock():
            cases = self._load()
            for case in cases:
                if case.id == case_id:
                    case.split = split
                    self._save(cases)
                    return case
        raise MedTuningError("CASE_NOT_FOUND", f"the library {self.root} has no case {case_id!r}",
                             "see the case ids with 'medtuning cases list'", case=case_id)
