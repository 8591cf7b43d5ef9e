"""Typed, versioned records of MedTuning's own files, and the names lists used everywhere.

Three records are written by MedTuning and read back by the backend, the command line, the Slicer
bridge and the browser app:

- :class:`ModelManifest`: a model folder's ``medtuning.json`` (architecture, method, base weights,
  modalities, preprocessing, label scheme, training summary, held-out test scores and the history
  of correction rounds);
- :class:`CaseManifest`: a case library's ``cases.json`` (:class:`CaseRecord` per case, with its
  :class:`Provenance` and, for corrected cases, the :class:`SegmentEffort` of the correction);
- :class:`EvaluationReport`: ``report.json`` of ``medtuning evaluate`` (also kept in the model folder).

Every record has ``to_dict`` / ``from_dict``. Reading keeps fields this version does not know (in
``extra``, written back unchanged), reads older format versions and refuses newer ones with the
catalogue's codes (MODEL_FOLDER_TOO_NEW, LIBRARY_TOO_NEW). Nested parts that belong to other modules
(architecture → :class:`MedTuningLib.models.ModelConfig`, label scheme →
:class:`MedTuningLib.data.labels.LabelScheme`, preprocessing) stay plain JSON objects here and are
typed by those modules, so this module imports only the standard library and stays importable
inside 3D Slicer (Python 3.9).

Format versions: 1 (MedTuning 0.1.0 before the correction loop); 2 adds the model's ``history`` and
``test`` scores, unlabelled cases (``label`` null, split ``unlabelled``) and correction effort. A
version-1 file reads as version 2 with those parts empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from MedTuningLib.errors import MedTuningError

#: The version this release writes (model folders, case libraries, reports); it reads 1 up to this.
FORMAT_VERSION = 2
#: Largest crop size along one axis a model folder may record (as the command line's --crop; issue 15).
MAX_CROP = 4096

# -- the names lists (the CLI, the bridge and the engine import them from here) -----------------
ARCHS = ("vit_upernet", "swin_unet", "vit_setr_naive", "vit_setr_pup", "vit_setr_mla", "vit_unet", "swin_unetr")
METHODS = ("med_tuning", "full", "head", "scratch", "vpt_shallow", "vpt_deep", "adapter", "adaptformer",
           "st_adapter", "pro_tuning")
TASKS = ("kits", "brats", "custom")
SOURCE_LABELS = ("brats2015", "brats2019", "brats2023")
#: Splits of labelled cases; ``test`` is never trained on nor used to pick the best epoch.
LABELLED_SPLITS = ("train", "val", "test")
#: ``unlabelled``: scans without a label, never trained on; ``medtuning suggest`` ranks them.
SPLITS = LABELLED_SPLITS + ("unlabelled",)
PROVENANCES = ("import", "scene", "correction")


def _version(data: Mapping[str, Any], where: str, invalid: str, too_new: str, what: str,
             required: bool = True) -> int:
    """The record's ``format_version`` (1 when an optional one is missing); newer ones refused."""
    version = data.get("format_version")
    if version is None and not required:
        return 1
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MedTuningError(invalid, f"{where} has no valid format_version", f"restore the {what} from a backup")
    if version > FORMAT_VERSION:
        from MedTuningLib import __version__

        raise MedTuningError(too_new, f"{where} has format version {version}; MedTuning {__version__} reads up to "
                             f"{FORMAT_VERSION}", f"update MedTuning to use this {what}")
    return version


def _extra(data: Mapping[str, Any], known: tuple) -> Dict[str, Any]:
    return {k: v for k, v in data.items() if k not in known}


