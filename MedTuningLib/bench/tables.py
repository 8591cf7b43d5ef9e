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


def _spread(values) -> str:
    return "" if not values else f"{values[0]:.2f}–{values[1]:.2f}"


SPREAD_COLUMNS = [Column("time_spread", "time / full, spread", None, _spread),
                  Column("memory_spread", "memory / full, spread", None, _spread)]


def train_table(figures: dict[str, dict]) -> str:
    """One table (``same_settings`` or ``defaults``) as Markdown; with repeats, medians and the ratios' spread
    (min–max over the repeats)."""
    rows = []
    for method, f in figures.items():
        s = f.get("settings", {})
        rows.append({"method": method, "tuned_m": f["tuned"] / 1e6, "precision": s.get("precision"),
                     "checkpointing": "on" if s.get("checkpointing") else "off", "step_s": f["step_s"],
                     "time_ratio": f.get("time_ratio"), "peak_mb": f["peak_mb"],
                     "memory_ratio": f.get("memory_ratio"), "time_spread": f.get("time_ratio_spread"),
                     "memory_spread": f.get("memory_ratio_spread")})
    repeated = any(f.get("repeats", 1) > 1 for f in figures.values())
    return comparison_table(rows, TRAIN_COLUMNS + (SPREAD_COLUMNS if repeated else []))[0]


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


VARIANT_COLUMNS = [
    Column("variant", "variant", None, align="left"),
    Column("forward_calls", "forward calls", False, "d"),
    Column("seconds", "s / volume", False, ".1f"),
    Column("speedup", "speed-up", True, lambda v: f"{v:.2f}x"),
    Column("dice", "Dice (mean)", True, ".4f"),
    Column("difference", "Dice − first (points)", None, lambda v: f"{v:+.3f}"),
]


def variants_table(result: dict) -> str:
    """``bench infer --variant``: one row per variant, the first is the reference."""
    rows = [{"variant": r["variant"], "forward_calls": r["forward_calls"], "seconds": r["seconds"],
             "speedup": r["speedup"], "dice": r["dice_mean"], "difference": r["dice_difference_points"]}
            for r in result["variants"]]
    return comparison_table(rows, VARIANT_COLUMNS)[0]


PEER_COLUMNS = [
    Column("system", "system (its usual settings)", None, align="left"),
    Column("grid", "grid it works on", None, align="left"),
    Column("window", "window, overlap", None),
    Column("precision", "precision", None),
    Column("seconds", "s / volume", False, ".1f"),
    Column("voxels_per_s", "voxels / s", True, lambda v: f"{v / 1e3:,.0f} k"),
    Column("peak_mb", "peak memory (MB)", False, ".0f"),
    Column("train_step_s", "s / training step", False, lambda v: "" if v is None else f"{v:.2f}"),
]


def peers_table(result: dict) -> str:
    """``bench peers``: one row per system, in the order run."""
    rows = []
    for r in result["rows"]:
        grid = f"{r['grid']}, {r['grid_voxels'] / 1e6:.1f} M voxels"
        seconds = r["seconds"]
        rows.append({"system": r["what"] + (" (extrapolated from %d calls)" % r["timed_calls"]
                                            if r["extrapolated"] else ""),
                     "grid": grid, "window": f"{'x'.join(map(str, r['window']))}, {r['overlap']}",
                     "precision": r["precision"], "seconds": seconds, "voxels_per_s": r["voxels_per_s"],
                     "peak_mb": r["peak_mb"], "train_step_s": r.get("train_step_s")})
    return comparison_table(rows, PEER_COLUMNS)[0]
