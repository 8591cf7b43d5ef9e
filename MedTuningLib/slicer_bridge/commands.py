"""Backend command lines from typed parameters.

Each ``*Params`` dataclass mirrors one sub-command of the ``medtuning`` CLI contract
(:mod:`MedTuningLib.cli`) and turns itself into an argv list — never a shell string, so paths with
spaces, quotes or non-ASCII letters pass through unchanged on every platform. Options that the
caller leaves at ``None`` are not written, so the backend's own defaults apply.

Valued options are written as one ``--option=value`` token: argparse would otherwise read a value
that starts with ``-`` (a free-text label spec, a relative path) as an option of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from MedTuningLib.schema import ARCHS, LABELLED_SPLITS, METHODS, PROVENANCES, SOURCE_LABELS, SPLITS, TASKS

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["ARCHS", "METHODS", "TASKS", "SPLITS", "LABELLED_SPLITS", "PROVENANCES", "SOURCE_LABELS", "DEVICES"]
DEVICES = ("auto", "cpu", "cuda")

#: Suffix of the folder a training run works in (resume state, curves, STOP file).
PARTIAL_SUFFIX = ".partial"


def _opt(name: str, value: object) -> list[str]:
    """``["--name=value"]``, or nothing when ``value`` is None."""
    if value is None:
        return []
    return [f"--{name}={_text(value)}"]


def _flag(name: str, on: bool) -> list[str]:
    return [f"--{name}"] if on else []


def _text(value: object) -> str:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float):
        return repr(value)  # shortest exact form: 2e-3 stays 0.002, never rounded
    return str(value)


def _choice(name: str, value: Optional[str], allowed: Sequence[str]) -> None:
    if value is not None and value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")


def _positive(name: str, value: Optional[float]) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be positive, not {value!r}")


def checked_spacing(text: Optional[str]) -> Optional[str]:
    """A working spacing as ``train --spacing`` takes it (None or empty: the backend's auto), checked here so a
    front end can say what is wrong before any run: ``ValueError`` with what to type."""
    text = (text or "").strip()
    if not text:
        return None
    # Imported here: the parser's module needs numpy (Slicer has it), the rest of the bridge does not.
    from MedTuningLib.data.spacing import parse_spacing_option
    from MedTuningLib.errors import MedTuningError

    try:
        parse_spacing_option(text)
    except MedTuningError as exc:
        raise ValueError(f"{exc.message}: {exc.hint}") from None
    return text


def _paths(name: str, values: Iterable[PathLike]) -> list[Path]:
    paths = [Path(v) for v in values]
    if not paths:
        raise ValueError(f"at least one {name} is needed")
    return paths


@dataclass
class TrainParams:
    """``medtuning train``: tune a model on a case library into ``out`` (works in ``out.partial``)."""

    library: PathLike
    out: PathLike
    task: str = "custom"
    labels: Optional[str] = None
    source_labels: Optional[str] = None
    arch: Optional[str] = None
    backbone: Optional[str] = None
    weights: Optional[str] = None  # "hub", "none" or a local file
    method: Optional[str] = None
    alpha: Optional[float] = None
    crop: Optional[tuple[int, int, int]] = None
    batch: Optional[int] = None
    epochs: Optional[int] = None
    steps_per_epoch: Optional[int] = None
    minutes: Optional[float] = None
    lr: Optional[float] = None
    spacing: Optional[str] = None  # working spacing: "auto", "native", one size or X,Y,Z in mm
    device: Optional[str] = None
    seed: Optional[int] = None
    init_from: Optional[PathLike] = None
    resume: bool = False
    force: bool = False
    extra: list[str] = field(default_factory=list)  # advanced options passed as they are

    def validate(self) -> None:
        _choice("task", self.task, TASKS)
        _choice("arch", self.arch, ARCHS)
        _choice("method", self.method, METHODS)
        _choice("device", self.device, DEVICES)
        _choice("source labels", self.source_labels, SOURCE_LABELS)
        for name in ("alpha", "batch", "epochs", "steps_per_epoch", "minutes", "lr"):
            _positive(name, getattr(self, name))
        if self.crop is not None and (len(self.crop) != 3 or min(self.crop) < 1):
            raise ValueError(f"crop must be three positive sizes (D, H, W), not {self.crop!r}")
        checked_spacing(self.spacing)

    def argv(self) -> list[str]:
        self.validate()
        crop = "x".join(str(int(c)) for c in self.crop) if self.crop is not None else None
        return ["train", *_opt("library", self.library), *_opt("out", self.out), *_opt("task", self.task),
                *_opt("labels", self.labels), *_opt("source-labels", self.source_labels),
                *_opt("arch", self.arch), *_opt("backbone", self.backbone), *_opt("weights", self.weights),
                *_opt("method", self.method), *_opt("alpha", self.alpha), *_opt("crop", crop),
                *_opt("batch", self.batch), *_opt("epochs", self.epochs),
                *_opt("steps-per-epoch", self.steps_per_epoch), *_opt("minutes", self.minutes),
                *_opt("lr", self.lr), *_opt("spacing", self.spacing), *_opt("device", self.device),
                *_opt("seed", self.seed),
                *_opt("init-from", self.init_from), *_flag("resume", self.resume), *_flag("force", self.force),
                *self.extra]

    def workdir(self) -> Path:
        """The folder the run works in; a ``STOP`` file there cancels it."""
        out = Path(self.out)
        return out.with_name(out.name + PARTIAL_SUFFIX)


@dataclass
class SegmentParams:
    """``medtuning segment``: one ``--image`` per modality, in the model's channel order. An image may be
    a DICOM series folder (``series``: the SeriesInstanceUID per image when a folder holds several);
    ``dicom_seg`` then also writes the result as DICOM SEG (``seg_type`` binary or fractional)."""

    model: PathLike
    images: Sequence[PathLike]
    out: PathLike
    labelmap: Optional[PathLike] = None
    tta: bool = False
    fast: bool = False  # no window overlap, int8 on a CPU (the backend's --fast)
    device: Optional[str] = None
    weights: Optional[PathLike] = None
    force: bool = False
    series: Sequence[str] = ()
    dicom_seg: Optional[PathLike] = None
    seg_type: Optional[str] = None

    def argv(self) -> list[str]:
        _choice("device", self.device, DEVICES)
        _choice("seg_type", self.seg_type, ("binary", "fractional"))
        images = _paths("--image", self.images)
        return ["segment", *_opt("model", self.model), *[t for p in images for t in _opt("image", p)],
                *_opt("out", self.out), *_opt("labelmap", self.labelmap), *_flag("tta", self.tta),
                *_flag("fast", self.fast), *_opt("weights", self.weights), *_opt("device", self.device),
                *_flag("force", self.force),
                *[t for uid in self.series for t in _opt("series", uid)], *_opt("dicom-seg", self.dicom_seg),
                *_opt("seg-type", self.seg_type)]


@dataclass
class BatchScan:
    """One row of a batch list: images in the model's channel order (files or DICOM series folders), the
    result (.seg.nrrd or .dcm), optionally a DICOM SEG besides it and the series UIDs to read."""

    images: Sequence[PathLike]
    out: PathLike
    id: Optional[str] = None
    dicom_seg: Optional[PathLike] = None
    series: Sequence[str] = ()


def write_batch_csv(path: PathLike, scans: Sequence[BatchScan], modalities: Sequence[str]) -> Path:
    """The CSV ``medtuning segment --batch-list`` reads (columns: id, one per modality, out, dicom_seg,
    series), written with absolute paths so it does not matter where the backend runs."""
    import csv

    if not scans:
        raise ValueError("a batch needs at least one scan")
    columns = ["id", *modalities, "out", "dicom_seg", "series"]
    path = Path(path)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for index, scan in enumerate(scans, start=1):
            images = [os.path.abspath(os.fspath(p)) for p in scan.images]
            if len(images) != len(modalities):
                raise ValueError(f"scan {index} has {len(images)} image(s) for {len(modalities)} modalities")
            writer.writerow([scan.id or f"scan{index}", *images, os.path.abspath(os.fspath(scan.out)),
                             os.path.abspath(os.fspath(scan.dicom_seg)) if scan.dicom_seg is not None else "",
                             ";".join(scan.series)])
    return path


@dataclass
class SegmentBatchParams:
    """``medtuning segment --batch-list``: many scans with one model load (the Slicer module's "segment all
    selected volumes", or all scans of a DICOM study, in one job). ``batch_list`` is a CSV from
    :func:`write_batch_csv` or a folder with one scan per sub-folder (then ``out`` is the results folder)."""

    model: PathLike
    batch_list: PathLike
    out: Optional[PathLike] = None
    batch_format: Optional[str] = None
    seg_type: Optional[str] = None
    tta: bool = False
    fast: bool = False
    device: Optional[str] = None
    weights: Optional[PathLike] = None
    force: bool = False

    def argv(self) -> list[str]:
        _choice("device", self.device, DEVICES)
        _choice("batch_format", self.batch_format, ("seg.nrrd", "dcm", "both"))
        _choice("seg_type", self.seg_type, ("binary", "fractional"))
        return ["segment", *_opt("model", self.model), *_opt("batch-list", self.batch_list), *_opt("out", self.out),
                *_opt("batch-format", self.batch_format), *_opt("seg-type", self.seg_type), *_flag("tta", self.tta),
                *_flag("fast", self.fast), *_opt("weights", self.weights), *_opt("device", self.device),
                *_flag("force", self.force)]


@dataclass
class EvaluateParams:
    """``medtuning evaluate``: Dice / HD95 of a model on a library split."""

    model: PathLike
    library: PathLike
    split: Optional[str] = "test"
    report: Optional[PathLike] = None
    tta: bool = False
    device: Optional[str] = None

    def argv(self) -> list[str]:
        _choice("split", self.split, LABELLED_SPLITS + ("all",))
        _choice("device", self.device, DEVICES)
        return ["evaluate", *_opt("model", self.model), *_opt("library", self.library), *_opt("split", self.split),
                *_opt("report", self.report), *_flag("tta", self.tta), *_opt("device", self.device)]


@dataclass
class CaseAddParams:
    """``medtuning cases add``: copy a case (images + label) into a library.

    ``label`` None: an unlabelled scan (``split="unlabelled"``). A correction (``provenance="correction"``)
    names the model whose result was corrected (``from_model``) and that result (``model_output``, the
    .seg.nrrd before editing): the backend then records the correction effort per segment."""

    library: PathLike
    images: Sequence[PathLike]
    label: Optional[PathLike]
    modalities: Sequence[str] = ()
    split: Optional[str] = None
    case_id: Optional[str] = None
    provenance: Optional[str] = None
    source: Optional[str] = None
    from_model: Optional[PathLike] = None
    model_output: Optional[PathLike] = None

    def argv(self) -> list[str]:
        images = _paths("--image", self.images)
        if self.modalities and len(self.modalities) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.modalities)} modality names")
        _choice("split", self.split, SPLITS)
        _choice("provenance", self.provenance, PROVENANCES)
        if (self.label is None) != (self.split == "unlabelled"):
            raise ValueError("a label is needed unless split is 'unlabelled' (and only then may it be missing)")
        if (self.from_model is not None or self.model_output is not None) and self.provenance != "correction":
            raise ValueError("from_model / model_output describe a correction: set provenance='correction'")
        return ["cases", "add", *_opt("library", self.library), *[t for p in images for t in _opt("image", p)],
                *_opt("label", self.label), *[t for m in self.modalities for t in _opt("modality", m)],
                *_opt("split", self.split), *_opt("id", self.case_id), *_opt("provenance", self.provenance),
                *_opt("source", self.source), *_opt("from-model", self.from_model),
                *_opt("model-output", self.model_output)]


@dataclass
class CaseRemoveParams:
    """``medtuning cases remove``: take a case (and its files) out of a library; e.g. the unlabelled scan that
    was just added back corrected (labelled) as a new case."""

    library: PathLike
    case_id: str

    def argv(self) -> list[str]:
        if not str(self.case_id).strip():
            raise ValueError("case_id is empty")
        return ["cases", "remove", *_opt("library", self.library), *_opt("id", self.case_id)]


@dataclass
class InfoParams:
    """``medtuning info``: versions, devices, models; or one model folder with ``model``."""

    model: Optional[PathLike] = None
    json: bool = True

    def argv(self) -> list[str]:
        return ["info", *_flag("json", self.json), *_opt("model", self.model)]


@dataclass
class RetuneParams:
    """``medtuning retune``: warm-start from ``model`` on ``library`` with a short budget ("Re-tune now").

    Everything else (label scheme, modalities, preprocessing, architecture, base weights) comes from the
    model folder. ``out`` None: the backend picks ``<model>-round<N>`` beside the model (reported in the
    ``done`` event's ``outputs.model``)."""

    model: PathLike
    library: PathLike
    out: Optional[PathLike] = None
    epochs: Optional[int] = None
    minutes: Optional[float] = None
    steps_per_epoch: Optional[int] = None
    device: Optional[str] = None
    seed: Optional[int] = None
    resume: bool = False
    force: bool = False

    def argv(self) -> list[str]:
        _choice("device", self.device, DEVICES)
        for name in ("epochs", "minutes", "steps_per_epoch"):
            _positive(name, getattr(self, name))
        if self.epochs is not None and self.minutes is not None:
            raise ValueError("give epochs or minutes, not both")
        return ["retune", *_opt("model", self.model), *_opt("library", self.library), *_opt("out", self.out),
                *_opt("epochs", self.epochs), *_opt("minutes", self.minutes),
                *_opt("steps-per-epoch", self.steps_per_epoch), *_opt("device", self.device),
                *_opt("seed", self.seed), *_flag("resume", self.resume), *_flag("force", self.force)]

    def workdir(self) -> Optional[Path]:
        """Where a ``STOP`` file cancels the run (known only when ``out`` is given)."""
        if self.out is None:
            return None
        out = Path(self.out)
        return out.with_name(out.name + PARTIAL_SUFFIX)


@dataclass
class HistoryParams:
    """``medtuning history``: held-out Dice per region and correction effort per round of a model's lineage."""

    model: PathLike

    def argv(self) -> list[str]:
        return ["history", *_opt("model", self.model)]


@dataclass
class SuggestParams:
    """``medtuning suggest``: the library's unlabelled scans ranked by the model's uncertainty ("Next scan
    to correct": the first of ``outputs.ranking`` in the ``done`` event)."""

    model: PathLike
    library: PathLike
    top: Optional[int] = None
    device: Optional[str] = None

    def argv(self) -> list[str]:
        _choice("device", self.device, DEVICES)
        _positive("top", self.top)
        return ["suggest", *_opt("model", self.model), *_opt("library", self.library), *_opt("top", self.top),
                *_opt("device", self.device)]


Params = Union[TrainParams, SegmentParams, EvaluateParams, CaseAddParams, CaseRemoveParams, InfoParams, RetuneParams,
               HistoryParams, SuggestParams]


def backend_argv(python: PathLike, params: Params, events: bool = True) -> list[str]:
    """The full command: ``PYTHON -m MedTuningLib <sub-command ...> --events jsonl``."""
    if not os.fspath(python):
        raise ValueError("no backend Python interpreter is set")
    argv = [os.fspath(python), "-m", "MedTuningLib", *params.argv()]
    return [*argv, "--events", "jsonl"] if events else argv


def stop_dir(params: Params) -> Optional[Path]:
    """Where a ``STOP`` file cancels this command (training: ``OUT.partial``; others: set by the runner)."""
    return params.workdir() if isinstance(params, (TrainParams, RetuneParams)) else None
