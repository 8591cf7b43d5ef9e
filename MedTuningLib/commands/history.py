"""``medtuning history --model M``: did re-tuning help? One row per round of the model's lineage.

Each round (0: the first training; each ``retune`` / ``train --init-from`` adds one) shows the
held-out Dice per region on the library's test cases (never trained on, never used to pick an
epoch), how many cases it trained on, the cases added since the round before, and the correction
effort of those cases (mean Dice between the model's result and the correction: near 1 means the
radiologist hardly had to change anything; mm³ added and removed). The rows are copied into every
model folder of the lineage, so an earlier folder that was moved or deleted does not break them.
"""

from __future__ import annotations

import json

from MedTuningLib.engine.modelfolder import read_model_manifest
from MedTuningLib.schema import history_rows


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def history_table(rows: list[dict]) -> str:
    """Markdown: round, cases, held-out Dice per region, correction effort per segment."""
    regions: list[str] = []
    segments: list[str] = []
    for row in rows:
        regions += [r for r in row["dice"] if r not in regions]
        segments += [s for s in row["effort"] if s not in segments]
    head = ["round", "train cases", "new cases", "test cases"] + [f"Dice {r}" for r in regions]
    head += [f"{s}: correction Dice / mm³ changed" for s in segments]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row["round"]), str(row["train_cases"]), str(len(row["new_cases"])), str(row["test_cases"])]
        cells += [_fmt(row["dice"].get(r)) for r in regions]
        for s in segments:
            e = row["effort"].get(s)
            cells.append("–" if not e else f"{_fmt(e.get('dice'))} / {e.get('mm3_added', 0) + e.get('mm3_removed', 0):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    ids = {tuple(r["test_case_ids"]) for r in rows if r["test_case_ids"]}
    if len(ids) > 1:
        lines.append("")
        lines.append("Note: the rounds were scored on different test cases; their Dice values are not comparable.")
    return "\n".join(lines) + "\n"


def run(args, ctx) -> dict:
    events = ctx.events
    events.start("history")
    record = read_model_manifest(args.model)
    rows = history_rows(record)
    if not events.jsonl:
        if args.json:
            events.out.write(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
        else:
            events.out.write(history_table(rows))
    same = len({tuple(r["test_case_ids"]) for r in rows if r["test_case_ids"]}) <= 1
    return {"model": str(args.model), "round": record.round, "rounds": rows, "same_test_cases": same}
