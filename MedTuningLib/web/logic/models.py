"""The model list: folders under ``--models`` as the Slicer module discovers them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from MedTuningLib.slicer_bridge.settings import ModelInfo, discover_models, read_model_info


def _hex(color: Optional[tuple]) -> str:
    if not color:
        return "#9e9e9e"
    return "#" + "".join(f"{max(0, min(255, round(c * 255))):02x}" for c in color[:3])


def model_row(info: ModelInfo) -> dict:
    """What the list shows for one model folder."""
    weights = info.path / "weights.safetensors"
    size_mb = weights.stat().st_size / 2**20 if weights.is_file() else 0.0
    try:  # the parameter counts are not part of the bridge's ModelInfo
        manifest = json.loads((info.path / "medtuning.json").read_text(encoding="utf-8"))
        tuned = (manifest.get("parameters") or {}).get("tuned")
    except (OSError, ValueError, AttributeError):
        tuned = None
    best = (info.summary.get("best") or {}) if isinstance(info.summary.get("best"), dict) else {}
    mean = best.get("dice/mean")
    return {"path": str(info.path), "name": info.name, "task": info.task or "custom",
            "modalities": list(info.modalities), "usable": info.usable, "problem": info.problem,
            "segments": [{"name": s.name, "color": _hex(s.color)} for s in info.segments],
            "pretrained": info.pretrained is not False, "method": info.method, "architecture": info.architecture,
            "size": f"{size_mb:.1f} MB" + (f" · {tuned / 1e6:.2f} M tuned parameters" if isinstance(tuned, (int, float)) else ""),
            "dice": f"best validation Dice {mean:.3f}" if isinstance(mean, (int, float)) else ""}


class ModelsLogic:
    def __init__(self, server: Any, models_dir: Path) -> None:
        self.server = server
        self.models_dir = models_dir
        self.listeners: list = []  # called with the selected ModelInfo (or None)
        server.state.mt_models = []
        server.state.mt_model_path = None
        server.state.change("mt_model_path")(self._on_selected)
        self.refresh()

    def refresh(self, select: Optional[Path] = None) -> None:
        rows = [model_row(m) for m in discover_models(self.models_dir)]
        state = self.server.state
        state.mt_models = rows
        paths = [r["path"] for r in rows if r["usable"]]
        wanted = str(select) if select is not None else state.mt_model_path
        state.mt_model_path = wanted if wanted in paths else (paths[0] if paths else None)
        self._on_selected(state.mt_model_path)

    def selected(self) -> Optional[ModelInfo]:
        path = self.server.state.mt_model_path
        info = read_model_info(path) if path else None
        return info if info is not None and info.usable else None

    def _on_selected(self, mt_model_path: Optional[str] = None, **_: Any) -> None:
        info = self.selected()
        for listener in self.listeners:
            listener(info)
