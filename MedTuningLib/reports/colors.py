"""Colour helpers shared by the report pictures."""

from __future__ import annotations

from typing import Iterable

#: Colours for curves of regions that have no segment colour (matplotlib's tab palette).
DEFAULT_COLORS = ["tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan",
                  "tab:gray"]


def unit_rgb(color: Iterable[float]) -> tuple[float, float, float]:
    """``(r, g, b)`` in 0..1 (Slicer's segment colours); components above 1 are read as 0..255."""
    rgb = tuple(float(c) for c in color)[:3]
    if len(rgb) != 3:
        raise ValueError(f"a colour needs three components (r, g, b), not {rgb!r}")
    if max(rgb) > 1.0:
        rgb = tuple(c / 255.0 for c in rgb)
    return tuple(min(1.0, max(0.0, c)) for c in rgb)  # type: ignore[return-value]
