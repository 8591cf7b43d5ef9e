"""``medtuning segment``: segment one scan, or a batch of scans with one model load.

One scan: ``--image`` per modality (files or DICOM series folders; ``--series`` picks among several),
the result as ``--out RESULT.seg.nrrd`` and/or DICOM SEG (``--out RESULT.dcm`` or ``--dicom-seg FILE``,
DICOM input only), optionally a labelmap. Batch: ``--batch-list CSV_OR_FOLDER``
(:mod:`MedTuningLib.engine.batch`): the model is loaded once, each scan reports its progress, a bad
scan is reported with its code and the others go on (exit status 3, BATCH_INCOMPLETE, when some
failed), and a rerun skips the scans whose outputs are complete.
"""

from __future__ import annotations

import os
import time
import traceback
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from MedTuningLib.engine.batch import FORMATS, ScanJob, describe, output_complete
from MedTuningLib.errors import Cancelled, MedTuningError


def check_result_path(out: Path, force: bool) -> Path:
    out = Path(out)
    if not out.name.lower().endswith((".seg.nrrd", ".dcm")):
        raise MedTuningError("INVALID_OPTION", f"--out {out} must end in .seg.nrrd (a 3D Slicer segmentation) or "
                             ".dcm (DICOM SEG, for a DICOM series input)",
                             "name the result e.g. result.seg.nrrd; use --labelmap for a NIfTI labelmap")
    if out.exists() and not force:
        raise MedTuningError("OUTPUT_EXISTS", f"{out} already exists", "choose another --out, or pass --force")
    return out


def _check_dicom_input(job: ScanJob) -> None:
    if job.dicom_seg is not None and not (job.images and Path(job.images[0]).is_dir()):
        raise MedTuningError("INVALID_OPTION", f"a DICOM SEG ({job.dicom_seg}) needs a DICOM series as the (first) "
                             f"image, not {job.images[0] if job.images else 'nothing'}",
                             "give the DICOM series folder as --image, or write a .seg.nrrd instead")


def _provenance_header(source: dict[str, Any] | None, model_name: str) -> dict[str, str]:
    """NRRD fields saying what the .seg.nrrd was made from (DICOM UIDs, no patient data)."""
    from MedTuningLib import __version__

    header = {"MedTuning_Version": __version__, "MedTuning_Model": model_name}
    if source and source.get("format") == "dicom":
        for key, field in (("SourceSeriesInstanceUID", "series_instance_uid"),
                           ("SourceStudyInstanceUID", "study_instance_uid"),
                           ("SourceFrameOfReferenceUID", "frame_of_reference_uid"),
                           ("SourceModality", "modality"), ("SourceSeriesDescription", "description"),
                           ("SourceSlices", "slices")):
            if source.get(field) not in (None, ""):
                header[f"MedTuning_{key}"] = str(source[field])
    return {k: _nrrd_text(v) for k, v in header.items()}


def _nrrd_text(value: str) -> str:
    """NRRD headers are ASCII lines: other characters (a model folder "modèle", a series description in
    any script) are written percent-encoded as UTF-8, as in URLs."""
    from urllib.parse import quote

    return "".join(c if 32 <= ord(c) < 127 and c != "%" else quote(c, safe="") for c in value)


def window_progress(events) -> Callable[[int, int], None]:
    """``infer`` progress per forward call with the time left, for a scan's progress bar.

    The clock starts when the windows do (``done`` 0), not when the scan is read: reading, resampling and the int8
    copy are not forward calls (on the clinical CT they made the first estimate up to 9x the time left). From the
    second call on the rate leaves out the first call, which also carries the one-off kernel set-up."""
    windows_start = time.monotonic()
    first_call_end: Optional[float] = None

    def report(done: int, total: int) -> None:
        nonlocal windows_start, first_call_end
        now = time.monotonic()
        if done == 0:
            windows_start = now
            events.progress("infer", 0, total)
            return
        if first_call_end is None:
            first_call_end = now
        since, calls = (first_call_end, done - 1) if done > 1 else (windows_start, done)
        events.progress("infer", done, total, eta_s=round((now - since) / calls * (total - done), 1))

    return report


