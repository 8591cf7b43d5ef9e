"""My cases: the corrected result becomes a case of the library (``cases add``); the cases table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from MedTuningLib.mrml.logic import MedTuningMrmlLogic

CASES_MANIFEST = "cases.json"


def _effort_text(effort: Any) -> str:
    """``right lung: Dice 0.981, +120 / -35 voxels`` per corrected segment (the correction-loop record)."""
    if not isinstance(effort, dict):
        return ""
    parts = []
    for name, entry in effort.items():
        if not isinstance(entry, dict):
            continue
        dice = entry.get("dice")
        text = f"{name}: " + (f"Dice {float(dice):.3f}, " if isinstance(dice, (int, float)) else "")
        parts.append(text + f"+{int(entry.get('voxels_added') or 0)} / -{int(entry.get('voxels_removed') or 0)} voxels")
    return "; ".join(parts)


def case_rows(library: Path) -> list[dict]:
    """The table's rows: id, split, modalities, provenance (from, when, source, model) and correction effort."""
    path = library / CASES_MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return [{"id": "?", "split": "", "modalities": "", "provenance": f"{path} cannot be read", "effort": ""}]
    rows = []
    for case in (manifest.get("cases") if isinstance(manifest, dict) else None) or []:
        if not isinstance(case, dict):
            continue
        images = case.get("images") or {}
        prov = case.get("provenance") if isinstance(case.get("provenance"), dict) else {}
        kind = str(prov.get("from") or prov.get("kind") or "")
        where = ", ".join(str(x) for x in (prov.get("added", "")[:16].replace("T", " "), prov.get("source"),
                                             Path(str(prov["from_model"])).name if prov.get("from_model") else "")
                          if x)
        rows.append({"id": str(case.get("id", "?")), "split": str(case.get("split", "")),
                     "modalities": ", ".join(images) if isinstance(images, dict) else "",
                     "provenance": kind + (f" ({where})" if where else ""), "effort": _effort_text(prov.get("effort"))})
    return rows


class CasesLogic:
    def __init__(self, server: Any, logic: MedTuningMrmlLogic, jobs: Any, segment: Any) -> None:
        self.server = server
        self.logic = logic
        self.jobs = jobs
        self.segment = segment
        server.state.mt_split = "train"
        server.state.mt_case_id = ""
        self.refresh()

    @property
    def library(self) -> Path:
        return self.logic.settings.resolved_cases_dir()

    def refresh(self) -> None:
        self.server.state.mt_cases = case_rows(self.library)

    def add_result(self) -> None:
        """Add the corrected result and its scans as a ``correction`` case (split from the page)."""
        seg = self.segment
        if seg.result is None or seg.result_model is None:
            self.jobs.show_error("EMPTY_LABEL", "there is no result to add yet", "segment a scan first, then correct it")
            return
        split = self.server.state.mt_split or "train"
        case_id = (self.server.state.mt_case_id or "").strip() or None

        def start():
            return self.logic.start_add_cases([(seg.result_volumes, seg.result, split)], seg.result_model.modalities,
                                              "correction", case_id=case_id, source=f"browser: {seg.result.GetName()}")

        self.jobs.start("cases", start, after=self._finished)

    def add_unlabelled(self, volumes: list[Any], modalities: list[str]) -> None:
        """Add the chosen scan(s) without a label (split ``unlabelled``): never trained on, ranked by "Next scan
        to correct"."""
        if not volumes or any(v is None for v in volumes):
            self.jobs.show_error("MODALITY_COUNT_MISMATCH",
                                 f"choose a scan for every modality: {', '.join(modalities)}",
                                 "load the scan(s) and choose them in the lists")
            return
        self.jobs.start("cases", lambda: self.logic.start_add_cases([(volumes, None, "unlabelled")], modalities),
                        after=self._finished)

    def _finished(self, job: Any) -> None:
        self.refresh()
        if job.ok:
            self.server.state.mt_case_id = ""
            self.jobs.notice(f"Added to my cases ({self.library}); {len(self.server.state.mt_cases)} case(s) now.")