def finite_number(value: Any) -> Optional[float]:
    """A finite float, or None for null / NaN / text."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _str_list(value: Any) -> List[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


# ================================================================================================
# case library
# ================================================================================================

@dataclass
class SegmentEffort:
    """How much a radiologist's correction changed one segment of the model's result.

    ``dice`` compares the model's segment with the corrected one (1.0: nothing changed); voxels and
    mm³ added (in the correction, not in the model's result) and removed (the other way round).
    """

    dice: Optional[float] = None
    voxels_added: int = 0
    voxels_removed: int = 0
    mm3_added: float = 0.0
    mm3_removed: float = 0.0
    model_voxels: int = 0
    corrected_voxels: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("dice", "voxels_added", "voxels_removed", "mm3_added", "mm3_removed", "model_voxels",
              "corrected_voxels")

    @property
    def voxels_changed(self) -> int:
        return self.voxels_added + self.voxels_removed

    @property
    def mm3_changed(self) -> float:
        return self.mm3_added + self.mm3_removed

    def to_dict(self) -> Dict[str, Any]:
        return {**self.extra, "dice": self.dice, "voxels_added": self.voxels_added,
                "voxels_removed": self.voxels_removed, "mm3_added": round(self.mm3_added, 3),
                "mm3_removed": round(self.mm3_removed, 3), "model_voxels": self.model_voxels,
                "corrected_voxels": self.corrected_voxels}

    @classmethod
    def from_dict(cls, data: Any) -> "SegmentEffort":
        if not isinstance(data, Mapping):
            raise ValueError("a correction effort entry is not an object")

        def whole(key: str) -> int:
            value = finite_number(data.get(key))
            return int(value) if value is not None else 0

        return cls(dice=finite_number(data.get("dice")), voxels_added=whole("voxels_added"),
                   voxels_removed=whole("voxels_removed"), mm3_added=finite_number(data.get("mm3_added")) or 0.0,
                   mm3_removed=finite_number(data.get("mm3_removed")) or 0.0, model_voxels=whole("model_voxels"),
                   corrected_voxels=whole("corrected_voxels"), extra=_extra(data, cls._KNOWN))


@dataclass
class Provenance:
    """Where a case came from: ``kind`` (JSON ``from``: import, scene or correction), when it was added,
    free-text ``source``; for a correction, the model whose result was corrected (``from_model``), that
    result's file (``model_output``) and the correction ``effort`` per segment."""

    kind: str = "import"
    added: str = ""
    source: str = ""
    from_model: Optional[str] = None
    model_output: Optional[str] = None
    effort: Dict[str, SegmentEffort] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)  # e.g. "dicom": the series read

    _KNOWN = ("from", "added", "source", "from_model", "model_output", "effort")

    def to_dict(self) -> Dict[str, Any]:
        data: Dict[str, Any] = {**self.extra, "from": self.kind, "source": self.source}
        if self.added:  # a case of an older library may not say when it was added: keep it unsaid
            data["added"] = self.added
        if self.from_model is not None:
            data["from_model"] = self.from_model
        if self.model_output is not None:
            data["model_output"] = self.model_output
        if self.effort:
            data["effort"] = {name: e.to_dict() for name, e in self.effort.items()}
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "Provenance":
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ValueError("a provenance that is not an object")
        effort = data.get("effort") or {}
        if not isinstance(effort, Mapping):
            raise ValueError("a correction effort that is not an object")
        kind = data.get("from", data.get("kind", "import"))
        return cls(kind=str(kind) if kind is not None else "import", added=str(data.get("added") or ""),
                   source=str(data.get("source") or ""),
                   from_model=str(data["from_model"]) if data.get("from_model") is not None else None,
                   model_output=str(data["model_output"]) if data.get("model_output") is not None else None,
                   effort={str(k): SegmentEffort.from_dict(v) for k, v in effort.items()},
                   extra=_extra(data, cls._KNOWN))


@dataclass
class CaseRecord:
    """One case of ``cases.json``: image file per modality (channel order), label file (None for an
    unlabelled scan), split and provenance. Paths are relative to the library folder."""

    id: str
    images: Dict[str, str]
    label: Optional[str]
    split: str = "train"
    provenance: Provenance = field(default_factory=Provenance)
    extra: Dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("id", "images", "label", "split", "provenance")

    @property
    def labelled(self) -> bool:
        return self.label is not None

    def to_dict(self) -> Dict[str, Any]:
        return {**self.extra, "id": self.id, "images": dict(self.images), "label": self.label, "split": self.split,
                "provenance": self.provenance.to_dict()}

    @classmethod
    def from_dict(cls, data: Any) -> "CaseRecord":
        """Raises ValueError saying what is wrong (the library reader turns it into LIBRARY_INVALID)."""
        if not isinstance(data, Mapping):
            raise ValueError("a case is not a JSON object")
        if not isinstance(data.get("id"), str) or not data["id"]:
            raise ValueError("a case has no id")
        images = data.get("images")
        if not isinstance(images, Mapping) or not images or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in images.items()):
            raise ValueError(f"case {data['id']!r} has no valid 'images' mapping")
        split = data.get("split", "train")
        if split not in SPLITS:
            raise ValueError(f"case {data['id']!r} has split {split!r}, not one of {SPLITS}")
        label = data.get("label")
        if label is None and split != "unlabelled":
            raise ValueError(f"case {data['id']!r} has no label path (only split 'unlabelled' may have none)")
        if label is not None and not isinstance(label, str):
            raise ValueError(f"case {data['id']!r} has a label path that is not text")
        try:
            provenance = Provenance.from_dict(data.get("provenance"))
        except ValueError as exc:
            raise ValueError(f"case {data['id']!r} has {exc}") from None
        return cls(id=data["id"], images=dict(images), label=label, split=split, provenance=provenance,
                   extra=_extra(data, cls._KNOWN))