def segment_one(loaded, job: ScanJob, device, dtype, args, ctx, progress: bool = False) -> dict[str, Any]:
    """Segment one scan with a loaded model and write its outputs (all of them or none); ``progress``: report
    each forward call (a single scan; a batch reports per scan)."""
    from MedTuningLib.engine.infer import segment_images
    from MedTuningLib.segio import write_labelmap, write_segmentation

    events = ctx.events
    _check_dicom_input(job)
    for image in job.images:
        if not Path(image).exists():
            raise MedTuningError("FILE_NOT_FOUND", f"input image {image} does not exist", "check the image path")
    fractional = job.dicom_seg is not None and args.seg_type == "fractional"
    from MedTuningLib.engine.recipe import protocol_for

    result = segment_images(loaded, job.images, device, dtype, overlap=args.overlap, tta=args.tta,
                            min_component=args.min_component, log=events.log, on_window=ctx.cancel.check,
                            series=job.series, keep_probabilities=fractional,
                            protocol=protocol_for(args, loaded.crop),
                            regularize=bool(getattr(args, "dicom_resample", False)),
                            on_progress=window_progress(events) if progress else None)
    if job.dicom_seg is not None and result.dicom and result.dicom[0] is not None and result.dicom[0].regularized:
        raise MedTuningError("INVALID_OPTION", f"the series was resampled ({result.dicom[0].regularized}): its "
                             "result no longer lines up with the source slices, so no DICOM SEG can reference them",
                             "write a .seg.nrrd (--out RESULT.seg.nrrd without --dicom-seg) for a resampled series")
    events.progress("write", 0, 1, scan=job.id)
    source = result.provenance[0] if result.provenance else None
    model_name = Path(loaded.folder).name
    outputs: dict[str, Any] = {}
    created: list[Path] = []
    try:
        if job.out is not None:
            existed = job.out.exists()
            write_segmentation(job.out, result.masks, result.reference, loaded.scheme,
                               header=_provenance_header(source, model_name))
            if not existed:
                created.append(job.out)
            outputs["segmentation"] = str(job.out)
        if job.dicom_seg is not None:
            from MedTuningLib.dicomseg import write_dicom_seg

            existed = job.dicom_seg.exists()
            outputs["dicom_seg"] = write_dicom_seg(job.dicom_seg, result.masks, result.dicom[0], loaded.scheme,
                                                   manifest=loaded.manifest, model_name=model_name,
                                                   seg_type=args.seg_type, probabilities=result.probabilities)
            if not existed:
                created.append(job.dicom_seg)
        if job.labelmap is not None:
            write_labelmap(job.labelmap, result.class_map, result.reference)
            outputs["labelmap"] = str(job.labelmap)
    except BaseException:
        for path in created:  # all results or none
            path.unlink(missing_ok=True)
        raise
    events.progress("write", 1, 1, scan=job.id)
    voxels = {name: int(mask.sum()) for name, mask in result.masks.items()}
    events.log(f"segmented {job.id} in {result.seconds:.1f} s: " + ", ".join(f"{k} {v} voxels" for k, v in voxels.items()))
    outputs["segments"] = list(result.masks)
    outputs["seconds"] = round(result.seconds, 2)
    outputs["source"] = result.provenance
    return outputs


def _single_job(args) -> ScanJob:
    if not args.image:
        raise MedTuningError("USAGE", "segment needs --image (one per modality) or --batch-list",
                             "run 'medtuning segment --help' for the options")
    if args.out is None and args.dicom_seg is None:
        raise MedTuningError("USAGE", "segment needs --out RESULT.seg.nrrd (or RESULT.dcm, or --dicom-seg FILE)",
                             "run 'medtuning segment --help' for the options")
    for image in args.image:
        if not Path(image).exists():
            raise MedTuningError("FILE_NOT_FOUND", f"input image {image} does not exist", "check the --image path")
    job = ScanJob(id=Path(args.image[0]).name, images=list(args.image), labelmap=args.labelmap,
                  series=list(args.series or []))
    if args.out is not None:
        out = check_result_path(args.out, args.force)
        if out.name.lower().endswith(".dcm"):
            job.dicom_seg = out
        else:
            job.out = out
    if args.dicom_seg is not None:
        if job.dicom_seg is not None:
            raise MedTuningError("INVALID_OPTION", "--out is already a DICOM SEG (.dcm); --dicom-seg is a second one",
                                 "give --out RESULT.seg.nrrd --dicom-seg RESULT.dcm, or only one of them")
        if not args.dicom_seg.name.lower().endswith(".dcm"):
            raise MedTuningError("INVALID_OPTION", f"--dicom-seg {args.dicom_seg} must end in .dcm",
                                 "name the DICOM SEG e.g. result.dcm")
        if args.dicom_seg.exists() and not args.force:
            raise MedTuningError("OUTPUT_EXISTS", f"{args.dicom_seg} already exists",
                                 "choose another --dicom-seg, or pass --force")
        job.dicom_seg = args.dicom_seg
    if args.labelmap is not None and args.labelmap.exists() and not args.force:
        raise MedTuningError("OUTPUT_EXISTS", f"{args.labelmap} already exists", "choose another --labelmap, or --force")
    _check_dicom_input(job)
    check_replaceable(job, args.force, args.model)
    return job


