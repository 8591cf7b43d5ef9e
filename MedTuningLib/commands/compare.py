"""``medtuning compare MODEL_DIR... [--library DIR] [--split test] [--out DIR]``: the paper-style table.

One row per model folder: method, tuned and inserted parameters (M), tuned as % of the full model,
Dice and HD95 per region, training time and peak memory — the best value of each column marked
(bold in Markdown, the ``best`` column in CSV; higher Dice, lower everything else).

Where the Dice / HD95 figures come from is part of the table (column ``metrics from``):

- with ``--library``, each model is evaluated now on that library's ``--split``
  (``MedTuningLib.engine.evaluate.evaluate_model``): the same cases for every model;
- otherwise the model folder's last evaluation (``evaluation`` in ``medtuning.json``) if it has one,
- else the library's test cases scored when the model was trained (``test``),
- else the best validation figures recorded by training (``training.best``) — not a held-out test.

Text mode prints the Markdown table; ``--events jsonl`` adds a ``table`` event (rows and Markdown).
With ``--out`` the table is also written as ``compare.md``, ``compare.csv`` and ``compare.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from MedTuningLib.errors import MedTuningError
from MedTuningLib.fileio import (ensure_writable_dir, read_json, refuse_to_replace, write_bytes_atomic,
                                 write_json_atomic)
from MedTuningLib.reports.tables import Column, comparison_table
from MedTuningLib.schema import ModelManifest, finite_number

MANIFEST = "medtuning.json"


@dataclass
class ModelSummary:
    """What the comparison needs from one model folder."""

    folder: Path
    method: str
    arch: str = ""
    backbone: str = ""
    pretrained: bool | None = None
    parameters: dict[str, int] = field(default_factory=dict)
    seconds: float | None = None
    peak_memory_mb: float | None = None
    epochs: int | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)  # "dice/<region>" -> mean
    regions: list[str] = field(default_factory=list)
    source: str = ""


def _invalid(folder: Path, what: str) -> MedTuningError:
    return MedTuningError("MODEL_FOLDER_INVALID", f"the model folder {folder} has {what}",
                          "pass folders written by 'medtuning train' (each holds medtuning.json); retrain or "
                          "restore a broken one", path=str(folder))


def _means(summary: Mapping[str, Any]) -> dict[str, float | None]:
    """``{"dice/kidney": {"mean": .9, ...}}`` or ``{"dice/kidney": .9}`` -> ``{"dice/kidney": .9}``."""
    out: dict[str, float | None] = {}
    for key, entry in summary.items():
        if not isinstance(key, str) or "/" not in key:
            continue
        out[key] = finite_number(entry.get("mean")) if isinstance(entry, Mapping) else finite_number(entry)
    return out


def _regions_of(metrics: Mapping[str, Any], preferred: Sequence[str] = ()) -> list[str]:
    regions = [r for r in preferred if isinstance(r, str)]
    for key in metrics:
        kind, _, region = key.partition("/")
        if kind in ("dice", "hd95") and region and region not in regions:
            regions.append(region)
    return regions


def read_model_summary(folder: Path) -> ModelSummary:
    """Read and check ``folder/medtuning.json``; raise MODEL_FOLDER_INVALID if missing or malformed."""
    folder = Path(folder)
    if not folder.is_dir():
        partial = folder.with_name(folder.name + ".partial")
        hint = (f"{partial} exists: that training has not finished (resume it with 'medtuning train --resume')"
                if partial.is_dir() else "check the path")
        raise MedTuningError("FILE_NOT_FOUND", f"the model folder {folder} does not exist", hint, path=str(folder))
    meta = read_json(folder / MANIFEST, "MODEL_FOLDER_INVALID", "model description")
    if not isinstance(meta, dict):
        raise _invalid(folder, f"a {MANIFEST} that is not a JSON object")
    record = ModelManifest.from_dict(meta, str(folder / MANIFEST))
    name = record.method_name
    if not name:
        raise _invalid(folder, f"no tuning method in {MANIFEST} (expected \"method\": {{\"name\": ...}})")
    training = record.training
    summary = ModelSummary(folder=folder, method=name, arch=record.arch, backbone=record.backbone,
                           pretrained=record.pretrained, parameters=dict(record.parameters),
                           seconds=training.seconds, peak_memory_mb=training.peak_memory_mb, epochs=training.epochs)
    # Held-out figures first: the last 'evaluate' recorded in the folder, else the test cases scored when it
    # was trained; only then the validation figures that picked the best epoch (not a held-out test).
    if record.evaluation is not None and record.evaluation.summary:
        use_metrics(summary, record.evaluation.to_dict(), default_source="last evaluation")
    elif record.test is not None and record.test.summary:
        use_metrics(summary, record.test.to_dict(), default_source="held-out test at training")
    elif training.best:
        # training's "dice/mean" (average over regions) is not an evaluation region: leave it out
        summary.metrics = {k: v for k, v in _means(training.best).items() if k != "dice/mean"}
        summary.regions = _regions_of(summary.metrics)
        summary.source = "training: best validation"
    return summary


def use_metrics(summary: ModelSummary, report: Mapping[str, Any], default_source: str = "evaluation") -> None:
    """Take Dice / HD95 means from an evaluate report (``{"summary": ..., "split": ...}``) or a bare summary."""
    table = report.get("summary") if isinstance(report.get("summary"), Mapping) else report
    summary.metrics = _means(table)
    summary.regions = _regions_of(summary.metrics, report.get("regions") or ())
    split = report.get("split")
    cases = report.get("cases")
    source = f"{default_source}: {split}" if split else default_source
    if isinstance(cases, list):
        source += f" ({len(cases)} case{'s' if len(cases) != 1 else ''})"
    summary.source = source


def _millions(value: Any) -> str:
    return f"{value / 1e6:.3f}"


def comparison_rows(models: Sequence[ModelSummary]) -> tuple[list[dict[str, Any]], list[Column]]:
    """The table's rows and columns for a list of model summaries.

    Dice / HD95 columns are ranked only when every model's figures come from the same kind of
    source (all evaluated now, all last evaluations, or all training validation): a test Dice and a
    validation Dice are not compared.
    """
    regions: list[str] = []
    for m in models:
        regions += [r for r in m.regions if r not in regions]
    # "mean" (an average over regions written by training) goes last, after the real regions
    regions.sort(key=lambda r: r == "mean")
    has_hd95 = {r for m in models for r in regions if m.metrics.get(f"hd95/{r}") is not None}

    rows = []
    for m in models:
        full, tuned = m.parameters.get("full"), m.parameters.get("tuned")
        method = m.method + (" (not pretrained)" if m.pretrained is False else "")
        row: dict[str, Any] = {
            "model": m.folder.name, "method": method,
            "arch": m.arch + (f" ({m.backbone})" if m.backbone else ""),
            "tuned_params": tuned, "inserted_params": m.parameters.get("inserted"),
            "tuned_percent_of_full": 100.0 * tuned / full if tuned is not None and full else None,
            "training_minutes": m.seconds / 60.0 if m.seconds is not None else None,
            "peak_memory_mb": m.peak_memory_mb, "metrics_source": m.source or "none",
        }
        for r in regions:
            row[f"dice/{r}"] = m.metrics.get(f"dice/{r}")
            row[f"hd95/{r}"] = m.metrics.get(f"hd95/{r}")
        rows.append(row)

    columns = [Column("model", "model"), Column("method", "method")]
    if any(r["arch"] for r in rows):
        columns.append(Column("arch", "architecture"))
    columns += [Column("tuned_params", "tuned params (M)", False, _millions),
                Column("inserted_params", "inserted params (M)", False, _millions),
                Column("tuned_percent_of_full", "tuned % of full", False, ".2f")]
    comparable = len({_source_kind(m.source) for m in models}) <= 1
    columns += [Column(f"dice/{r}", f"Dice {r}", True if comparable else None, ".4f", "right") for r in regions]
    columns += [Column(f"hd95/{r}", f"HD95 {r} (mm)", False if comparable else None, ".2f", "right")
                for r in regions if r in has_hd95]
    columns += [Column("training_minutes", "training time (min)", False, ".1f"),
                Column("peak_memory_mb", "peak memory (MB)", False, ".0f"),
                Column("metrics_source", "metrics from")]
    return rows, columns


def _source_kind(source: str) -> str:
    """``"last evaluation: test (3 cases)"`` -> ``"last evaluation: test"`` (what, on which split)."""
    return source.split(" (", 1)[0]


def _evaluate(models: list[ModelSummary], args, ctx) -> None:
    try:
        from MedTuningLib.engine.evaluate import evaluate_model
    except ImportError as exc:
        raise MedTuningError("NOT_IMPLEMENTED", f"evaluation is not available in this build ({exc})",
                             "run 'medtuning compare' without --library to use the folders' recorded figures") from exc
    for i, m in enumerate(models):
        ctx.cancel.check()
        ctx.events.log(f"evaluating model {i + 1}/{len(models)}: {m.folder} on the '{args.split}' cases "
                       f"of {args.library}")
        report = evaluate_model(m.folder, args.library, args.split, args.device, ctx.events)
        use_metrics(m, report, default_source="evaluated")


def run(args, ctx) -> dict:
    """Build the comparison table; print it (text mode) and write it under ``--out``."""
    ctx.events.start("compare", device=args.device if args.library is not None else None)
    if args.out is not None:  # refused before minutes of evaluation, not after
        inputs = [("model folder", Path(m)) for m in args.models] + [("case library (--library)", args.library)]
        refuse_to_replace(Path(args.out), ("compare.md", "compare.csv", "compare.json"), "comparison",
                          getattr(args, "force", False), inputs=inputs, option="--out", keys=("columns", "rows"))
    models = [read_model_summary(Path(folder)) for folder in args.models]
    if args.library is not None:
        _evaluate(models, args, ctx)
    rows, columns = comparison_rows(models)
    markdown, csv_text = comparison_table(rows, columns)
    sources = sorted({r["metrics_source"] for r in rows})
    notes = ("Best value per column in bold (Dice: higher is better; HD95, parameters, time, memory: lower). "
             f"Dice / HD95 from: {'; '.join(sources)}.")
    if len({_source_kind(s) for s in sources}) > 1:
        notes += (" The models' figures come from different sources: they are not directly comparable, and "
                  "their best values are not marked.")
        ctx.events.warning("the models' Dice figures come from different sources (" + "; ".join(sources)
                           + "); pass --library to evaluate all of them on the same cases")

    outputs: dict[str, Any] = {"models": len(models)}
    if args.out is not None:
        out = ensure_writable_dir(Path(args.out), "comparison")
        document = f"# Comparison of {len(models)} models\n\n{markdown}\n{notes}\n"
        write_bytes_atomic(out / "compare.md", document.encode("utf-8"), "comparison")
        write_bytes_atomic(out / "compare.csv", csv_text.encode("utf-8"), "comparison")
        write_json_atomic(out / "compare.json", {"columns": [c.key for c in columns], "rows": rows}, "comparison")
        outputs.update(markdown=str(out / "compare.md"), csv=str(out / "compare.csv"), json=str(out / "compare.json"))
    if ctx.events.jsonl:
        ctx.events.emit("table", name="compare", markdown=markdown, columns=[c.key for c in columns], rows=rows)
    else:
        ctx.events.out.write(markdown + "\n" + notes + "\n")
        ctx.events.out.flush()
    return outputs
