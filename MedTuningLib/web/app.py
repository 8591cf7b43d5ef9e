"""``medtuning web``: trame-slicer's :class:`SlicerApp` + MedTuning's logic classes + :class:`MedTuningUI`.

Composition as in trame-slicer's ``segmentation_app.py``: the logic classes are built on the
SlicerApp, the UI is built on the logic's layout manager, then each logic connects to the UI.
One scene per server process: every browser tab of one server sees the same scans and results.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from trame.app import TrameApp, get_server
from trame_slicer import module as trame_slicer_module
from trame_slicer.app.logic import LayoutButtonLogic
from trame_slicer.app.logic.segmentation import SegmentEditorLogic
from trame_slicer.core import SlicerApp
from trame_slicer.rca_view import register_rca_factories

from MedTuningLib.errors import MedTuningError
from MedTuningLib.mrml.context import MrmlContext
from MedTuningLib.mrml.logic import MedTuningMrmlLogic
from MedTuningLib.slicer_bridge.settings import BridgeSettings
from MedTuningLib.web.access import QUERY_NAME, token_middleware
from MedTuningLib.web.logic.cases import CasesLogic
from MedTuningLib.web.logic.jobs import JobRunner
from MedTuningLib.web.logic.models import ModelsLogic
from MedTuningLib.web.logic.scans import ScansLogic
from MedTuningLib.web.logic.segment import SegmentLogic
from MedTuningLib.web.logic.tune import TuneLogic
from MedTuningLib.web.ui import MedTuningUI

log = logging.getLogger("MedTuning.web")


@dataclass
class WebConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    token: Optional[str] = None
    models_dir: Path = Path("models")
    cases_dir: Path = Path("cases")
    python: str = sys.executable
    device: str = "auto"
    scans_dir: Optional[Path] = None
    work_dir: Optional[Path] = None  # uploads, job folders, kept results (a new temporary folder by default)
    bound_port: Optional[int] = None

    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "localhost") else self.host
        host = f"[{host}]" if ":" in host else host
        url = f"http://{host}:{self.bound_port or self.port}/"
        return url + (f"?{QUERY_NAME}={self.token}" if self.token else "")


class MedTuningWebApp(TrameApp):
    def __init__(self, config: WebConfig, server: Any = None) -> None:
        super().__init__(server)
        self.config = config
        self.server.enable_module(trame_slicer_module)
        self._own_work_dir = config.work_dir is None  # a temporary folder of ours: removed at exit
        work = config.work_dir or Path(tempfile.mkdtemp(prefix="medtuning-web-"))
        work.mkdir(parents=True, exist_ok=True)
        self.work_dir = work
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, self.server)

        # The MRML logic the 3D Slicer module uses, on trame-slicer's scene.
        context = MrmlContext(self.slicer_app.scene, self.slicer_app.app_logic, temp_root=work / "jobs")
        settings = BridgeSettings(backend_python=config.python, models_dir=str(config.models_dir),
                                  cases_dir=str(config.cases_dir), device=config.device)
        self.mrml = MedTuningMrmlLogic(context, settings, python=config.python)

        # trame-slicer's own logic: layouts, the segment editor and its effects (paint, erase,
        # scissors, islands, threshold, ...) with undo.
        self.layout_logic = LayoutButtonLogic(self.server, self.slicer_app)
        self.editor_logic = SegmentEditorLogic(self.server, self.slicer_app)

        self.jobs = JobRunner(self.server)
        self.scans = ScansLogic(self.server, self.slicer_app, self.jobs, work, config.scans_dir)
        self.models = ModelsLogic(self.server, config.models_dir)
        self.segment = SegmentLogic(self.server, self.slicer_app, self.mrml, self.jobs, self.scans, self.models)
        self.cases = CasesLogic(self.server, self.mrml, self.jobs, self.segment)
        self.tune = TuneLogic(self.server, self.mrml, self.jobs, self.models, self.cases)

        self.ui = MedTuningUI(self.server, self.layout_logic.layout_manager, self._download_result,
                              self._download_scene, str(config.scans_dir or ""))
        self._connect()
        state = self.server.state
        state.trame__title = "MedTuning"
        state.mt_tab = "scans"

    def _connect(self) -> None:
        ui = self.ui
        self.layout_logic.set_ui(ui.layout_button)
        self.editor_logic.set_ui(ui.editor)
        ui.upload_button.on_load_volume.connect(self.scans.on_upload)
        ui.open_server_file_clicked.connect(self.scans.open_server_file)
        ui.segment_clicked.connect(self.segment.segment)
        ui.cancel_clicked.connect(self.jobs.cancel)
        ui.add_case_clicked.connect(self.cases.add_result)
        ui.fine_tune_clicked.connect(self.tune.fine_tune)
        ui.retune_clicked.connect(self.tune.retune)
        ui.next_scan_clicked.connect(self.segment.next_scan)
        ui.add_unlabelled_clicked.connect(self._add_unlabelled)
        ui.refresh_clicked.connect(self._refresh)
        self.scans.listeners.append(self._on_volume_loaded)
        self.models.listeners.append(self._on_model_selected)
        self._on_model_selected(self.models.selected())

    def _add_unlabelled(self) -> None:
        model = self.models.selected()
        modalities = model.modalities if model else []
        self.cases.add_unlabelled(self.scans.inputs(modalities), modalities)

    def _refresh(self) -> None:
        self.models.refresh()
        self.cases.refresh()
        self.scans.refresh_server_files()

    def _on_volume_loaded(self, _volume: Any) -> None:
        self.server.state.is_volume_loaded = True
        model = self.models.selected()
        self.scans.assign_defaults(model.modalities if model else [])

    def _on_model_selected(self, model: Any) -> None:
        self.scans.assign_defaults(model.modalities if model else [])

    async def _download_result(self) -> Any:
        data = self.segment.result_bytes()
        return self.server.protocol.addAttachment(data) if data is not None else None

    async def _download_scene(self) -> Any:
        """The whole scene (scans, results, corrections) as a Slicer .mrb, to open in 3D Slicer."""
        folder = self.mrml.context.new_temp_dir("scene-")
        try:
            path = folder / "scene.mrb"
            if not self.slicer_app.io_manager.write_scene(path) or not path.is_file():
                with self.server.state:
                    self.jobs.show_error("OUTPUT_NOT_WRITABLE", "the scene could not be written as .mrb",
                                         "check the free space of the server's temporary folder")
                return None
            return self.server.protocol.addAttachment(path.read_bytes())
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        """Stop a running backend job (the server is going away) and remove our temporary folder."""
        stopped = self.jobs.close()
        if self._own_work_dir and stopped is not False:  # a backend that could not be stopped keeps its files
            shutil.rmtree(self.work_dir, ignore_errors=True)


def serve(config: WebConfig, ready: Callable[[str], None], cancel: Any = None) -> None:
    """Build the app and serve it until interrupted (Ctrl+C / SIGTERM)."""
    server = get_server(name="medtuning-web", client_type="vue3")
    app = MedTuningWebApp(config, server)
    if config.token:
        # Routes and middlewares can be added until the web server starts (wslink calls this first).
        server.controller.on_server_bind.add(lambda ws: ws.app.middlewares.append(token_middleware(config.token)))

    def on_ready(**_: Any) -> None:
        config.bound_port = server.port
        # SIGINT / SIGTERM stop the server cleanly (the running backend job is stopped in close()).
        loop = asyncio.get_event_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
        ready(config.url())

    server.controller.on_server_ready.add(on_ready)
    argv = sys.argv
    sys.argv = argv[:1]  # trame parses the command line too: ours is not for it
    try:
        server.start(host=config.host, port=config.port, open_browser=False, show_connection_info=False,
                     disable_logging=True, timeout=0)
    except OSError as exc:  # lost the port between the check and the bind
        raise MedTuningError("WEB_PORT_IN_USE", f"port {config.port} on {config.host} could not be bound ({exc})",
                             "choose another port with --port") from exc
    finally:
        sys.argv = argv
        app.close()
