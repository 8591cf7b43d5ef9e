"""Scores of a training run: validation Dice after epochs (picks the best epoch) and the held-out test cases
of the library, scored once at the end and recorded in the model folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from MedTuningLib.cancel import CancelToken
from MedTuningLib.engine.modelfolder import now_iso
from MedTuningLib.engine.train_data import normalise_cases, read_case_for
from MedTuningLib.events import EventStream
from MedTuningLib.schema import CaseScores, EvaluationReport, summarise_scores


def validate_cases(model, val_data: list[dict], scheme, crop: tuple[int, int, int], device: torch.device, dtype,
                   cancel: CancelToken, events: EventStream) -> dict[str, float]:
    """Mean Dice per region (and ``dice/mean``) over the validation cases, by sliding window; leaves the
    model in training mode."""
    from MedTuningLib.engine.evaluate import region_scores
    from MedTuningLib.engine.infer import class_map_of, predict_probabilities

    per_case = []
    for i, case in enumerate(val_data):
        cancel.check()
        probs = predict_probabilities(model, torch.from_numpy(case["image"]), crop, device, dtype, overlap=0.25,
                                      on_window=cancel.check)
        pred = class_map_of(probs)
        per_case.append(region_scores(scheme, pred, case["label"][0], case["spacing"], hd95=False))
        events.progress("validate", i + 1, len(val_data))
    model.train()
    metrics: dict[str, float] = {}
    for name in per_case[0]:
        values = [c[name] for c in per_case if c[name] is not None and np.isfinite(c[name])]
        if values:
            metrics[name] = float(np.mean(values))
    dice_values = [v for k, v in metrics.items() if k.startswith("dice/") and k != "dice/mean"]
    metrics["dice/mean"] = float(np.mean(dice_values)) if dice_values else 0.0
    return metrics


def score_test_cases(model, library, scheme, preprocessing, cache, spacing, crop: tuple[int, int, int],
                     device: torch.device, dtype, cancel: CancelToken, events: EventStream, out: Path,
                     library_path: Path, init_from: Path | None) -> EvaluationReport | None:
    """Dice per region on the library's test cases (held out: never trained on nor used for selection),
    recorded in the model folder so that every round is scored on the same cases."""
    from MedTuningLib.engine.evaluate import region_scores
    from MedTuningLib.engine.infer import class_map_of, predict_on_input_grid

    cases = [c for c in library.cases("test") if c.labelled]
    if not cases:
        events.log("the library has no test cases: no held-out scores are recorded for this round "
                   "(add some with 'medtuning cases add --split test')", level="warning")
        return None
    scored = []
    for i, case in enumerate(cases):
        cancel.check()
        raw = read_case_for(case, scheme, cache, allow_empty=True, log=events.log, model=init_from)
        data = normalise_cases([raw], preprocessing)[0]
        # Scored on the case's own grid, as 'medtuning evaluate' scores it.
        probs = predict_on_input_grid(model, data["image"], data["spacing"], spacing, crop, device, dtype,
                                      overlap=0.25, on_window=cancel.check)
        metrics = region_scores(scheme, class_map_of(probs), data["label"][0], data["spacing"], hd95=False)
        scored.append(CaseScores(id=case.id, metrics=metrics))
        events.progress("infer", i + 1, len(cases), case=case.id, split="test")
    regions = [r.name for r in scheme.regions] + (["composite"] if scheme.composite else [])
    report = EvaluationReport(model=str(out), library=str(Path(library_path).absolute()), split="test",
                              regions=regions, cases=scored, summary=summarise_scores(scored),
                              protocol="held-out test cases of the library (never trained on, not used to "
                                       "pick the best epoch); Dice, no TTA", created=now_iso())
    for name, entry in report.summary.items():
        if entry.get("mean") is not None:
            events.metric("test", name, entry["mean"])
    return report
