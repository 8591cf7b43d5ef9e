"""``medtuning suggest --model M --library LIB [--top K]``: which scan to correct next.

Ranks the library's unlabelled scans (split ``unlabelled``) by the model's uncertainty, most uncertain
first. The measure is the **mean normalised softmax entropy over the scan's candidate voxels**, the
voxels where the model gives the structures (any non-background class) at least 10 % probability:

- entropy, because it needs one forward pass per scan (the cost of ``segment``), where disagreement
  between flipped passes needs several;
- over the candidate voxels, not the whole volume: most of a scan is confidently background, so a
  whole-volume mean mostly measures how large the structure is, not how sure the model is about it;
- normalised by log(classes), so scores lie in 0..1 whatever the label scheme.

A scan in which the model finds no candidate voxel at all scores 1.0 (the radiologist would have to
draw every structure: the most to gain from correcting it). ``outputs.ranking`` of the ``done`` event
lists each scan's id, score, candidate volume (mm³) and image files; the first is "next scan to correct".
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

CANDIDATE_PROBABILITY = 0.1


def uncertainty(probs: np.ndarray, spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> dict[str, Any]:
    """Score one scan from its softmax ``[K, D, H, W]`` (see the module docstring)."""
    k = probs.shape[0]
    p = np.clip(probs.astype(np.float64), 1e-12, 1.0)
    entropy = -(p * np.log(p)).sum(0) / math.log(k)
    candidate = (1.0 - probs[0]) >= CANDIDATE_PROBABILITY
    n = int(candidate.sum())
    score = float(entropy[candidate].mean()) if n else 1.0
    voxel_mm3 = float(np.prod(spacing))
    return {"score": round(score, 6), "candidate_voxels": n, "candidate_mm3": round(n * voxel_mm3, 1),
            "foreground_voxels": int((probs[1:].max(0) > probs[0]).sum())}  # argmax > 0, without the argmax


def run(args, ctx) -> dict:
    from MedTuningLib.cases import CaseLibrary
    from MedTuningLib.data.io import read_case_images
    from MedTuningLib.data.preprocess import normalize_intensity
    from MedTuningLib.engine.device import resolve_device, resolve_precision
    from MedTuningLib.engine.infer import predict_on_input_grid
    from MedTuningLib.engine.windows import DEFAULT_OVERLAP
    from MedTuningLib.engine.modelfolder import load_model_folder
    from MedTuningLib.errors import MedTuningError

    events = ctx.events
    device = resolve_device(args.device)
    events.start("suggest", device=str(device))
    dtype = resolve_precision(args.precision, device)
    library = CaseLibrary(args.library)
    scans = library.cases("unlabelled")
    if not scans:
        raise MedTuningError("NO_TRAINING_CASES", f"the case library {args.library} has no unlabelled scans to rank",
                             "add scans without a label: 'medtuning cases add --library LIB --image FILE "
                             "--split unlabelled'")
    loaded = load_model_folder(args.model, device)
    ranking = []
    for i, case in enumerate(scans):
        ctx.cancel.check()
        events.progress("infer", i, len(scans), case=case.id)
        if len(case.image_paths) != len(loaded.modalities):
            raise MedTuningError("MODALITY_COUNT_MISMATCH", f"scan {case.id!r} has {len(case.image_paths)} image(s); "
                                 f"the model reads {len(loaded.modalities)} ({', '.join(loaded.modalities)})",
                                 "rank scans with a model of the same modalities", case=case.id)
        array, reference = read_case_images(case.image_paths, log=events.log)
        array = normalize_intensity(array, loaded.preprocessing)
        spacing = tuple(float(s) for s in reversed(reference.GetSpacing()))  # (z, y, x), as the arrays
        # On the model's working grid, as segment sees the scan; scored on the scan's own voxels.
        probs = predict_on_input_grid(loaded.model, array, spacing, loaded.spacing, loaded.crop, device, dtype,
                                      overlap=DEFAULT_OVERLAP, on_window=ctx.cancel.check)
        entry = {"id": case.id, **uncertainty(probs.numpy(), spacing),
                 "images": [str(p) for p in case.image_paths]}
        ranking.append(entry)
        events.metric("infer", "uncertainty", entry["score"], case=case.id)
    events.progress("infer", len(scans), len(scans))
    ranking.sort(key=lambda e: (-e["score"], e["id"]))
    for rank, entry in enumerate(ranking, start=1):
        entry["rank"] = rank
    if args.top is not None:
        ranking = ranking[:args.top]
    if not events.jsonl:
        if args.json:
            events.out.write(json.dumps(ranking, indent=2, ensure_ascii=False) + "\n")
        else:
            lines = ["rank  uncertainty  candidate mm³  scan"]
            lines += [f"{e['rank']:>4}  {e['score']:>11.4f}  {e['candidate_mm3']:>13.0f}  {e['id']}" for e in ranking]
            events.out.write("\n".join(lines) + "\n")
    return {"model": str(args.model), "library": str(args.library),
            "measure": "mean normalised softmax entropy over candidate voxels (P(foreground) >= 0.1)",
            "ranking": ranking, "next": ranking[0]["id"] if ranking else None}
