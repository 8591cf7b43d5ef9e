"""``medtuning segment``: segment one scan with a model folder into a .seg.nrrd."""

from __future__ import annotations

import os
from pathlib import Path

from MedTuningLib.errors import MedTuningError


def check_result_path(out: Path, force: bool) -> Path:
    out = Path(out)
    if not out.name.lower().endswith(".seg.nrrd"):
        raise MedTuningError("INVALID_OPTION", f"--out {out} must end in .seg.nrrd (a 3D Slicer segmentation)",
                             "name the result e.g. result.seg.nrrd; use --labelmap for a NIfTI labelmap")
    if out.exists() and not force:
        raise MedTuningError("OUTPUT_EXISTS", f"{out} already exists", "choose another --out, or pass --force")
    return out


def run(args, ctx) -> dict:
    from MedTuningLib.engine.device import resolve_device, resolve_precision
    from MedTuningLib.engine.infer import segment_images
    from MedTuningLib.engine.modelfolder import load_model_folder
    from MedTuningLib.fileio import check_writable_dir
    from MedTuningLib.segio import write_labelmap, write_segmentation

    events = ctx.events
    device = resolve_device(args.device)
    events.start("segment", device=str(device))
    out = check_result_path(args.out, args.force)
    if args.labelmap is not None and args.labelmap.exists() and not args.force:
        raise MedTuningError("OUTPUT_EXISTS", f"{args.labelmap} already exists", "choose another --labelmap, or --force")
    for image in args.image:
        if not Path(image).exists():
            raise MedTuningError("FILE_NOT_FOUND", f"input image {image} does not exist", "check the --image path")
    # Checked now, created only when the result is written: a refusal or failure leaves no empty folders.
    check_writable_dir(out.parent.absolute(), "output")
    if args.labelmap is not None:
        check_writable_dir(Path(args.labelmap).parent.absolute(), "labelmap")
    if os.environ.get("MEDTUNING_WORKDIR"):
        ctx.cancel.watch_dir = Path(os.environ["MEDTUNING_WORKDIR"])
    events.progress("prepare", 0, 1)
    loaded = load_model_folder(args.model, device, weights=args.weights)
    dtype = resolve_precision(args.precision, device)
    events.progress("infer", 0, 1)
    result = segment_images(loaded, args.image, device, dtype, overlap=args.overlap, tta=args.tta,
                            min_component=args.min_component, log=events.log, on_window=ctx.cancel.check)
    events.progress("write", 0, 1)
    existed = out.exists()
    write_segmentation(out, result.masks, result.reference, loaded.scheme)
    outputs = {"segmentation": str(out)}
    if args.labelmap is not None:
        try:
            write_labelmap(args.labelmap, result.class_map, result.reference)
        except BaseException:
            if not existed:  # both results or neither
                out.unlink(missing_ok=True)
            raise
        outputs["labelmap"] = str(args.labelmap)
    events.progress("write", 1, 1)
    voxels = {name: int(mask.sum()) for name, mask in result.masks.items()}
    events.log(f"segmented in {result.seconds:.1f} s: " + ", ".join(f"{k} {v} voxels" for k, v in voxels.items()))
    outputs["segments"] = list(result.masks)
    outputs["seconds"] = round(result.seconds, 2)
    return outputs
