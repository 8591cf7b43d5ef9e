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


def _case_summary(case: Case) -> dict[str, Any]:
    return {"id": case.id, "split": case.split, "modalities": case.modalities,
            "images": [str(p) for p in case.image_paths], "label": str(case.label_path),
            "provenance": case.provenance}


def _table(cases: list[Case]) -> str:
    rows = [("id", "split", "modalities", "from", "added")]
    for c in cases:
        rows.append((c.id, c.split, ", ".join(c.modalities), str(c.provenance.get("from", "")),
                     str(c.provenance.get("added", ""))))
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
            if any(Path(p).is_dir() for p in images) or getattr(args, "series", None):
                # DICOM folders: one checked series each (--series picks), stored as NRRD; the series read
                # goes into the case's provenance.
                from MedTuningLib.data.dicom import series_to_files

                images, read = series_to_files(images, args.series or (), Path(scratch),
                                               log=lambda message: events.log(message))
                details = {"dicom": read}
                if source is None:  # where the case came from: the DICOM folders, not the scratch copies
                    source = ", ".join(str(p) for p in [*args.image, label])
            if getattr(args, "slices", None):
                from MedTuningLib.data.slab import write_slab

                images, label, (start, stop) = write_slab(images, label, args.slices, Path(scratch))
                source = (source + "; " if source else "") + f"slices {start}:{stop} of {args.image[0]}"
            case = library.add(images, label, modalities=args.modality, split=args.split, case_id=args.case_id,
                               provenance=args.provenance, source=source,
                               log=lambda message: events.log(message, level="warning"), details=details)
        events.log(f"added case {case.id!r} ({case.split}) to {library.root}")
        return {"library": str(library.root), "case": case.id, **{k: v for k, v in _case_summary(case).items() if k != "id"}}
    if action == "list":
        cases = library.cases(args.split)
        counts = {split: sum(1 for c in cases if c.split == split) for split in ("train", "val", "test")}
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