@dataclass
class CaseManifest:
    """A case library's ``cases.json``."""

    cases: List[CaseRecord] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    medtuning_version: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("format_version", "medtuning_version", "cases")

    def to_dict(self) -> Dict[str, Any]:
        from MedTuningLib import __version__

        return {**self.extra, "format_version": FORMAT_VERSION, "medtuning_version": __version__,
                "cases": [c.to_dict() for c in self.cases]}

    @classmethod
    def from_dict(cls, data: Any, where: str = "cases.json") -> "CaseManifest":
        """LIBRARY_INVALID for a broken manifest, LIBRARY_TOO_NEW for a newer format."""
        if not isinstance(data, Mapping) or not isinstance(data.get("cases"), list):
            raise MedTuningError("LIBRARY_INVALID", f"{where} is not a MedTuning case manifest (no 'cases' list)",
                                 "restore cases.json from a backup, or start a new library folder")
        version = _version(data, where, "LIBRARY_INVALID", "LIBRARY_TOO_NEW", "case library")
        cases: List[CaseRecord] = []
        seen = set()
        for entry in data["cases"]:
            try:
                case = CaseRecord.from_dict(entry)
            except ValueError as exc:
                raise MedTuningError("LIBRARY_INVALID", f"{where}: {exc}", "restore cases.json from a backup") from exc
            if case.id in seen:
                raise MedTuningError("LIBRARY_INVALID", f"{where} lists case {case.id!r} twice",
                                     "remove the duplicate entry from cases.json")
            seen.add(case.id)
            cases.append(case)
        return cls(cases=cases, format_version=version, medtuning_version=str(data.get("medtuning_version") or ""),
                   extra=_extra(data, cls._KNOWN))


# ================================================================================================
# evaluation report
# ================================================================================================

@dataclass
class CaseScores:
    """One case's scores: ``{"dice/<region>": ..., "hd95/<region>": ...}`` (null where undefined)."""

    id: str
    metrics: Dict[str, Optional[float]] = field(default_factory=dict)
    seconds: Optional[float] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("id", "metrics", "seconds")

    def to_dict(self) -> Dict[str, Any]:
        data = {**self.extra, "id": self.id, "metrics": dict(self.metrics)}
        if self.seconds is not None:
            data["seconds"] = self.seconds
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "CaseScores":
        if not isinstance(data, Mapping) or not isinstance(data.get("id"), str):
            raise ValueError("a case's scores have no case id")
        metrics = data.get("metrics") or {}
        if not isinstance(metrics, Mapping):
            raise ValueError(f"the scores of case {data['id']!r} are not an object")
        return cls(id=data["id"], metrics={str(k): finite_number(v) for k, v in metrics.items()},
                   seconds=finite_number(data.get("seconds")), extra=_extra(data, cls._KNOWN))


def summarise_scores(cases: List[CaseScores]) -> Dict[str, Dict[str, Any]]:
    """Mean, standard deviation and count over cases for every metric (nulls left out)."""
    names: List[str] = []
    for case in cases:
        names += [n for n in case.metrics if n not in names]
    summary = {}
    for name in names:
        values = [v for v in (c.metrics.get(name) for c in cases) if v is not None]
        mean = sum(values) / len(values) if values else None
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) if values else None
        summary[name] = {"mean": mean, "std": std, "n": len(values)}
    return summary


