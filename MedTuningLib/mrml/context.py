"""Where the MRML scene and Slicer's module logics come from: the running 3D Slicer, or slicer-core.

Inside 3D Slicer the scene is ``slicer.mrmlScene`` and every module logic is registered with the
application logic (``slicer.app.applicationLogic().GetModuleLogic("Segmentations")``, Slicer's
``qSlicerModuleFactoryManager`` does that when it loads a module). Outside Slicer (the browser app,
the tests) slicer-core gives the same VTK classes but no application: :meth:`MrmlContext.standalone`
builds a scene, an application logic and the logics MedTuning needs and registers them the same
way, as trame-slicer's ``SlicerApp`` does. Everything else in :mod:`MedTuningLib.mrml` takes a
context and never looks at ``slicer.app`` itself.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import slicer

PathLike = Union[str, "os.PathLike[str]"]


class MrmlError(RuntimeError):
    """An MRML operation failed (a node could not be written or read, an input is unusable).

    The message says what went wrong and what to do; the Slicer module shows it as it is. ``code``, where given,
    is the backend's error code for the same fault (MedTuningLib.errors), for front ends that show codes.
    """

    def __init__(self, message: str, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.code = code


class MrmlContext:
    """A scene plus the application logic its module logics are registered with.

    ``temp_root`` is where job folders are made (Slicer's temporary folder inside Slicer).
    """

    def __init__(self, scene: Any, app_logic: Any = None, temp_root: Optional[PathLike] = None) -> None:
        self.scene = scene
        self.app_logic = app_logic
        self.temp_root = Path(temp_root) if temp_root else None
        self._own_logics: Dict[str, Any] = {}

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_slicer(cls) -> "MrmlContext":
        """The running 3D Slicer's scene, application logic and temporary folder."""
        app = getattr(slicer, "app", None)
        if app is None:
            raise MrmlError("not running inside 3D Slicer (slicer.app is missing); use MrmlContext.standalone()")
        return cls(slicer.mrmlScene, app.applicationLogic(), app.temporaryPath)

    @classmethod
    def standalone(cls, terminology_share_dir: Optional[PathLike] = None,
                   temp_root: Optional[PathLike] = None) -> "MrmlContext":
        """A new scene with an application logic and the Segmentations / Terminologies logics (slicer-core).

        ``terminology_share_dir`` holds Slicer's default ``*.term.json`` files (trame-slicer ships
        them in ``trame_slicer/resources/terminologies``); without it only MedTuning's own context
        is loaded when asked for.
        """
        scene = slicer.vtkMRMLScene()
        app_logic = slicer.vtkSlicerApplicationLogic()
        app_logic.SetMRMLScene(scene)
        app_logic.GetColorLogic().SetMRMLScene(scene)
        app_logic.GetColorLogic().AddDefaultColorNodes()  # labelmap volumes need a colour table
        context = cls(scene, app_logic, temp_root)
        terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
        if terminology_share_dir is not None:  # before the scene: the defaults are loaded then
            terminologies.SetModuleShareDirectory(Path(terminology_share_dir).as_posix())
        context.register_logic("Terminologies", terminologies)
        context.register_logic("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic())
        return context

    def register_logic(self, name: str, logic: Any) -> Any:
        """Give ``logic`` this scene and register it under ``name`` (as Slicer does for its modules)."""
        logic.SetMRMLScene(self.scene)
        if self.app_logic is not None:
            logic.SetMRMLApplicationLogic(self.app_logic)
            self.app_logic.SetModuleLogic(name, logic)
        self._own_logics[name] = logic
        return logic

    # -- module logics ---------------------------------------------------------------------------
    def module_logic(self, name: str) -> Any:
        """The registered logic of module ``name`` (e.g. ``"Segmentations"``), or None."""
        if self.app_logic is not None:
            logic = self.app_logic.GetModuleLogic(name)
            if logic is not None:
                return logic
        return self._own_logics.get(name)

    def segmentations_logic(self) -> Any:
        """``vtkSlicerSegmentationsModuleLogic`` of this scene (made and registered when missing)."""
        return self.module_logic("Segmentations") or self.register_logic(
            "Segmentations", slicer.vtkSlicerSegmentationsModuleLogic())

    def terminologies_logic(self) -> Any:
        """``vtkSlicerTerminologiesModuleLogic``, or None where this Slicer has no Terminologies module."""
        logic = self.module_logic("Terminologies")
        if logic is None and hasattr(slicer, "vtkSlicerTerminologiesModuleLogic"):
            logic = self.register_logic("Terminologies", slicer.vtkSlicerTerminologiesModuleLogic())
        return logic

    # -- files -----------------------------------------------------------------------------------
    def new_temp_dir(self, prefix: str = "MedTuning-") -> Path:
        """A new, empty folder for one job's files."""
        root = self.temp_root
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=str(root) if root is not None else None))

    def node(self, node_id: Optional[str]) -> Any:
        """The node with this id, or None (also for None / an id of a deleted node)."""
        return self.scene.GetNodeByID(node_id) if node_id else None
