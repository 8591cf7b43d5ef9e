"""Safe, unique file names for volumes and segmentations exported from the Slicer scene.

Node names are whatever the user typed or DICOM gave: spaces, slashes, accents, Chinese, emoji,
``CON`` (reserved on Windows), or two nodes both called ``CT``. Exported files need names that
are valid on every file system, readable (``CT chest ü`` -> ``CT_chest_u``), and never collide —
also on case-insensitive file systems (Windows, macOS). Names that keep nothing readable get a
short hash of the original, so two different non-Latin names still map to different files.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

MAX_STEM_CHARS = 60
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_stem(name: str, fallback: str = "node") -> str:
    """A file-name stem made of ASCII letters, digits, ``.``, ``_`` and ``-`` from any node name."""
    original = name or ""
    ascii_text = unicodedata.normalize("NFKD", original).encode("ascii", "ignore").decode("ascii")
    stem = _UNSAFE.sub("_", ascii_text).strip("._-")
    stem = re.sub(r"_+", "_", stem)[:MAX_STEM_CHARS].rstrip("._-")
    lost = sum(1 for ch in original if ch.isalnum()) - sum(1 for ch in stem if ch.isalnum())
    if not stem or lost > len(stem):  # mostly non-Latin: keep it distinguishable
        digest = hashlib.sha1(original.encode("utf-8")).hexdigest()[:8]
        stem = f"{stem}_{digest}" if stem else f"{fallback}_{digest}" if original else fallback
    if stem.split(".")[0].upper() in _WINDOWS_RESERVED:
        stem = f"{stem}_"
    return stem


@dataclass
class ExportNamer:
    """Hands out unique file paths in one folder (case-insensitively, existing files included)."""

    folder: Path
    _taken: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        if self.folder.is_dir():
            self._taken.update(p.name.lower() for p in self.folder.iterdir())

    def path(self, node_name: str, suffix: str = ".nrrd", fallback: str = "node") -> Path:
        """``folder/<safe name><suffix>``, with ``_2``, ``_3``, ... added when taken."""
        stem = safe_stem(node_name, fallback)
        candidate, n = f"{stem}{suffix}", 1
        while candidate.lower() in self._taken:
            n += 1
            candidate = f"{stem}_{n}{suffix}"
        self._taken.add(candidate.lower())
        return self.folder / candidate


@dataclass
class CaseFiles:
    """The files one exported case is written to: one image per modality and the label."""

    images: list[Path]
    label: Path


def plan_case_export(folder: Path, volume_names: Sequence[str], segmentation_name: str,
                     namer: Optional[ExportNamer] = None) -> CaseFiles:
    """File paths for a case: volumes as ``.nrrd``, the segmentation as ``.seg.nrrd``."""
    if not volume_names:
        raise ValueError("a case needs at least one volume")
    namer = namer or ExportNamer(folder)
    images = [namer.path(name, ".nrrd", fallback="volume") for name in volume_names]
    label = namer.path(segmentation_name, ".seg.nrrd", fallback="segmentation")
    return CaseFiles(images, label)


def suggest_case_id(volume_name: str, existing_ids: Iterable[str]) -> str:
    """A readable case id not yet in the library (compared case-insensitively)."""
    taken = {i.lower() for i in existing_ids}
    base = safe_stem(volume_name, "case")
    candidate, n = base, 1
    while candidate.lower() in taken:
        n += 1
        candidate = f"{base}_{n}"
    return candidate


def unique_node_name(wanted: str, existing: Iterable[str]) -> str:
    """``wanted``, or ``wanted (2)``, ``wanted (3)`` ... so a new node never shadows an old one."""
    taken = set(existing)
    if wanted not in taken:
        return wanted
    n = 2
    while f"{wanted} ({n})" in taken:
        n += 1
    return f"{wanted} ({n})"
