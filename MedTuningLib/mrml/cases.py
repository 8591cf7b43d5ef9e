"""Scene cases: labelled volumes from the scene that become cases of the library.

A scene case is one volume per modality, in the model's channel order (BraTS: T1, T1ce, T2,
FLAIR), plus a label node (a segmentation, or a labelmap volume). :class:`SceneCaseList` keeps the
cases the user picked by node ID with a stable key per case, so a table showing them never drifts
when a node is deleted (rows are rebuilt from :meth:`SceneCaseList.live`, and a row names its case
by key, not by position). :func:`export_case` writes one case as the backend's ``cases add`` wants it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from MedTuningLib.mrml.context import MrmlContext, MrmlError
from MedTuningLib.mrml.nodes import export_label, export_volume, is_labelmap, is_segmentation, is_volume
from MedTuningLib.slicer_bridge.commands import SPLITS, CaseAddParams
from MedTuningLib.slicer_bridge.export import ExportNamer, plan_case_export

_keys = itertools.count(1)


@dataclass
class SceneCase:
    """Node IDs of one case: ``volume_ids`` in modality order, ``label_id``; ``key`` never changes."""

    volume_ids: List[str]
    label_id: str
    split: str = "train"
    checked: bool = True
    key: str = field(default_factory=lambda: f"case-{next(_keys)}")

    def nodes(self, context: MrmlContext) -> Optional[Tuple[List[Any], Any]]:
        """``(volumes, label)`` while every node still exists, else None."""
        volumes = [context.node(i) for i in self.volume_ids]
        label = context.node(self.label_id)
        if label is None or any(v is None for v in volumes):
            return None
        return volumes, label

    def title(self, context: MrmlContext) -> str:
        found = self.nodes(context)
        if found is None:
            return "(deleted)"
        volumes, label = found
        return " + ".join(v.GetName() for v in volumes) + " / " + label.GetName()


def check_case_nodes(volumes: Sequence[Any], label: Any, modalities: Sequence[str]) -> None:
    """Raise :class:`MrmlError` with what to change when the nodes cannot make a case (``label`` None: an
    unlabelled scan)."""
    if modalities and len(volumes) != len(modalities):
        raise MrmlError(f"A case needs one volume per modality ({', '.join(modalities)}): {len(volumes)} given")
    if not volumes or any(not is_volume(v) or is_labelmap(v) for v in volumes):
        raise MrmlError("Choose a scalar volume (not a labelmap) for every modality of the case")
    if label is not None and not (is_segmentation(label) or is_labelmap(label)):
        raise MrmlError("The label of a case must be a segmentation or a labelmap volume")


class SceneCaseList:
    """The scene cases a user collected, addressed by key."""

    def __init__(self) -> None:
        self.cases: List[SceneCase] = []

    def add(self, volumes: Sequence[Any], label: Any, split: str = "train",
            modalities: Sequence[str] = ()) -> SceneCase:
        """Add (or return the existing) case for these nodes."""
        check_case_nodes(volumes, label, modalities)
        if split not in SPLITS:
            raise MrmlError(f"split must be one of {', '.join(SPLITS)}")
        ids = [v.GetID() for v in volumes]
        for case in self.cases:
            if case.volume_ids == ids and case.label_id == label.GetID():
                case.split = split
                return case
        case = SceneCase(ids, label.GetID(), split)
        self.cases.append(case)
        return case

    def get(self, key: str) -> Optional[SceneCase]:
        return next((c for c in self.cases if c.key == key), None)

    def remove(self, key: str) -> bool:
        before = len(self.cases)
        self.cases = [c for c in self.cases if c.key != key]
        return len(self.cases) != before

    def prune(self, context: MrmlContext) -> List[SceneCase]:
        """Drop cases whose nodes were deleted; returns the dropped ones."""
        gone = [c for c in self.cases if c.nodes(context) is None]
        self.cases = [c for c in self.cases if c not in gone]
        return gone

    def live(self, context: MrmlContext) -> List[SceneCase]:
        """The cases whose nodes all exist (what a table shows), in the order they were added."""
        self.prune(context)
        return list(self.cases)

    def checked(self, context: MrmlContext) -> List[SceneCase]:
        return [c for c in self.live(context) if c.checked]

    def clear(self) -> None:
        self.cases.clear()


def export_case(context: MrmlContext, volumes: Sequence[Any], label: Any, folder: Path, library: Path,
                modalities: Sequence[str], split: str = "train", provenance: str = "scene",
                namer: Optional[ExportNamer] = None) -> CaseAddParams:
    """Write one case's files into ``folder``; returns the ``cases add`` parameters for it. ``label`` None: an
    unlabelled scan (split ``unlabelled``, for "Next scan to correct")."""
    check_case_nodes(volumes, label, modalities)
    if label is None and split != "unlabelled":
        raise MrmlError(f"A {split} case needs a segmentation: add a scan without one as unlabelled")
    files = plan_case_export(folder, [v.GetName() for v in volumes], label.GetName() if label else "", namer)
    for volume, path in zip(volumes, files.images):
        export_volume(volume, path)
    if label is not None:
        export_label(context, label, files.label, volumes[0])  # the label on the first modality's grid
    return CaseAddParams(library=library, images=files.images, label=files.label if label else None,
                         modalities=list(modalities), split=split, provenance=provenance,
                         source=f"3D Slicer: {(label or volumes[0]).GetName()}")
