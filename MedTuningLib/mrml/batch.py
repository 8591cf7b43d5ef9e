"""Segment many scans of the scene in one backend job (``medtuning segment --batch-list``).

Each scan is one volume per modality of the model (in its channel order). The volumes are exported,
a batch CSV is written with :func:`~MedTuningLib.slicer_bridge.commands.write_batch_csv`, and one
``segment`` process loads the model once and segments them in turn. :class:`BatchSegmentation`
loads each result into its own new segmentation node (named after the scan's first volume,
on that volume's geometry) as soon as the backend reports the scan done, so a long batch shows
results while it runs; a scan the backend refused is kept in :attr:`BatchSegmentation.failures`
with its error code, and the other scans still load.

DICOM studies: Slicer's DICOM plugins give each loaded volume the ``DICOM.instanceUIDs`` attribute;
:func:`study_volumes` groups the scene's volumes by the StudyInstanceUID that Slicer's DICOM
database (``slicer.dicomDatabase``) holds for those instances.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from MedTuningLib.mrml.context import MrmlContext
from MedTuningLib.mrml.jobs import Job
from MedTuningLib.mrml.nodes import is_labelmap, is_volume, load_result
from MedTuningLib.slicer_bridge.process import CommandChain

log = logging.getLogger("MedTuning")

#: DICOM tag of StudyInstanceUID, as ``ctkDICOMDatabase.instanceValue`` takes it.
STUDY_INSTANCE_UID_TAG = "0020,000D"


@dataclass
class BatchScanNodes:
    """One scan of a batch: its volumes (modality order), the backend's id for it and its result file."""

    id: str
    volumes: List[Any]
    out: Path
    name: str


@dataclass
class ScanFailure:
    """A scan the backend could not segment: its error code, message and hint."""

    code: str
    message: str
    hint: str = ""


class BatchSegmentation(Job):
    """A ``segment --batch-list`` job that loads each finished scan into its own segmentation node.

    ``result`` (once completed) is the list of loaded nodes in scan order; ``nodes`` maps scan id to
    node as they arrive; ``failures`` maps scan id to :class:`ScanFailure`. ``failure`` (the job's
    message) says which scans failed; ``ok`` is True only when every scan was segmented and loaded.
    ``on_scan(scan, node_or_None, failure_or_None)`` runs for each scan as it finishes.
    """

    def __init__(self, chain: CommandChain, temp_dir: Path, context: MrmlContext, scans: Sequence[BatchScanNodes],
                 load: Callable[[BatchScanNodes], Any],
                 on_scan: Optional[Callable[[BatchScanNodes, Any, Optional[ScanFailure]], None]] = None) -> None:
        super().__init__("segment", chain, temp_dir, lambda state: None)
        self.context = context
        self.scans = list(scans)
        self._by_id = {scan.id: scan for scan in self.scans}
        self._load = load
        self.on_scan = on_scan
        self.nodes: Dict[str, Any] = {}
        self.failures: Dict[str, ScanFailure] = {}
        self._reasons: Dict[str, ScanFailure] = {}

    @property
    def done_count(self) -> int:
        return len(self.nodes) + len(self.failures)

    def poll(self) -> List[dict]:
        events = self.chain.poll()
        for event in events:
            self._take(event)
        if self.chain.finished and not self.completed:
            self._complete()
        return events

    def _take(self, event: dict) -> None:
        scan = self._by_id.get(str(event.get("scan", "")))
        if scan is None:
            return
        if event.get("event") == "log" and event.get("code"):  # why the scan failed (before its progress)
            self._reasons[scan.id] = ScanFailure(str(event["code"]), str(event.get("message") or ""),
                                                 str(event.get("hint") or ""))
        elif event.get("event") == "progress" and event.get("phase") == "batch":
            status = event.get("status")
            if status == "ok":
                self._load_scan(scan)
            elif status == "failed":
                self._fail(scan, self._reasons.get(scan.id) or ScanFailure("INTERNAL_ERROR", "the scan failed"))

    def _load_scan(self, scan: BatchScanNodes) -> None:
        if scan.id in self.nodes or scan.id in self.failures:
            return
        try:
            node = self._load(scan)
        except Exception as exc:  # noqa: BLE001 - one unreadable result must not lose the others
            log.exception("MedTuning: loading the result of %s failed", scan.name)
            self._fail(scan, ScanFailure("RESULT_UNREADABLE", str(exc)))
            return
        self.nodes[scan.id] = node
        if self.on_scan is not None:
            self.on_scan(scan, node, None)

    def _fail(self, scan: BatchScanNodes, failure: ScanFailure) -> None:
        if scan.id in self.nodes or scan.id in self.failures:
            return
        self.failures[scan.id] = failure
        if self.on_scan is not None:
            self.on_scan(scan, None, failure)

    def _complete(self) -> None:
        self.completed = True
        try:
            state = self.state
            for scan in self.scans:  # a scan whose progress event was lost but whose result is complete
                if scan.id not in self.nodes and scan.id not in self.failures and scan.out.is_file() and \
                        state.error_code in ("", "BATCH_INCOMPLETE"):
                    self._load_scan(scan)
            if not self.cancel_requested:  # the run stopped before these scans (e.g. the model is unusable)
                for scan in self.scans:
                    if scan.id not in self.nodes and scan.id not in self.failures:
                        self._fail(scan, ScanFailure(state.error_code or "PROCESS_ENDED",
                                                     state.error_message or "the batch stopped before this scan",
                                                     state.error_hint))
            self.result = [self.nodes[s.id] for s in self.scans if s.id in self.nodes]
            if self.failures:
                listing = "; ".join(f"{self._by_id[i].name} [{f.code}]: {f.message}" for i, f in self.failures.items())
                self.failure = f"{len(self.failures)} of {len(self.scans)} scan(s) failed: {listing}"
        except Exception as exc:  # noqa: BLE001 - shown to the user, logged with the traceback
            log.exception("MedTuning: loading the results failed")
            self.failure = str(exc)
        finally:
            self._cleanup()

    @property
    def ok(self) -> bool:
        return self.completed and not self.failures and not self.failure and len(self.nodes) == len(self.scans)


def scan_volumes(scans: Sequence[Any]) -> List[List[Any]]:
    """``[volume, ...]`` (one-modality models) or ``[[volumes of scan 1], ...]`` as lists of volumes."""
    return [[item] if hasattr(item, "IsA") else list(item) for item in scans]


def scene_volumes(context: MrmlContext) -> List[Any]:
    """Every scalar volume of the scene that has voxels (labelmaps excluded), in scene order."""
    collection = context.scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    return [n for n in nodes if is_volume(n) and not is_labelmap(n) and n.GetImageData() is not None]


def dicom_study_uid(volume: Any, database: Any) -> str:
    """The StudyInstanceUID of a volume loaded from DICOM (empty when it was not, or is unknown)."""
    uids = (volume.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids or database is None:
        return ""
    return str(database.instanceValue(uids[0], STUDY_INSTANCE_UID_TAG) or "").strip()


def study_volumes(context: MrmlContext, volume: Any, database: Any) -> List[Any]:
    """The scene's volumes from the same DICOM study as ``volume`` (``database``: ``slicer.dicomDatabase``)."""
    study = dicom_study_uid(volume, database)
    if not study:
        return []
    return [v for v in scene_volumes(context) if dicom_study_uid(v, database) == study]
