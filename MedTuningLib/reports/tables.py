"""Tables in Markdown and CSV, with the best value per column marked (paper style).

A :class:`Column` says which row key it shows, how to format it, and which direction is better
(higher for Dice, lower for HD95, parameters, time and memory; ``None`` for text columns). In
Markdown the best cell of each column is **bold** and headers are the column titles; in CSV the
headers are the column keys (stable names for scripts), the values are unformatted numbers, and a
last column ``best`` lists, per row, the keys of the columns where that row is best (``;``-separated).
Ties are all marked; a column is marked only when at least two rows have a value; missing values
(None, NaN) show as ``–`` and are never best.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

MISSING = "–"


@dataclass(frozen=True)
class Column:
    """One table column.

    Attributes:
        key: the row dict key.
        title: the header text.
        higher_is_better: True (Dice), False (HD95, parameters, time, memory), None (not ranked).
        fmt: a format spec (``".3f"``) or a callable turning the value into text.
        align: Markdown alignment, ``"left"`` or ``"right"`` (default: right for ranked columns).
    """

    key: str
    title: str
    higher_is_better: bool | None = None
    fmt: str | Callable[[Any], str] = ""
    align: str | None = None

    def text(self, value: Any) -> str:
        if _missing(value):
            return MISSING
        if callable(self.fmt):
            return self.fmt(value)
        try:
            return format(value, self.fmt)
        except (TypeError, ValueError):
            return str(value)

    @property
    def right_aligned(self) -> bool:
        return self.align == "right" if self.align else self.higher_is_better is not None


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value: Any) -> float | None:
    if _missing(value) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def best_rows(rows: Sequence[Mapping[str, Any]], column: Column) -> set[int]:
    """Indices of the rows holding the best value of ``column`` (empty if unranked or < 2 values)."""
    if column.higher_is_better is None:
        return set()
    values = {i: _number(row.get(column.key)) for i, row in enumerate(rows)}
    values = {i: v for i, v in values.items() if v is not None}
    if len(values) < 2:
        return set()
    best = max(values.values()) if column.higher_is_better else min(values.values())
    return {i for i, v in values.items() if v == best}


def _md_cell(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                   right_align: Sequence[bool] | None = None) -> str:
    """A GitHub-flavoured Markdown table; cells are escaped (``|``, newlines)."""
    right_align = list(right_align) if right_align is not None else [False] * len(headers)
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |",
             "|" + "|".join("---:" if r else "---" for r in right_align) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def _csv_value(value: Any) -> Any:
    if _missing(value):
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


def comparison_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> tuple[str, str]:
    """The table as ``(markdown, csv)`` with the best value of each ranked column marked.

    Markdown: the best cells are bold. CSV: header = column keys + ``best``; values unformatted
    (full precision, so the CSV can be analysed); ``best`` names the keys of the columns in which the
    row is best, e.g. ``dice/kidney;tuned_params``.
    """
    best = {c.key: best_rows(rows, c) for c in columns}
    md_rows = []
    for i, row in enumerate(rows):
        cells = []
        for c in columns:
            text = c.text(row.get(c.key))
            cells.append(f"**{text}**" if i in best[c.key] else text)
        md_rows.append(cells)
    markdown = markdown_table([c.title for c in columns], md_rows, [c.right_aligned for c in columns])

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([c.key for c in columns] + ["best"])
    for i, row in enumerate(rows):
        marks = ";".join(c.key for c in columns if i in best[c.key])
        writer.writerow([_csv_value(row.get(c.key)) for c in columns] + [marks])
    return markdown, buf.getvalue()
