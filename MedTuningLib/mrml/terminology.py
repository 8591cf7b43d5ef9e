"""MedTuning's terminology context (BraTS regions ET / TC / WT) in Slicer's Terminologies logic.

Results carry standard DICOM / SNOMED terminology where a concept exists; the BraTS evaluation
regions have none, so MedTuning ships a context (``presets/terminology-medtuning.json``). Slicer
resolves a segment's terminology (recommended colour, names in the segment editor's terminology
selector) only against contexts loaded into ``vtkSlicerTerminologiesModuleLogic``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import vtk

from MedTuningLib.mrml.context import MrmlContext

#: The context file shipped with the presets (package data, next to brats.json).
CONTEXT_FILE = Path(__file__).resolve().parents[1] / "presets" / "terminology-medtuning.json"
#: Its ``SegmentationCategoryTypeContextName``.
CONTEXT_NAME = "Segmentation category and type - MedTuning brain tumour regions"


def loaded_terminology_names(context: MrmlContext) -> List[str]:
    """Names of the terminology contexts the scene's Terminologies logic has loaded."""
    logic = context.terminologies_logic()
    if logic is None:
        return []
    names = vtk.vtkStringArray()
    logic.GetLoadedTerminologyNames(names)
    return [names.GetValue(i) for i in range(names.GetNumberOfValues())]


def load_medtuning_terminology(context: MrmlContext, path: Path = CONTEXT_FILE) -> Optional[str]:
    """Load MedTuning's context once; returns its name, or None where there is no Terminologies logic."""
    logic = context.terminologies_logic()
    if logic is None:
        return None
    if CONTEXT_NAME in loaded_terminology_names(context):
        return CONTEXT_NAME
    if not logic.LoadContextFromFile(str(path)) or CONTEXT_NAME not in loaded_terminology_names(context):
        return None
    return CONTEXT_NAME