@dataclass
class EvaluationReport:
    """Scores of a model on cases of a library: ``report.json`` and the model folder's ``test``."""

    model: str = ""
    library: str = ""
    split: str = "test"
    regions: List[str] = field(default_factory=list)
    cases: List[CaseScores] = field(default_factory=list)
    summary: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    protocol: str = ""
    tta: bool = False
    pretrained: Optional[bool] = None
    created: str = ""
    format_version: int = FORMAT_VERSION
    extra: Dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("format_version", "model", "library", "split", "regions", "cases", "summary", "protocol", "tta",
              "pretrained", "created")

    @property
    def case_ids(self) -> List[str]:
        return [c.id for c in self.cases]

    def mean(self, metric: str) -> Optional[float]:
        """The mean over cases of ``metric`` (e.g. ``"dice/Spleen"``), or None."""
        entry = self.summary.get(metric)
        return finite_number(entry.get("mean")) if isinstance(entry, Mapping) else finite_number(entry)

    def to_dict(self) -> Dict[str, Any]:
        data = {**self.extra, "format_version": FORMAT_VERSION, "model": self.model, "library": self.library,
                "split": self.split, "regions": list(self.regions), "tta": self.tta, "protocol": self.protocol,
                "cases": [c.to_dict() for c in self.cases], "summary": self.summary}
        if self.pretrained is not None:
            data["pretrained"] = self.pretrained
        if self.created:
            data["created"] = self.created
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "report.json") -> "EvaluationReport":
        """MODEL_FOLDER_INVALID for a broken report, MODEL_FOLDER_TOO_NEW for a newer one (version 1
        reports of MedTuning 0.1.0 had no format_version)."""
        if not isinstance(data, Mapping):
            raise MedTuningError("MODEL_FOLDER_INVALID", f"{where} is not an evaluation report",
                                 "evaluate the model again ('medtuning evaluate')")
        version = _version(data, where, "MODEL_FOLDER_INVALID", "MODEL_FOLDER_TOO_NEW", "report", required=False)
        try:
            cases = [CaseScores.from_dict(c) for c in data.get("cases") or []]
        except ValueError as exc:
            raise MedTuningError("MODEL_FOLDER_INVALID", f"{where}: {exc}",
                                 "evaluate the model again ('medtuning evaluate')") from exc
        summary = data.get("summary")
        summary = dict(summary) if isinstance(summary, Mapping) else summarise_scores(cases)
        pretrained = data.get("pretrained")
        return cls(model=str(data.get("model") or ""), library=str(data.get("library") or ""),
                   split=str(data.get("split") or ""), regions=_str_list(data.get("regions")), cases=cases,
                   summary=summary, protocol=str(data.get("protocol") or ""), tta=bool(data.get("tta", False)),
                   pretrained=pretrained if isinstance(pretrained, bool) else None,
                   created=str(data.get("created") or ""), format_version=version, extra=_extra(data, cls._KNOWN))


# ================================================================================================
# model folder
# ================================================================================================

@dataclass
class RoundRecord:
    """One training round of a model's lineage (round 0: trained from scratch / base weights; each
    re-tune or ``--init-from`` adds one): what it trained on, its held-out test scores and the effort
    of the corrections added since the round before."""

    round: int = 0
    model: str = ""
    created: str = ""
    init_from: Optional[str] = None
    train_cases: List[str] = field(default_factory=list)
    new_cases: List[str] = field(default_factory=list)
    epochs: Optional[int] = None
    seconds: Optional[float] = None
    test: Optional[EvaluationReport] = None
    effort: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # segment -> totals (see correction_totals)
    extra: Dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("round", "model", "created", "init_from", "train_cases", "new_cases", "epochs", "seconds", "test",
              "effort")

    def to_dict(self) -> Dict[str, Any]:
        return {**self.extra, "round": self.round, "model": self.model, "created": self.created,
                "init_from": self.init_from, "train_cases": list(self.train_cases),
                "new_cases": list(self.new_cases), "epochs": self.epochs, "seconds": self.seconds,
                "test": self.test.to_dict() if self.test is not None else None, "effort": dict(self.effort)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "medtuning.json") -> "RoundRecord":
        if not isinstance(data, Mapping):
            raise MedTuningError("MODEL_FOLDER_INVALID", f"{where}: a history entry is not an object",
                                 "the model folder is damaged: train it again or copy it again")
        test = data.get("test")
        epochs = finite_number(data.get("epochs"))
        effort = data.get("effort")
        return cls(round=int(finite_number(data.get("round")) or 0), model=str(data.get("model") or ""),
                   created=str(data.get("created") or ""),
                   init_from=str(data["init_from"]) if data.get("init_from") else None,
                   train_cases=_str_list(data.get("train_cases")), new_cases=_str_list(data.get("new_cases")),
                   epochs=int(epochs) if epochs is not None else None, seconds=finite_number(data.get("seconds")),
                   test=EvaluationReport.from_dict(test, where) if isinstance(test, Mapping) else None,
                   effort=dict(effort) if isinstance(effort, Mapping) else {}, extra=_extra(data, cls._KNOWN))


