"""``report.html``: the evaluation report a person opens in a browser.

It holds the per-region summary (Dice and HD95, mean ± sd over cases, n), the per-case figures and,
per case, the montage of each region (:func:`MedTuningLib.reports.montage.region_montage`). The
folder is self-contained: pictures are referenced by relative paths, and a picture given from
outside the folder is copied into ``montages/`` first. Every piece of text from the report (model
name, case ids, region names, protocol) is HTML-escaped.

The ``report`` dict is the one ``medtuning evaluate`` writes as ``report.json``::

    {"model": "...", "split": "test", "regions": ["kidney", "tumour", "composite"],
     "cases": [{"id": "case1", "metrics": {"dice/kidney": 0.9, "hd95/kidney": 3.2, ...}}, ...],
     "summary": {"dice/kidney": {"mean": ..., "std": ..., "n": ...}, ...},
     "protocol": "held out ..."}
"""

from __future__ import annotations

import html
import math
import os
import shutil
import urllib.parse
from pathlib import Path
from typing import Any, Mapping

from MedTuningLib.fileio import ensure_writable_dir, write_bytes_atomic
from MedTuningLib.reports.montage import safe_name

REPORT_NAME = "report.html"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em; color: #222; max-width: 1100px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.meta { color: #555; }
figure { margin: 0.5em 0 1.5em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border: 1px solid #888; vertical-align: middle; margin-right: 0.3em; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _fmt(value: Any, digits: int) -> str:
    number = _number(value)
    if number is None or math.isnan(number):
        return "–"
    if math.isinf(number):
        return "∞"
    return f"{number:.{digits}f}"


def _digits(metric: str) -> int:
    return 3 if metric.startswith("dice") else 2


def summarise(report: Mapping[str, Any], key: str) -> dict[str, float | int | None]:
    """``report["summary"][key]`` if present, else mean / sd (population) / n of the cases' finite values."""
    entry = (report.get("summary") or {}).get(key)
    if isinstance(entry, Mapping):
        return {"mean": entry.get("mean"), "std": entry.get("std"), "n": entry.get("n")}
    if _number(entry) is not None:
        return {"mean": _number(entry), "std": None, "n": None}
    values = [_number((c.get("metrics") or {}).get(key)) for c in report.get("cases") or []]
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {"mean": mean, "std": std, "n": len(values)}


def report_regions(report: Mapping[str, Any]) -> list[str]:
    """The report's regions in order: ``report["regions"]``, else those named in metric keys."""
    regions = list(report.get("regions") or [])
    keys = list((report.get("summary") or {}).keys())
    for case in report.get("cases") or []:
        keys.extend((case.get("metrics") or {}).keys())
    for key in keys:
        if "/" in key:
            region = key.split("/", 1)[1]
            if region not in regions:
                regions.append(region)
    return regions


def _mean_sd(stats: Mapping[str, Any], digits: int) -> str:
    text = _fmt(stats.get("mean"), digits)
    if _number(stats.get("std")) is not None and text != "–":
        text += f" ± {_fmt(stats.get('std'), digits)}"
    return text


def _picture_src(folder: Path, png: Path, case_id: str, region: str) -> str | None:
    """A relative, URL-quoted ``src`` for ``png`` (a path relative to ``folder``, or absolute);
    copies the picture into ``folder/montages`` if it lies outside the folder. None if it is missing."""
    png = Path(png)
    if not png.is_absolute():
        png = folder / png
    if not png.is_file():
        return None
    folder_abs, png_abs = folder.resolve(), png.resolve()
    if folder_abs not in png_abs.parents:
        target = folder / "montages" / f"{safe_name(case_id)}__{safe_name(region)}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png_abs, target)
        png_abs = target.resolve()
    rel = Path(os.path.relpath(png_abs, folder_abs)).as_posix()
    return urllib.parse.quote(rel)


def render_html(folder: Path, report: Mapping[str, Any],
                montages: Mapping[str, Mapping[str, Path]] | None = None,
                region_colors: Mapping[str, Any] | None = None) -> str:
    """The report page as a string (see :func:`write_html_report`)."""
    folder = Path(folder)
    montages = montages or {}
    region_colors = region_colors or {}
    regions = report_regions(report)
    model = report.get("model") or "model"
    out: list[str] = []
    w = out.append
    w("<!DOCTYPE html>")
    w('<html lang="en"><head><meta charset="utf-8">')
    w(f"<title>MedTuning evaluation — {_esc(model)}</title>")
    w(f"<style>{_CSS}</style></head><body>")
    w(f"<h1>Evaluation of {_esc(model)}</h1>")
    meta = []
    if report.get("split"):
        meta.append(f"split: <b>{_esc(report['split'])}</b>")
    meta.append(f"cases: {len(report.get('cases') or [])}")
    if report.get("protocol"):
        meta.append(f"protocol: {_esc(report['protocol'])}")
    w(f'<p class="meta">{" · ".join(meta)}</p>')

    # per-region summary
    w("<h2>Per region (mean ± sd over cases)</h2>")
    w("<table><thead><tr><th>region</th><th>Dice</th><th>HD95 (mm)</th><th>n</th></tr></thead><tbody>")
    for region in regions:
        dice, hd95 = summarise(report, f"dice/{region}"), summarise(report, f"hd95/{region}")
        n = dice.get("n") if dice.get("n") is not None else hd95.get("n")
        w(f"<tr><td>{_swatch(region_colors.get(region))}{_esc(region)}</td>"
          f'<td class="num">{_esc(_mean_sd(dice, 3))}</td><td class="num">{_esc(_mean_sd(hd95, 2))}</td>'
          f'<td class="num">{_esc(n if n is not None else "–")}</td></tr>')
    w("</tbody></table>")

    # per-case figures
    cases = list(report.get("cases") or [])
    if cases:
        keys = [f"{m}/{r}" for r in regions for m in ("dice", "hd95")]
        w("<h2>Per case</h2>")
        w("<table><thead><tr><th>case</th>"
          + "".join(f"<th>{_esc(k.split('/', 1)[0].replace('dice', 'Dice').replace('hd95', 'HD95'))} "
                    f"{_esc(k.split('/', 1)[1])}</th>" for k in keys) + "</tr></thead><tbody>")
        for case in cases:
            metrics = case.get("metrics") or {}
            w(f'<tr><td><a href="#case-{_esc(safe_name(case.get("id", "")))}">{_esc(case.get("id", ""))}</a></td>'
              + "".join(f'<td class="num">{_esc(_fmt(metrics.get(k), _digits(k)))}</td>' for k in keys)
              + "</tr>")
        w("</tbody></table>")

    # montages
    if montages:
        w("<h2>Pictures</h2>")
        w('<p class="meta">Axial, coronal and sagittal slices through each region\'s centre: the prediction '
          "is filled in the segment colour, the reference is the line.</p>")
        order = [str(c.get("id")) for c in cases if str(c.get("id")) in montages]
        order += [c for c in montages if c not in order]
        metrics_of = {str(c.get("id")): c.get("metrics") or {} for c in cases}
        for case_id in order:
            w(f'<h3 id="case-{_esc(safe_name(case_id))}">{_esc(case_id)}</h3>')
            for region, png in montages[case_id].items():
                metrics = metrics_of.get(case_id, {})
                caption = (f"{_esc(region)} — Dice {_esc(_fmt(metrics.get(f'dice/{region}'), 3))}, "
                           f"HD95 {_esc(_fmt(metrics.get(f'hd95/{region}'), 2))} mm")
                src = _picture_src(folder, Path(png), case_id, region)
                if src is None:
                    w(f"<p>{caption}: picture not available</p>")
                    continue
                w(f'<figure><img src="{_esc(src)}" alt="{_esc(case_id)} {_esc(region)}" loading="lazy">'
                  f"<figcaption>{caption}</figcaption></figure>")
    w("</body></html>")
    return "\n".join(out) + "\n"


def _swatch(color: Any) -> str:
    if color is None:
        return ""
    from MedTuningLib.reports.colors import unit_rgb

    r, g, b = (int(round(c * 255)) for c in unit_rgb(color))
    return f'<span class="swatch" style="background: rgb({r}, {g}, {b})"></span>'


def write_html_report(folder: Path, report: Mapping[str, Any],
                      montages: Mapping[str, Mapping[str, Path]] | None = None,
                      region_colors: Mapping[str, Any] | None = None) -> Path:
    """Write ``folder/report.html`` (atomically) and return its path.

    Args:
        folder: the report folder (created if needed); montages outside it are copied in.
        report: the evaluate report dict (model, split, regions, cases, summary, protocol).
        montages: ``{case_id: {region: png path}}``, paths absolute or relative to ``folder``.
        region_colors: optional ``{region: (r, g, b)}`` for colour swatches in the table.
    """
    folder = ensure_writable_dir(Path(folder), "report")
    page = render_html(folder, report, montages, region_colors)
    path = folder / REPORT_NAME
    write_bytes_atomic(path, page.encode("utf-8"), "evaluation report")
    return path
