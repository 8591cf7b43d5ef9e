"""HTML report (existing pictures, escaped text) and comparison tables (best per direction)."""

from __future__ import annotations

import csv
import io
import re
from html.parser import HTMLParser
from urllib.parse import unquote

import numpy as np

from MedTuningLib.reports.html import write_html_report
from MedTuningLib.reports.montage import region_montage
from MedTuningLib.reports.tables import Column, comparison_table, markdown_table


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def _report(case_ids):
    cases = [{"id": cid, "metrics": {"dice/kidney": 0.9 - 0.1 * i, "hd95/kidney": 3.0 + i,
                                     "dice/<tumour>": 0.5 + 0.1 * i, "hd95/<tumour>": None}}
             for i, cid in enumerate(case_ids)]
    return {"model": "models/kidney <b>bold</b> & co", "split": "test", "regions": ["kidney", "<tumour>"],
            "cases": cases,
            "summary": {"dice/kidney": {"mean": 0.85, "std": 0.05, "n": 2},
                        "hd95/kidney": {"mean": 3.5, "std": 0.5, "n": 2},
                        "dice/<tumour>": {"mean": 0.55, "std": 0.05, "n": 2},
                        "hd95/<tumour>": {"mean": None, "std": None, "n": 0}},
            "protocol": "held out: trained on case <a>, tested on \"b\""}


def test_html_report_references_existing_pictures_and_escapes_text(tmp_path):
    report_dir = tmp_path / "report"
    outside = tmp_path / "elsewhere"
    image = np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[3:6, 5:10, 6:11] = True
    case_ids = ["case <script>alert(1)</script>", "case 2 & more"]
    montages = {}
    # one picture inside the report folder given relative (as evaluate does), one outside it (copied in)
    region_montage(image, mask, mask, (1, 0, 0), (2, 1, 1), report_dir / "images" / "c1 kidney.png")
    region_montage(image, mask, mask, (0, 1, 0), (2, 1, 1), outside / "c2.png")
    montages[case_ids[0]] = {"kidney": "images/c1 kidney.png"}
    montages[case_ids[1]] = {"<tumour>": outside / "c2.png", "kidney": tmp_path / "missing.png"}

    path = write_html_report(report_dir, _report(case_ids), montages, region_colors={"kidney": (185, 102, 83)})
    assert path == report_dir / "report.html"
    text = path.read_text(encoding="utf-8")

    parser = _Collect()
    parser.feed(text)
    assert "script" not in parser.tags and parser.tags.count("b") == 1  # only the split is bold
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "kidney &lt;b&gt;bold&lt;/b&gt; &amp; co" in text
    assert "&lt;tumour&gt;" in text and "&quot;b&quot;" in text
    assert "<tumour>" not in text

    assert len(parser.images) == 2
    for src in parser.images:
        assert not src.startswith(("/", "file:")) and ".." not in src
        assert (report_dir / unquote(src)).is_file(), src
    assert "picture not available" in text  # the missing one is said, not a broken <img>
    assert "0.850 ± 0.050" in text and "3.50 ± 0.50" in text
    assert re.search(r"rgb\(185, 102, 83\)", text)


def test_html_report_without_summary_or_montages(tmp_path):
    report = _report(["a", "b"])
    del report["summary"]
    text = write_html_report(tmp_path, report, {}).read_text(encoding="utf-8")
    assert "0.850 ± 0.050" in text  # mean ± sd computed from the cases
    assert "<img" not in text


ROWS = [
    {"method": "full", "tuned": 27_154_000, "dice": 0.81, "hd95": 6.0, "minutes": 30.0},
    {"method": "head", "tuned": 6_752_000, "dice": 0.78, "hd95": float("nan"), "minutes": 10.0},
    {"method": "med_tuning", "tuned": 7_489_000, "dice": 0.83, "hd95": 5.5, "minutes": 12.0},
    {"method": "a|b", "tuned": None, "dice": 0.83, "hd95": 7.25, "minutes": None},
]
COLUMNS = [Column("method", "method"), Column("tuned", "tuned (M)", False, lambda v: f"{v / 1e6:.3f}"),
           Column("dice", "Dice", True, ".3f"), Column("hd95", "HD95", False, ".2f"),
           Column("minutes", "min", False, ".1f")]


def test_comparison_table_marks_best_per_direction():
    markdown, csv_text = comparison_table(ROWS, COLUMNS)
    lines = markdown.strip().splitlines()
    assert lines[0] == "| method | tuned (M) | Dice | HD95 | min |"
    assert lines[1] == "|---|---:|---:|---:|---:|"
    full, head, med, other = lines[2:]
    assert "**6.752**" in head and "**10.0**" in head  # lower params and time are better
    assert "**0.830**" in med and "**5.50**" in med  # higher Dice, lower HD95
    assert "**0.830**" in other  # a tie: both marked
    assert "a\\|b" in other and "–" in other  # escaped pipe, missing values
    assert "**" not in full and "**" not in head.split("|")[3]

    rows = list(csv.reader(io.StringIO(csv_text)))
    assert rows[0] == ["method", "tuned", "dice", "hd95", "minutes", "best"]  # keys: stable for scripts
    best = {r[0]: set(filter(None, r[-1].split(";"))) for r in rows[1:]}
    assert best == {"full": set(), "head": {"tuned", "minutes"}, "med_tuning": {"dice", "hd95"}, "a|b": {"dice"}}
    assert rows[1][1] == "27154000" and rows[3][2] == "0.83" and rows[2][3] == ""  # plain numbers


def test_single_row_or_unranked_columns_are_not_marked():
    markdown, _ = comparison_table(ROWS[:1], COLUMNS)
    assert "**" not in markdown
    assert markdown_table(["a", "b"], [[1, "x|y"]], [True, False]).splitlines()[1] == "|---:|---|"