def correction_totals(efforts: List[Dict[str, SegmentEffort]]) -> Dict[str, Dict[str, Any]]:
    """Per segment over several corrected cases: mean Dice (model vs corrected), mm³ and voxels
    added / removed (sums) and the number of cases."""
    totals: Dict[str, Dict[str, Any]] = {}
    for case_effort in efforts:
        for name, e in case_effort.items():
            t = totals.setdefault(name, {"cases": 0, "dice_sum": 0.0, "dice_n": 0, "mm3_added": 0.0,
                                         "mm3_removed": 0.0, "voxels_added": 0, "voxels_removed": 0})
            t["cases"] += 1
            if e.dice is not None:
                t["dice_sum"] += e.dice
                t["dice_n"] += 1
            t["mm3_added"] += e.mm3_added
            t["mm3_removed"] += e.mm3_removed
            t["voxels_added"] += e.voxels_added
            t["voxels_removed"] += e.voxels_removed
    for t in totals.values():
        n = t.pop("dice_n")
        s = t.pop("dice_sum")
        t["dice"] = s / n if n else None
        t["mm3_added"] = round(t["mm3_added"], 3)
        t["mm3_removed"] = round(t["mm3_removed"], 3)
    return totals


@dataclass
class TrainingSummary:
    """How a model was trained: the figures reports and ``history`` read, the rest kept in ``extra``
    (batch, lr, loss, precision, device, ...)."""

    epochs: Optional[int] = None
    seconds: Optional[float] = None
    peak_memory_mb: Optional[float] = None
    best: Dict[str, Any] = field(default_factory=dict)  # validation metrics of the best epoch
    best_epoch: Optional[int] = None
    library: str = ""
    train_cases: List[str] = field(default_factory=list)
    val_cases: List[str] = field(default_factory=list)
    test_cases: List[str] = field(default_factory=list)
    validation: str = ""  # the protocol: which cases picked the best epoch
    init_from: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("epochs", "seconds", "peak_memory_mb", "best", "best_epoch", "library", "train_cases", "val_cases",
              "test_cases", "validation", "init_from")

    def to_dict(self) -> Dict[str, Any]:
        return {**self.extra, "epochs": self.epochs, "seconds": self.seconds, "peak_memory_mb": self.peak_memory_mb,
                "best": dict(self.best), "best_epoch": self.best_epoch, "library": self.library,
                "train_cases": list(self.train_cases), "val_cases": list(self.val_cases),
                "test_cases": list(self.test_cases), "validation": self.validation, "init_from": self.init_from}

    @classmethod
    def from_dict(cls, data: Any) -> "TrainingSummary":
        if not isinstance(data, Mapping):
            return cls()
        epochs, best_epoch = finite_number(data.get("epochs")), finite_number(data.get("best_epoch"))
        best = data.get("best")
        return cls(epochs=int(epochs) if epochs is not None else None, seconds=finite_number(data.get("seconds")),
                   peak_memory_mb=finite_number(data.get("peak_memory_mb")),
                   best=dict(best) if isinstance(best, Mapping) else {},
                   best_epoch=int(best_epoch) if best_epoch is not None else None,
                   library=str(data.get("library") or ""), train_cases=_str_list(data.get("train_cases")),
                   val_cases=_str_list(data.get("val_cases")), test_cases=_str_list(data.get("test_cases")),
                   validation=str(data.get("validation") or ""),
                   init_from=str(data["init_from"]) if data.get("init_from") else None,
                   extra=_extra(data, cls._KNOWN))


