"""``medtuning evaluate``: Dice and HD95 of a model folder on a case library split."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def run(args, ctx) -> dict:
    from MedTuningLib.engine.device import resolve_device
    from MedTuningLib.engine.evaluate import evaluate_model, markdown_report
    from MedTuningLib.engine.recipe import inference_options

    device = resolve_device(args.device)
    ctx.events.start("evaluate", device=str(device))
    fast = inference_options(args, ctx.argv, device.type)  # --protocol paper: fp32; --fast: overlap 0, int8 on a CPU
    if fast:
        ctx.events.log(fast)
    if os.environ.get("MEDTUNING_WORKDIR"):
        ctx.cancel.watch_dir = Path(os.environ["MEDTUNING_WORKDIR"])
    # A failed or cancelled evaluation leaves no report folder it created (nor a half-written report in it).
    created = None
    if args.report is not None:
        from MedTuningLib.fileio import check_writable_dir, refuse_to_replace

        report_dir = check_writable_dir(Path(args.report), "report")
        refuse_to_replace(report_dir, ("report.json", "report.md", "report.html"), "evaluation report",
                          getattr(args, "force", False), keys=("summary", "cases"),
                          inputs=[("case library (--library)", args.library), ("model folder (--model)", args.model)])
        created = next((p for p in reversed([report_dir, *report_dir.parents]) if not p.exists()), None)
    try:
        report = evaluate_model(args.model, args.library, split=args.split, device=args.device, events=ctx.events,
                                tta=args.tta, overlap=args.overlap, report_dir=args.report, weights=args.weights,
                                precision=args.precision, cancel=ctx.cancel,
                                inference=getattr(args, "protocol", "project"))
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    if not ctx.events.jsonl:
        ctx.events.out.write(markdown_report(report))
    outputs = {"summary": {k: v["mean"] for k, v in report["summary"].items()}}
    if args.report is not None:
        outputs["report"] = str(Path(args.report) / "report.json")
    return outputs