def check_replaceable(job: ScanJob, force: bool, model: Path) -> None:
    """--force replaces an earlier result only, never a folder, one of this command's inputs, or a file of a
    case library or model folder (OUTPUT_NOT_REPLACEABLE; issue 15)."""
    from MedTuningLib.fileio import check_output_file

    inputs = [("input image", Path(p)) for p in job.images] + [("model folder (--model)", Path(model))]
    for option, path in (("--out", job.out), ("--dicom-seg", job.dicom_seg), ("--labelmap", job.labelmap)):
        if path is not None:
            check_output_file(Path(path), force, "result", option, inputs)


def run(args, ctx) -> dict:
    from MedTuningLib.engine.device import resolve_device, resolve_precision
    from MedTuningLib.engine.modelfolder import load_model_folder
    from MedTuningLib.engine.recipe import inference_options
    from MedTuningLib.fileio import check_writable_dir

    events = ctx.events
    device = resolve_device(args.device)
    events.start("segment", device=str(device))
    fast = inference_options(args, ctx.argv, device.type)  # --protocol paper: fp32; --fast: overlap 0, int8 on a CPU
    if fast:
        ctx.events.log(fast)
    if getattr(args, "batch_list", None) is not None:
        return run_batch(args, ctx, device)
    job = _single_job(args)
    # Checked now, created only when the result is written: a refusal or failure leaves no empty folders.
    for path in job.outputs:
        check_writable_dir(Path(path).parent.absolute(), "output")
    if os.environ.get("MEDTUNING_WORKDIR"):
        ctx.cancel.watch_dir = Path(os.environ["MEDTUNING_WORKDIR"])
    events.progress("prepare", 0, 1)
    loaded = load_model_folder(args.model, device, weights=args.weights)
    dtype = resolve_precision(args.precision, device)
    events.progress("infer", 0, 1)
    return segment_one(loaded, job, device, dtype, args, ctx, progress=True)


def _batch_jobs(args, modalities: list[str]) -> list[ScanJob]:
    from MedTuningLib.engine.batch import read_batch_csv, read_batch_folder

    source = Path(args.batch_list)
    if args.image or args.dicom_seg is not None or args.labelmap is not None or args.series:
        raise MedTuningError("USAGE", "--batch-list takes the images, series and outputs from the list; it cannot be "
                             "combined with --image, --series, --dicom-seg or --labelmap",
                             "put these in the CSV's columns (see 'medtuning segment --help')")
    if args.batch_format not in FORMATS:
        raise MedTuningError("INVALID_OPTION", f"--batch-format must be one of {', '.join(FORMATS)}", "")
    if not source.exists():
        raise MedTuningError("FILE_NOT_FOUND", f"the batch list {source} does not exist", "check the --batch-list path")
    if source.is_dir():
        if args.out is None:
            raise MedTuningError("USAGE", "a --batch-list folder needs --out DIR for the results",
                                 "add --out RESULTS_FOLDER")
        return read_batch_folder(source, modalities, Path(args.out), args.batch_format)
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise MedTuningError("INVALID_OPTION", f"with --batch-list, --out {args.out} must be a folder",
                             "give a folder for the results, or put an out column in the CSV")
    return read_batch_csv(source, modalities, Path(args.out) if args.out is not None else None, args.batch_format)