@dataclass
class ModelManifest:
    """A model folder's ``medtuning.json`` (docs/method.md, "Model folder")."""

    architecture: Dict[str, Any]
    base_weights: Dict[str, Any]
    modalities: List[str]
    label_scheme: Dict[str, Any]
    preprocessing: Dict[str, Any]
    crop: List[int]
    stored: str  # "tuned" (over the base weights) or "full"
    method: Dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    created: str = ""
    flip_axes: List[int] = field(default_factory=lambda: [0, 1, 2])
    # Working spacing in mm, (x, y, z) as SimpleITK spells it: inputs are resampled to it (data/spacing.py).
    # None: native, each scan on its own grid (also what a manifest written before the field means).
    spacing: Optional[List[float]] = None
    parameters: Dict[str, int] = field(default_factory=dict)
    training: TrainingSummary = field(default_factory=TrainingSummary)
    test: Optional[EvaluationReport] = None  # scores on the library's test cases when it was trained
    evaluation: Optional[EvaluationReport] = None  # the last 'medtuning evaluate' recorded into the folder
    history: List[RoundRecord] = field(default_factory=list)  # the lineage, this model's round last
    packages: Dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    medtuning_version: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    REQUIRED = ("architecture", "base_weights", "modalities", "label_scheme", "preprocessing", "crop", "stored")
    _KNOWN = REQUIRED + ("method", "pretrained", "created", "flip_axes", "spacing", "parameters", "training",
                         "test",
                         "evaluation", "history", "packages", "format_version", "medtuning_version")

    # -- convenient facts ---------------------------------------------------------------------
    @property
    def arch(self) -> str:
        return str(self.architecture.get("arch") or "")

    @property
    def backbone(self) -> str:
        return str(self.architecture.get("backbone") or "")

    @property
    def method_name(self) -> str:
        return str(self.method.get("name") or self.architecture.get("method") or "")

    @property
    def task(self) -> str:
        return str(self.label_scheme.get("task") or "")

    @property
    def segment_names(self) -> List[str]:
        return [str(s.get("name")) for s in self.label_scheme.get("segments") or [] if isinstance(s, Mapping)]

    @property
    def round(self) -> int:
        return self.history[-1].round if self.history else 0

    def to_dict(self) -> Dict[str, Any]:
        from MedTuningLib import __version__

        data = {**self.extra, "format_version": FORMAT_VERSION, "medtuning_version": self.medtuning_version or __version__,
                "created": self.created, "architecture": self.architecture, "method": self.method,
                "base_weights": self.base_weights, "pretrained": self.pretrained, "stored": self.stored,
                "modalities": list(self.modalities), "preprocessing": self.preprocessing,
                "label_scheme": self.label_scheme, "crop": list(self.crop), "flip_axes": list(self.flip_axes),
                "spacing": list(self.spacing) if self.spacing is not None else None,
                "parameters": dict(self.parameters), "training": self.training.to_dict(),
                "test": self.test.to_dict() if self.test is not None else None,
                "history": [r.to_dict() for r in self.history], "packages": dict(self.packages)}
        if self.evaluation is not None:
            data["evaluation"] = self.evaluation.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "medtuning.json") -> "ModelManifest":
        """MODEL_FOLDER_INVALID for a broken manifest, MODEL_FOLDER_TOO_NEW for a newer format."""
        if not isinstance(data, Mapping) or "format_version" not in data:
            raise MedTuningError("MODEL_FOLDER_INVALID", f"{where} is not a MedTuning model description",
                                 "choose a folder written by 'medtuning train'")
        version = _version(data, where, "MODEL_FOLDER_INVALID", "MODEL_FOLDER_TOO_NEW", "model")

        def bad(what: str) -> MedTuningError:
            return MedTuningError("MODEL_FOLDER_INVALID", f"{where} {what}",
                                  "the model folder is damaged: train it again or copy it again")

        for key in cls.REQUIRED:
            if key not in data:
                raise bad(f"lacks '{key}'")
        for key in ("architecture", "label_scheme", "preprocessing"):
            if not isinstance(data[key], Mapping):
                raise bad(f"has a '{key}' that is not an object")
        modalities = data["modalities"]
        if not isinstance(modalities, list) or not modalities:
            raise bad("names no modalities")
        crop = data["crop"]
        if not isinstance(crop, list) or len(crop) != 3 or not all(
                isinstance(c, int) and not isinstance(c, bool) and 0 < c <= MAX_CROP for c in crop):
            raise bad(f"has a crop {crop!r} that is not three positive sizes up to {MAX_CROP}")
        flips = data.get("flip_axes") or [0, 1, 2]  # axes of test-time flips: used as array axes
        if not isinstance(flips, list) or not all(isinstance(a, int) and not isinstance(a, bool) and 0 <= a <= 2
                                                  for a in flips):
            raise bad(f"has flip axes {flips!r} that are not among the axes 0, 1, 2")
        base = data["base_weights"]
        if base in (None, "none"):  # older hand-written form of a random base
            base = {"source": "none", "pretrained": False}
        if not isinstance(base, Mapping):
            raise bad("has 'base_weights' that are not an object")
        method = data.get("method") or {}
        if isinstance(method, str):
            method = {"name": method}
        pretrained = data.get("pretrained")
        if not isinstance(pretrained, bool):
            pretrained = bool(base.get("pretrained", base.get("source") not in (None, "none")))
        test, evaluation = data.get("test"), data.get("evaluation")
        history = data.get("history") or []
        if not isinstance(history, list):
            raise bad("has a 'history' that is not a list")
        params = data.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise bad("has 'parameters' that are not an object")
        counts = {}
        for key, value in params.items():
            number = finite_number(value)
            if number is None:
                raise bad(f"has a non-numeric parameter count {key!r}")
            counts[str(key)] = int(number)
        training = data.get("training")
        if training is not None and not isinstance(training, Mapping):
            raise bad("has a 'training' that is not an object")
        spacing = data.get("spacing")
        if spacing is not None:
            values = [finite_number(v) for v in spacing] if isinstance(spacing, list) else []
            if len(values) != 3 or not all(v is not None and 0 < v < 1000 for v in values):
                raise bad(f"has a working spacing {spacing!r} that is not three sizes in mm")
            spacing = [float(v) for v in values]
        return cls(architecture=dict(data["architecture"]), base_weights=dict(base),
                   modalities=[str(m) for m in modalities], label_scheme=dict(data["label_scheme"]),
                   preprocessing=dict(data["preprocessing"]), crop=list(crop), stored=str(data["stored"]),
                   method=dict(method) if isinstance(method, Mapping) else {}, pretrained=pretrained,
                   created=str(data.get("created") or ""),
                   flip_axes=[int(a) for a in data.get("flip_axes") or (0, 1, 2)], spacing=spacing,
                   parameters=counts,
                   training=TrainingSummary.from_dict(training),
                   test=EvaluationReport.from_dict(test, where) if isinstance(test, Mapping) else None,
                   evaluation=EvaluationReport.from_dict(evaluation, where) if isinstance(evaluation, Mapping)
                   else None,
                   history=[RoundRecord.from_dict(r, where) for r in history],
                   packages={str(k): str(v) for k, v in (data.get("packages") or {}).items()},
                   format_version=version, medtuning_version=str(data.get("medtuning_version") or ""),
                   extra=_extra(data, cls._KNOWN))


