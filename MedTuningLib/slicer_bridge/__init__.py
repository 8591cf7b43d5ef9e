"""Slicer-free parts of the 3D Slicer module (``MedTuning/MedTuning.py``).

The module wires Qt widgets to :mod:`MedTuningLib.mrml` (MRML nodes <-> files <-> backend jobs, on
Slicer's own classes), which builds on this package: building backend command lines, reading the
backend's JSON-lines events into a progress state, running and cancelling the backend process
(also behind the ``PythonSlicer`` launcher), naming exported files, settings, the backend's
environment and model discovery. This package imports neither ``slicer`` nor ``qt`` nor ``torch``
(standard library only, Python 3.9 compatible) and is tested with pytest against the real backend.
"""

from MedTuningLib.slicer_bridge.commands import (CaseAddParams, EvaluateParams, InfoParams, SegmentParams,
                                                 TrainParams, backend_argv)
from MedTuningLib.slicer_bridge.events import EventReader, RunState
from MedTuningLib.slicer_bridge.process import BackendProcess, ExitKind, exit_kind

__all__ = [
    "BackendProcess", "CaseAddParams", "EvaluateParams", "EventReader", "ExitKind", "InfoParams", "RunState",
    "SegmentParams", "TrainParams", "backend_argv", "exit_kind",
]
