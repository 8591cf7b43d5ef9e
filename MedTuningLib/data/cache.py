"""A cache of preprocessed cases: normalised image + class map per case, as .npz + JSON (never pickle).

The key covers everything the result depends on: each input file's path, size and modification time
(or its sha256 with ``hash_files=True``), the preprocessing record and the label scheme. A changed
file, preprocessing or scheme is a different key, so a stale entry is never used. Entries are written
to a temporary name and renamed, so a killed run never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from MedTuningLib.fileio import atomic_path, sha256_file, write_json_atomic

CACHE_VERSION = 1


def _file_identity(path: Path, hash_files: bool) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():  # DICOM folder: every file in it
        return {"path": str(path.resolve()),
                "files": [_file_identity(p, hash_files) for p in sorted(path.iterdir()) if p.is_file()]}
    try:
        stat = path.stat()
    except FileNotFoundError as exc:
        from MedTuningLib.errors import MedTuningError

        raise MedTuningError("FILE_NOT_FOUND", f"the file {path} does not exist",
                             "check the path; for a case of a library, add the case again with 'medtuning cases add' "
                             "or remove it with 'medtuning cases remove'", path=str(path)) from exc
    entry: dict[str, Any] = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if hash_files:
        entry["sha256"] = sha256_file(path)
    return entry


class CaseCache:
    """Preprocessed cases under ``root`` (``<key>.npz`` holding ``image`` and ``label``, ``<key>.json``)."""

    def __init__(self, root: Path, hash_files: bool = False) -> None:
        self.root = Path(root)
        self.hash_files = hash_files

    def key(self, image_paths: Sequence[Path], label_path: Path | None, preprocessing: Any, scheme: Any) -> str:
        """A digest of the inputs, the preprocessing record and the scheme (``to_dict`` of each)."""
        description = {
            "version": CACHE_VERSION,
            "images": [_file_identity(Path(p), self.hash_files) for p in image_paths],
            "label": _file_identity(Path(label_path), self.hash_files) if label_path else None,
            "preprocessing": preprocessing.to_dict() if hasattr(preprocessing, "to_dict") else preprocessing,
            "scheme": scheme.to_dict() if hasattr(scheme, "to_dict") else scheme,
        }
        text = json.dumps(description, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.npz", self.root / f"{key}.json"

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]] | None:
        """``(image, label or None, metadata)`` or None when absent or unreadable (then it is recomputed)."""
        data_path, meta_path = self._paths(key)
        if not (data_path.is_file() and meta_path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            with np.load(data_path, allow_pickle=False) as data:  # never unpickle
                image = data["image"]
                label = data["label"] if "label" in data.files else None
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            return None
        return image, label, meta

    def put(self, key: str, image: np.ndarray, label: np.ndarray | None, meta: dict[str, Any] | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        data_path, meta_path = self._paths(key)
        arrays = {"image": np.ascontiguousarray(image)}
        if label is not None:
            arrays["label"] = np.ascontiguousarray(label)
        with atomic_path(data_path, "cache") as tmp:
            with open(tmp, "wb") as fh:  # a file object: numpy must not append its own suffix
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
        write_json_atomic(meta_path, {"version": CACHE_VERSION, **(meta or {})}, "cache")

    def get_or_compute(self, image_paths: Sequence[Path], label_path: Path | None, preprocessing: Any, scheme: Any,
                       compute: Callable[[], tuple[np.ndarray, np.ndarray | None, dict[str, Any]]]
                       ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
        """The cached entry, or ``compute()`` stored and returned."""
        key = self.key(image_paths, label_path, preprocessing, scheme)
        hit = self.get(key)
        if hit is not None:
            return hit
        image, label, meta = compute()
        self.put(key, image, label, meta)
        return image, label, meta

    def get_or_build(self, case: Any, scheme: Any, preprocessing: Any,
                     build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A library case's prepared data (a dict of arrays and JSON values, e.g. image, label, spacing).

        ``case`` gives ``image_paths`` and ``label_path``. Arrays go into the .npz, the other values
        into the JSON (lists come back as tuples, as for a spacing).
        """
        key = self.key(case.image_paths, case.label_path, preprocessing, scheme)
        hit = self.get(key)
        if hit is not None and "values" in hit[2]:
            image, label, meta = hit
            out: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["values"].items()}
            out["image"] = image
            if label is not None:
                out["label"] = label
            return out
        data = build()
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()
                  if k not in ("image", "label") and not isinstance(v, np.ndarray)}
        self.put(key, data["image"], data.get("label"), {"case": getattr(case, "id", None), "values": values})
        return data

    def clear(self) -> int:
        """Remove every entry; returns how many files were removed."""
        removed = 0
        if self.root.is_dir():
            for path in self.root.iterdir():
                if path.suffix in (".npz", ".json") and path.is_file():
                    path.unlink()
                    removed += 1
        return removed
