"""Evaluation: Dice and 95% Hausdorff distance per region, with MONAI's metrics.

Regions are the scheme's evaluation regions (BraTS ET / TC / WT, KiTS kidney / tumour plus their
composite mean, or each custom segment). HD95 is measured in millimetres with the volume's
spacing. A region absent from both reference and prediction scores Dice 1 and HD95 0; absent from
one of them, Dice 0 and HD95 undefined (reported as null).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from MedTuningLib.engine.windows import DEFAULT_OVERLAP, Overlap
from MedTuningLib.errors import MedTuningError
from MedTuningLib.events import EventStream
from MedTuningLib.fileio import ensure_writable_dir, write_bytes_atomic, write_json_atomic
from MedTuningLib.schema import CaseScores, EvaluationReport


def dice_hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], hd95: bool = True,
              hd95_both_empty: float | None = 0.0) -> tuple[float, float | None]:
    """Dice and HD95 (mm) of two boolean masks, by MONAI's ``compute_dice`` / ``compute_hausdorff_distance``.

    ``hd95_both_empty``: the HD95 of a region absent from both (0 mm; the paper protocol leaves it out: None)."""
    from monai.metrics import compute_dice, compute_hausdorff_distance

    pred_any, ref_any = bool(pred.any()), bool(ref.any())
    if not pred_any and not ref_any:
        return 1.0, hd95_both_empty
    if not pred_any or not ref_any:
        return 0.0, None
    p = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float32))[None, None]
    r = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))[None, None]
    dice = float(compute_dice(p, r, include_background=True)[0, 0])
    distance = None
    if hd95:
        distance = float(compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                                    spacing=[float(s) for s in spacing])[0, 0])
    return dice, distance


def region_scores(scheme, pred_classes: np.ndarray, ref_classes: np.ndarray, spacing: Sequence[float],
                  hd95: bool = True, hd95_both_empty: float | None = 0.0) -> dict[str, float | None]:
    """``{"dice/<region>": ..., "hd95/<region>": ...}`` for every evaluation region (+ composite)."""
    pred_regions = scheme.region_masks(pred_classes)
    ref_regions = scheme.region_masks(ref_classes)
    scores: dict[str, float | None] = {}
    for region in scheme.regions:
        dice, distance = dice_hd95(pred_regions[region.name], ref_regions[region.name], spacing, hd95,
                                   hd95_both_empty)
        scores[f"dice/{region.name}"] = dice
        if hd95:
            scores[f"hd95/{region.name}"] = distance
    composite = list(getattr(scheme, "composite", []) or [])
    if composite:
        scores["dice/composite"] = float(np.mean([scores[f"dice/{name}"] for name in composite]))
    return scores


def summarise(cases: list[dict]) -> dict[str, dict]:
    """Mean, standard deviation and count over cases for every metric (nulls left out)."""
    names: list[str] = []
    for case in cases:
        names += [n for n in case["metrics"] if n not in names]
    summary = {}
    for name in names:
        values = [c["metrics"].get(name) for c in cases]
        values = [v for v in values if v is not None and np.isfinite(v)]
        summary[name] = {"mean": float(np.mean(values)) if values else None,
                         "std": float(np.std(values)) if values else None, "n": len(values)}
    return summary


def markdown_report(report: dict) -> str:
    regions = report["regions"]
    lines = [f"# Evaluation of {report['model']}", "",
             f"Split: `{report['split']}` ({len(report['cases'])} case(s)). Protocol: {report.get('protocol', '')}.", "",
             "| case | " + " | ".join(f"Dice {r}" for r in regions) + " | " + " | ".join(f"HD95 {r} (mm)" for r in regions
                                                                                 if f"hd95/{r}" in report["summary"]) + " |"]
    hd_regions = [r for r in regions if f"hd95/{r}" in report["summary"]]
    lines.append("|---" * (1 + len(regions) + len(hd_regions)) + "|")

    def fmt(value: Any, digits: int = 4) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    for case in report["cases"]:
        m = case["metrics"]
        lines.append(f"| {case['id']} | " + " | ".join(fmt(m.get(f'dice/{r}')) for r in regions) + " | "
                     + " | ".join(fmt(m.get(f'hd95/{r}'), 2) for r in hd_regions) + " |")
    s = report["summary"]

    def mean_sd(name: str, digits: int) -> str:
        entry = s.get(name) or {}
        if entry.get("mean") is None:
            return "–"
        return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"

    lines.append("| **mean ± sd** | " + " | ".join(mean_sd(f"dice/{r}", 4) for r in regions) + " | "
                 + " | ".join(mean_sd(f"hd95/{r}", 2) for r in hd_regions) + " |")
    return "\n".join(lines) + "\n"


def evaluate_model(model_dir: Path, library: Path, split: str = "test", device: str = "auto",
                   events: EventStream | None = None, tta: bool = False, overlap: Overlap = DEFAULT_OVERLAP,
                   report_dir: Path | None = None, weights: str | None = None, precision: str = "auto",
                   case_ids: Sequence[str] | None = None, protocol: str = "", cancel=None,
                   montages: bool = True, inference: str = "project") -> dict:
    """Segment every case of a library split with a model folder and score it against its label.

    ``inference="paper"``: the official protocol (engine/recipe.py: windows at stride crop/3, uniform
    averaging, 8-flip TTA, BraTS ET < 500 voxels -> NCR/NET, HD95 of regions absent from both left out)."""
    from MedTuningLib.cases import CaseLibrary
    from MedTuningLib.data.io import read_label
    from MedTuningLib.engine.device import resolve_device, resolve_precision
    from MedTuningLib.engine.infer import segment_images
    from MedTuningLib.engine.modelfolder import load_model_folder

    events = events or EventStream("text", enabled=False)
    torch_device = resolve_device(device)
    dtype = resolve_precision(precision, torch_device)
    if report_dir is not None:
        ensure_writable_dir(Path(report_dir), "report")
    loaded = load_model_folder(model_dir, torch_device, weights=weights)
    from MedTuningLib.engine.recipe import inference_protocol

    window = inference_protocol(inference, loaded.crop, tta=tta, overlap=overlap)
    if inference == "paper":
        tta = window.tta
        protocol = "; ".join(p for p in (protocol, window.describe()) if p)
    lib = CaseLibrary(library)
    if case_ids is not None:
        cases = [lib.get(i) for i in case_ids]
    else:
        cases = [c for c in lib.cases(None if split == "all" else split) if c.labelled]  # unlabelled scans: no score
    if not cases:
        raise MedTuningError("NO_TRAINING_CASES", f"the case library {library} has no cases in split '{split}'",
                             "add cases with 'medtuning cases add --split test', or choose another --split")
    results = []
    pictures: dict[str, dict[str, str]] = {}
    for i, case in enumerate(cases):
        if cancel is not None:
            cancel.check()
        events.progress("infer", i, len(cases), case=case.id)
        t0 = time.monotonic()
        result = segment_images(loaded, case.image_paths, torch_device, dtype, overlap=overlap, tta=tta,
                                log=events.log, on_window=cancel.check if cancel is not None else None,
                                protocol=window if inference == "paper" else None)
        reference_classes = read_label(case.label_path, result.reference, loaded.scheme, allow_empty=True)
        spacing = tuple(float(s) for s in reversed(result.reference.GetSpacing()))
        metrics = region_scores(loaded.scheme, result.class_map, reference_classes, spacing,
                                hd95_both_empty=window.hd95_both_empty)
        results.append({"id": case.id, "metrics": metrics, "seconds": round(time.monotonic() - t0, 2)})
        for name, value in metrics.items():
            if value is not None:
                events.metric("evaluate", name, value, case=case.id)
        if report_dir is not None and montages:
            pictures[case.id] = _case_montages(Path(report_dir), case, result, reference_classes, loaded.scheme)
    events.progress("infer", len(cases), len(cases))
    regions = [r.name for r in loaded.scheme.regions] + (["composite"] if getattr(loaded.scheme, "composite", None) else [])
    record = EvaluationReport(model=str(Path(model_dir)), library=str(Path(library)), split=split, regions=regions,
                              tta=tta, protocol=protocol or f"cases of split '{split}'",
                              cases=[CaseScores.from_dict(r) for r in results], summary=summarise(results),
                              pretrained=bool(loaded.manifest.get("pretrained", False)), created=_now())
    report = record.to_dict()
    if report_dir is not None:
        write_report_files(Path(report_dir), report, pictures)
    return report


def _case_montages(report_dir: Path, case, result, reference_classes, scheme) -> dict[str, str]:
    """One overlay montage per region for the HTML report; returns region -> relative PNG path.

    The scan drawn is the first modality, as segmentation read it (``result.reference``), turned once to
    the radiological convention whatever the file's axis order (RAS NIfTI included); each region's masks
    are turned the same way."""
    import SimpleITK as sitk

    from MedTuningLib.reports.montage import region_montage, to_lps_arrays

    (grey,), lps_spacing = to_lps_arrays(result.reference, sitk.GetArrayViewFromImage(result.reference))
    pred_regions = scheme.region_masks(result.class_map)
    ref_regions = scheme.region_masks(reference_classes)
    colors = {s.name: tuple(s.color) for s in scheme.segments}
    out = {}
    for region in scheme.regions:
        name = f"{_safe(case.id)}_{_safe(region.name)}.png"
        (predicted, reference), _ = to_lps_arrays(result.reference, pred_regions[region.name],
                                                   ref_regions[region.name])
        region_montage(grey, predicted, reference,
                       colors.get(region.name, (1.0, 0.8, 0.0)), lps_spacing, report_dir / "images" / name,
                       title=f"{case.id} – {region.name}")
        out[region.name] = f"images/{name}"
    return out


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(text))


def _now() -> str:
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def write_report_files(report_dir: Path, report: dict, pictures: dict | None = None) -> None:
    """report.json (an :class:`MedTuningLib.schema.EvaluationReport`), report.md and report.html."""
    report = EvaluationReport.from_dict(report, "the new report").to_dict()
    write_json_atomic(report_dir / "report.json", report, "report")
    write_bytes_atomic(report_dir / "report.md", markdown_report(report).encode("utf-8"), "report")
    if pictures is not None:
        from MedTuningLib.reports.html import write_html_report

        write_html_report(report_dir, report, pictures)
