"""Slicer-free parts of the 3D Slicer module (``MedTuning/MedTuning.py``).

The module is a thin shell: it turns MRML nodes into files and back. Everything else it needs —
building backend command lines, reading the backend's JSON-lines events into a progress state,
running and cancelling the backend process, naming exported files, settings and model discovery —
lives here, imports neither ``slicer`` nor ``qt`` nor ``torch``, and is tested with pytest against
the real backend process.
"""

from MedTuningLib.slicer_bridge.commands import (CaseAddParams, EvaluateParams, InfoParams, SegmentParams,
                                                 TrainParams, backend_argv)
from MedTuningLib.slicer_bridge.events import EventReader, RunState
from MedTuningLib.slicer_bridge.process import BackendProcess, ExitKind, exit_kind

__all__ = [
    "BackendProcess", "CaseAddParams", "EvaluateParams", "EventReader", "ExitKind", "InfoParams", "RunState",
    "SegmentParams", "TrainParams", "backend_argv", "exit_kind",
]