def run_batch(args, ctx, device) -> dict:
    """Segment every scan of a batch list with one model load; see the module docstring."""
    from MedTuningLib.engine.device import resolve_precision
    from MedTuningLib.engine.modelfolder import load_model_folder, read_manifest

    events = ctx.events
    if os.environ.get("MEDTUNING_WORKDIR"):
        ctx.cancel.watch_dir = Path(os.environ["MEDTUNING_WORKDIR"])
    modalities = list(read_manifest(args.model)["modalities"])
    jobs = _batch_jobs(args, modalities)
    total = len(jobs)
    pending = [j for j in jobs if args.force or j.error is not None or not all(output_complete(p) for p in j.outputs)]
    events.log(f"batch of {total} scan(s): {total - len(pending)} already done, {len(pending)} to segment")
    loaded = None
    dtype = None
    results: list[dict[str, Any]] = []
    t0 = time.monotonic()
    seconds: list[float] = []
    for index, job in enumerate(jobs):
        entry = describe(job)
        if job not in pending:
            entry["status"] = "skipped"
            results.append(entry)
            events.progress("batch", index + 1, total, scan=job.id, status="skipped")
            continue
        events.progress("batch", index, total, scan=job.id, status="running")
        start = time.monotonic()
        try:
            if job.error is not None:
                raise job.error
            check_replaceable(job, True, args.model)  # a listed output may be an input or a library file
            if loaded is None:  # loaded once, for the first scan that needs it
                events.progress("prepare", 0, 1)
                loaded = load_model_folder(args.model, device, weights=args.weights)
                dtype = resolve_precision(args.precision, device)
                events.log(f"loaded model {args.model}", model_loaded=str(args.model))
                events.progress("prepare", 1, 1)
            entry.update(segment_one(loaded, job, device, dtype, args, ctx))
            entry["status"] = "ok"
            seconds.append(time.monotonic() - start)
        except Cancelled as exc:
            exc.outputs = {"scans": results, "cancelled_at": job.id}  # type: ignore[attr-defined]
            raise
        except MedTuningError as exc:
            if exc.code in ("MODEL_FOLDER_INVALID", "MODEL_FOLDER_TOO_NEW", "WEIGHTS_NOT_FOUND",
                            "WEIGHTS_CHECKSUM_MISMATCH", "WEIGHTS_INCOMPATIBLE", "DEVICE_UNAVAILABLE", "UNSAFE_FILE",
                            "DISK_FULL"):
                raise  # the model, not the scan: every other scan would fail the same way
            entry.update(status="failed", code=exc.code, message=exc.message, hint=exc.hint)
            events.log(f"scan {job.id} failed [{exc.code}]: {exc.message}", level="warning", scan=job.id,
                       code=exc.code, hint=exc.hint)
        except Exception as exc:  # a bug or a device failure on one scan: report it, go on with the others
            traceback.print_exc(file=sys.stderr)
            code = "OUT_OF_MEMORY" if "out of memory" in str(exc).lower() else "INTERNAL_ERROR"
            entry.update(status="failed", code=code, message=f"{type(exc).__name__}: {exc}")
            events.log(f"scan {job.id} failed [{code}]: {type(exc).__name__}: {exc}", level="warning",
                       scan=job.id, code=code)
        results.append(entry)
        done = sum(1 for r in results if r["status"] == "ok")
        remaining = sum(1 for j in pending[pending.index(job) + 1:])
        eta = (sum(seconds) / len(seconds)) * remaining if seconds else None
        events.progress("batch", index + 1, total, scan=job.id, status=entry["status"], segmented=done,
                        eta_s=round(eta, 1) if eta is not None else None)
    failed = [r for r in results if r["status"] == "failed"]
    summary = {"scans": results, "total": total, "segmented": sum(1 for r in results if r["status"] == "ok"),
               "skipped": sum(1 for r in results if r["status"] == "skipped"), "failed": len(failed),
               "seconds": round(time.monotonic() - t0, 2),
               "seconds_per_scan": round(sum(seconds) / len(seconds), 2) if seconds else None}
    if failed:
        listing = "; ".join(f"{r['scan']} [{r['code']}]" for r in failed)
        raise MedTuningError("BATCH_INCOMPLETE", f"{len(failed)} of {total} scan(s) failed: {listing}; "
                             f"{summary['segmented']} segmented, {summary['skipped']} already done",
                             "fix the scans listed (their codes and hints are in the log), then run the same "
                             "command again: finished scans are skipped", **summary)
    return summary