def history_rows(manifest: ModelManifest) -> List[Dict[str, Any]]:
    """One row per round of a model's lineage, for ``medtuning history`` and the front ends' table / plot:
    ``round``, ``model``, ``created``, ``train_cases`` / ``test_cases`` (counts), ``new_cases`` (ids),
    ``dice`` (region -> mean held-out Dice, None where the round had no test cases), ``test_case_ids``
    (so a reader can check every round was scored on the same cases), ``effort`` (segment -> totals of
    :func:`correction_totals`), ``epochs``, ``seconds``."""
    rounds = manifest.history or [RoundRecord(round=0, created=manifest.created,
                                              train_cases=list(manifest.training.train_cases),
                                              epochs=manifest.training.epochs, seconds=manifest.training.seconds,
                                              test=manifest.test)]
    rows = []
    for r in rounds:
        test = r.test
        rows.append({"round": r.round, "model": r.model, "created": r.created, "train_cases": len(r.train_cases),
                     "new_cases": list(r.new_cases), "test_cases": len(test.cases) if test is not None else 0,
                     "test_case_ids": test.case_ids if test is not None else [],
                     "dice": {reg: test.mean(f"dice/{reg}") for reg in test.regions} if test is not None else {},
                     "effort": dict(r.effort), "epochs": r.epochs, "seconds": r.seconds})
    return rows
