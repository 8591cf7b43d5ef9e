"""``medtuning cases add | list | remove | split``: manage a case library (see :mod:`MedTuningLib.cases`).

With ``--events jsonl`` the results are the ``outputs`` of the ``done`` event and nothing else is printed
on stdout; in text mode ``list`` prints a table (or JSON with ``--json``).
"""

from __future__ import annotations

import json
import tempfile
from argparse import Namespace
from pathlib import Path
from typing import Any

from MedTuningLib.cases import Case, CaseLibrary
from MedTuningLib.schema import SPLITS


def _case_summary(case: Case) -> dict[str, Any]:
    """A case for ``cases list`` / ``cases add`` outputs: its files, split and provenance (the
    :class:`MedTuningLib.schema.Provenance` record, with the correction ``effort`` per segment)."""
    return {"id": case.id, "split": case.split, "modalities": case.modalities,
            "images": [str(p) for p in case.image_paths], "label": str(case.label_path) if case.labelled else None,
            "provenance": case.provenance_record.to_dict()}


def _effort_cell(case: Case) -> str:
    effort = case.provenance_record.effort
    return "; ".join(f"{name} Dice {'–' if e.dice is None else f'{e.dice:.2f}'} +{e.mm3_added:.0f}/-{e.mm3_removed:.0f} mm³"
                     for name, e in effort.items())


def _correction_details(args: Namespace, images: list, label, events) -> dict[str, Any] | None:
    """``--from-model`` / ``--model-output`` of a correction: the model, its result and the effort per segment."""
    from_model, output = getattr(args, "from_model", None), getattr(args, "model_output", None)
    if from_model is None and output is None:
        return None
    from MedTuningLib.errors import MedTuningError

    if args.provenance != "correction":
        raise MedTuningError("INVALID_OPTION", "--from-model / --model-output describe a correction",
                             "add --provenance correction (or drop those options)")
    if label is None:
        raise MedTuningError("INVALID_OPTION", "a correction needs the corrected --label", "give --label FILE")
    details: dict[str, Any] = {}
    if from_model is not None:
        from MedTuningLib.fileio import read_json
        from MedTuningLib.schema import ModelManifest

        manifest = Path(from_model) / "medtuning.json"
        if not manifest.is_file():
            raise MedTuningError("MODEL_FOLDER_INVALID", f"--from-model {from_model} is not a model folder (no "
                                 "medtuning.json)", "give the model folder whose result was corrected")
        ModelManifest.from_dict(read_json(manifest, "MODEL_FOLDER_INVALID", "model description"), str(manifest))
        details["from_model"] = str(Path(from_model).absolute())
    if output is not None:
        if from_model is None:
            raise MedTuningError("INVALID_OPTION", "--model-output needs --from-model: the effort is measured with "
                                 "the label scheme of the model that produced it", "add --from-model MODEL_DIR")
        if not Path(output).is_file():
            raise MedTuningError("FILE_NOT_FOUND", f"--model-output {output} does not exist",
                                 "give the .seg.nrrd the model wrote for this scan (before correcting it)",
                                 path=str(output))
        from MedTuningLib.cases import correction_effort

        effort = correction_effort(Path(from_model), Path(output), Path(label), images,
                                   log=lambda message: events.log(message, level="warning"))
        details["model_output"] = str(Path(output).absolute())
        details["effort"] = {name: e.to_dict() for name, e in effort.items()}
        for name, e in effort.items():
            events.log(f"correction of {name}: Dice {e.dice:.3f} between the model's result and the correction, "
                       f"{e.mm3_added:.0f} mm³ added, {e.mm3_removed:.0f} mm³ removed")
    return details


def _table(cases: list[Case]) -> str:
    rows = [("id", "split", "modalities", "from", "added", "correction effort")]
    for c in cases:
        rows.append((c.id, c.split, ", ".join(c.modalities), str(c.provenance.get("from", "")),
                     str(c.provenance.get("added", "")), _effort_cell(c)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: Namespace, ctx) -> dict[str, Any]:
    library = CaseLibrary(args.library)
    events = ctx.events
    action = args.cases_command
    if events.jsonl or action != "list":  # a text-mode list prints only its table
        events.start(f"cases {action}")
    if action == "add":
        images, label, source = list(args.image), args.label, args.source
        details = None
        with tempfile.TemporaryDirectory(prefix="medtuning-slab-") as scratch:
            read: list = [None] * len(images)
            if any(Path(p).is_dir() for p in images) or getattr(args, "series", None):
                # DICOM folders: one checked series each (--series picks), stored as NRRD; the series read
                # goes into the case's provenance.
                from MedTuningLib.data.dicom import series_to_files

                images, read = series_to_files(images, args.series or (), Path(scratch),
                                               log=lambda message: events.log(message),
                                               regularize=bool(getattr(args, "dicom_resample", False)))
                details = {"dicom": [r.provenance() if r is not None else None for r in read]}
                if source is None:  # where the case came from: the DICOM folders, not the scratch copies
                    source = ", ".join(str(p) for p in [*args.image, label])
            from MedTuningLib.dicomseg import is_dicom_seg, seg_to_seg_nrrd

            if label is not None and is_dicom_seg(Path(label)):  # e.g. a correction saved by a PACS viewer
                if read[0] is None:
                    from MedTuningLib.errors import MedTuningError

                    raise MedTuningError("INVALID_OPTION", f"the label {label} is a DICOM SEG: it needs the DICOM "
                                         "series it was drawn on as the first --image",
                                         "give the series folder as --image")
                label = seg_to_seg_nrrd(Path(label), read[0], Path(scratch) / "label.seg.nrrd",
                                        log=lambda message: events.log(message))
            if getattr(args, "slices", None):
                from MedTuningLib.data.slab import write_slab

                images, label, (start, stop) = write_slab(images, label, args.slices, Path(scratch))
                source = (source + "; " if source else "") + f"slices {start}:{stop} of {args.image[0]}"
            correction = _correction_details(args, images, label, events)
            if correction:
                details = {**(details or {}), **correction}
            case = library.add(images, label, modalities=args.modality, split=args.split, case_id=args.case_id,
                               provenance=args.provenance, source=source,
                               log=lambda message: events.log(message, level="warning"), details=details)
        events.log(f"added case {case.id!r} ({case.split}) to {library.root}")
        return {"library": str(library.root), "case": case.id, **{k: v for k, v in _case_summary(case).items() if k != "id"}}
    if action == "list":
        cases = library.cases(args.split)
        counts = {split: sum(1 for c in cases if c.split == split) for split in SPLITS}
        if events.jsonl:
            return {"library": str(library.root), "count": len(cases), "splits": counts,
                    "cases": [_case_summary(c) for c in cases]}
        if getattr(args, "json", False):
            print(json.dumps([_case_summary(c) for c in cases], indent=2, ensure_ascii=False))
        elif cases:
            print(_table(cases))
        else:
            print(f"no cases{' in split ' + args.split if args.split else ''} in {library.root}")
        return {"library": str(library.root), "count": len(cases)}
    if action == "remove":
        case = library.remove(args.case_id)
        events.log(f"removed case {case.id!r} and its files from {library.root}")
        return {"library": str(library.root), "removed": case.id}
    if action == "split":
        case = library.set_split(args.case_id, args.split)
        return {"library": str(library.root), "case": case.id, "split": case.split}
    raise ValueError(f"unknown cases action {action!r}")
