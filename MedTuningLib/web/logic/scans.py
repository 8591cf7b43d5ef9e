"""Scans: uploads from the browser or files under the server's ``--scans`` folder, checked as the
backend checks them, loaded into the scene by Slicer's volume readers, one volume per modality."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from trame.app.file_upload import ClientFile

from MedTuningLib.errors import MedTuningError

SCAN_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


def _is_scan_name(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(SCAN_SUFFIXES) and not lower.endswith(".seg.nrrd")


def check_scan(path: Path, shown_name: str) -> None:
    """Raise the backend's own error (FILE_UNREADABLE, IMAGE_DIMENSION, ...) for a file it would refuse."""
    from MedTuningLib.data.io import read_sitk  # the readers and checks ``medtuning segment`` applies

    try:
        read_sitk(path, what="scan")
    except MedTuningError as exc:
        # The message names the upload, not the server's temporary copy of it.
        message = exc.message.replace(str(path), shown_name)
        raise MedTuningError(exc.code, message, exc.hint) from exc


class ScansLogic:
    """Loaded volumes (``mt_volumes``) and which one feeds each modality of the model (``mt_inputs``)."""

    def __init__(self, server: Any, slicer_app: Any, jobs: Any, work_dir: Path, scans_dir: Optional[Path]) -> None:
        self.server = server
        self.app = slicer_app
        self.jobs = jobs
        self.upload_root = work_dir / "uploads"
        self.scans_dir = scans_dir
        self.listeners: list = []  # called with the new volume node
        state = server.state
        state.mt_volumes = []
        state.mt_inputs = {}
        state.mt_server_files = self.server_files()
        state.mt_server_file = None

    # -- server folder ---------------------------------------------------------------------------
    def server_files(self) -> list[str]:
        """Scan files under ``--scans`` (relative paths), for the picker."""
        root = self.scans_dir
        if root is None or not root.is_dir():
            return []
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and _is_scan_name(p.name))

    def open_server_file(self, relative: Optional[str]) -> None:
        if not relative or self.scans_dir is None:
            return
        root = self.scans_dir.resolve()
        path = (root / relative).resolve()
        if root not in path.parents or not path.is_file():  # the page may only read inside --scans
            self.jobs.show_error("FILE_NOT_FOUND", f"{relative} is not a file inside the server's scans folder",
                                 "pick a file from the list (press refresh if it was added since)")
            return
        self._load([(path, relative)])

    def refresh_server_files(self) -> None:
        self.server.state.mt_server_files = self.server_files()

    # -- uploads ---------------------------------------------------------------------------------
    async def on_upload(self, files: list[dict]) -> None:
        if not files:
            return
        self.upload_root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=self.upload_root))
        try:
            written = _write_uploads(files, folder)
            with self.server.state:
                self._load([(p, p.name) for p in written])
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the scene holds the voxels now

    # -- loading ---------------------------------------------------------------------------------
    def _load(self, files: list[tuple[Path, str]]) -> None:
        loaded = []
        for path, shown in files:
            if path.name.lower().endswith(".seg.nrrd"):
                self.jobs.show_error("IMAGE_DIMENSION", f"{shown} is a segmentation, not a scan",
                                     "upload the scan volume (CT or MR); segmentations come from Segment")
                continue
            try:
                check_scan(path, shown)
            except MedTuningError as exc:
                self.jobs.show_error(exc.code, exc.message, exc.hint)
                continue
            nodes = self.app.io_manager.load_volumes([path.as_posix()])
            if not nodes:
                self.jobs.show_error("FILE_UNREADABLE", f"3D Slicer's readers could not load {shown}",
                                     "give a NIfTI (.nii/.nii.gz), NRRD or MHA file")
                continue
            for node in nodes:
                node.SetName(_node_name(shown))
                loaded.append(node)
        if not loaded:
            return
        self._refresh_volumes()
        self.show(loaded[-1])
        self.jobs.notice(f"Loaded {', '.join(n.GetName() for n in loaded)}")
        for listener in self.listeners:
            listener(loaded[-1])

    def show(self, volume: Any) -> None:
        """The volume in the slice views (no volume rendering: segments stay visible in 3D)."""
        display = self.app.display_manager
        display.show_volume_in_slice_background(volume)
        display.show_volume_in_slice_foreground(None)
        display.reset_views()

    def _refresh_volumes(self) -> None:
        volumes = self.volume_nodes()
        self.server.state.mt_volumes = [{"id": v.GetID(), "name": v.GetName()} for v in volumes]

    def volume_nodes(self) -> list[Any]:
        collection = self.app.scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
        nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
        return [n for n in nodes if not n.IsA("vtkMRMLLabelMapVolumeNode") and n.GetImageData() is not None]

    def assign_defaults(self, modalities: list[str]) -> None:
        """Each modality keeps its volume when still loaded; others get the loaded volumes in order."""
        ids = [v["id"] for v in self.server.state.mt_volumes]
        current = dict(self.server.state.mt_inputs or {})
        inputs = {}
        free = [i for i in ids if i not in current.values()]
        for modality in modalities:
            chosen = current.get(modality)
            if chosen not in ids:
                chosen = free.pop(0) if free else (ids[-1] if ids else None)
            inputs[modality] = chosen
        self.server.state.mt_inputs = inputs

    def use_as_inputs(self, volumes: list[Any], modalities: list[str]) -> None:
        """Volumes loaded by the app itself (the next scan to correct): listed, shown, and chosen as the inputs."""
        self._refresh_volumes()
        self.show(volumes[0])
        self.server.state.mt_inputs = {m: v.GetID() for m, v in zip(modalities, volumes)}

    def inputs(self, modalities: list[str]) -> list[Any]:
        """The volume node per modality (None where none is chosen)."""
        chosen = self.server.state.mt_inputs or {}
        return [self.app.scene.GetNodeByID(chosen.get(m)) if chosen.get(m) else None for m in modalities]


def _write_uploads(files: list[dict], folder: Path) -> list[Path]:
    """The uploaded files under ``folder``, by their base names only: a name sent as ``../x`` (a
    crafted client, not a browser) must not write outside the upload folder."""
    written = []
    for entry in files:
        upload = ClientFile(entry)
        name = Path(str(upload.name).replace("\\", "/")).name
        if name in ("", ".", ".."):
            continue
        path = folder / name
        path.write_bytes(upload.content)
        written.append(path)
    return written


def _node_name(file_name: str) -> str:
    name = Path(file_name).name
    for suffix in (".nii.gz", ".seg.nrrd") + SCAN_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name
