"""Shared by the slicer-core tests: a standalone MRML context and nodes read from real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def terminology_dir() -> Path:
    import trame_slicer

    return Path(trame_slicer.__file__).parent / "resources" / "terminologies"


def new_context(tmp_path: Path):
    from MedTuningLib.mrml import MrmlContext

    return MrmlContext.standalone(terminology_share_dir=terminology_dir(), temp_root=tmp_path / "slicer-temp")


def read_volume(context, path: Path, name: str, labelmap: bool = False):
    """A volume node read by Slicer's own storage node (as "Add data" does)."""
    import slicer

    from MedTuningLib.mrml import read_volume as read_scalar_volume

    if not labelmap:
        return read_scalar_volume(context, path, name)
    node = context.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node), path
    return node


def voxels(volume) -> np.ndarray:
    import slicer

    return np.array(slicer.util.arrayFromVolume(volume))
