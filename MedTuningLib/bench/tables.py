"""Markdown tables of the bench figures (paper style, through :mod:`MedTuningLib.reports.tables`)."""

from __future__ import annotations

from MedTuningLib.reports.tables import Column, comparison_table


def _ratio(value) -> str:
    return f"{value:.2f}"


TRAIN_COLUMNS = [
    Column("method", "method", None, align="left"),
    Column("tuned_m", "tuned params (M)", False, ".3f"),
    Column("precision", "precision", None),
    Column("checkpointing", "checkpointing", None),
    Column("step_s", "s / step", False, ".2f"),
    Column("time_ratio", "time / full", False, _ratio),
    Column("peak_mb", "peak memory (MB)", False, ".0f"),
    Column("memory_ratio", "memory / full", False, _ratio),
]


def train_table(figures: dict[str, dict]) -> str:
    """One table (``same_settings`` or ``defaults``) as Markdown."""
    rows = []
    for method, f in figures.items():
        s = f.get("settings", {})
        rows.append({"method": method, "tuned_m": f["tuned"] / 1e6, "precision": s.get("precision"),
                     "checkpointing": "on" if s.get("checkpointing") else "off", "step_s": f["step_s"],
                     "time_ratio": f.get("time_ratio"), "peak_mb": f["peak_mb"],
                     "memory_ratio": f.get("memory_ratio")})
    return comparison_table(rows, TRAIN_COLUMNS)[0]


INFER_COLUMNS = [
    Column("path", "inference path", None, align="left"),
    Column("settings", "settings", None, align="left"),
    Column("seconds", "s / volume", False, ".1f"),
    Column("speedup", "speed-up", True, lambda v: f"{v:.2f}x"),
    Column("dice", "Dice (mean)", True, ".4f"),
]


def infer_table(result: dict) -> str:
    rows = []
    for key in ("plain", "tuned"):
        r = result[key]
        rows.append({"path": key, "settings": r["settings_text"], "seconds": r["seconds"],
                     "speedup": result["plain"]["seconds"] / r["seconds"], "dice": r.get("dice_mean")})
    return comparison_table(rows, INFER_COLUMNS)[0]
