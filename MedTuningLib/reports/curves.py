"""Training curves: ``curves.csv`` and ``curves.png`` beside a training run, updated every epoch.

The figures are the same as the ``metric`` events of the run (docs/method.md, event contract):
``phase`` is ``train`` or ``validate`` and ``name`` is ``loss``, ``lr``, ``dice/<region>`` or
``hd95/<region>``. The CSV holds one row per epoch and one column per ``<phase>/<name>``::

    epoch,train/loss,train/lr,validate/loss,validate/dice/kidney,validate/dice/tumour,validate/hd95/kidney
    1,0.91,0.0002,,0.41,0.05,
    2,0.74,0.0004,,0.58,0.12,

The PNG follows nnU-Net's ``progress.png``: stacked panels sharing the epoch axis — loss, Dice per
region (validation solid, training dashed if present), HD95 per region (only when reported), and the
learning rate. The best epoch by mean validation Dice is marked.

Typical use inside a training loop::

    curves = TrainingCurves.load(run_dir)            # empty if the run has no curves yet
    curves.truncate(resumed_epoch)                   # on resume: forget epochs after the checkpoint
    for epoch in ...:
        curves.add(epoch, "loss", loss, "train")
        curves.add_event(metric_event)               # or straight from an event dict
        curves.write()                               # atomic CSV + PNG, a fraction of a second
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from MedTuningLib.fileio import write_bytes_atomic
from MedTuningLib.reports.colors import DEFAULT_COLORS, unit_rgb

CSV_NAME = "curves.csv"
PNG_NAME = "curves.png"

_PHASE_ORDER = {"train": 0, "validate": 1}
_KIND_ORDER = {"loss": 0, "lr": 1, "dice": 2, "hd95": 3}

Color = Sequence[float]


def _kind(name: str) -> str:
    """``dice/kidney`` -> ``dice``; ``loss`` -> ``loss``."""
    return name.split("/", 1)[0]


def _region(name: str) -> str:
    return name.split("/", 1)[1] if "/" in name else name


def _format_value(value: float) -> str:
    # repr round-trips exactly, so the CSV's last values equal the events' values.
    return repr(float(value))


class TrainingCurves:
    """Per-epoch training figures, written as ``curves.csv`` and ``curves.png`` in ``folder``.

    Args:
        folder: where ``curves.csv`` and ``curves.png`` go (the run's working folder).
        title: heading of the picture (e.g. the model folder's name and method).
        region_colors: optional segment colours, ``{region: (r, g, b)}`` in 0..1 (or 0..255), so
            the Dice lines match the segments people see in Slicer.
    """

    def __init__(self, folder: Path, title: str | None = None,
                 region_colors: Mapping[str, Color] | None = None) -> None:
        self.folder = Path(folder)
        self.title = title
        self.region_colors = {k: unit_rgb(v) for k, v in (region_colors or {}).items()}
        self._rows: dict[int, dict[str, float]] = {}
        self._columns: list[str] = []  # first-appearance order; sorted for output

    # -- paths ----------------------------------------------------------------------------------
    @property
    def csv_path(self) -> Path:
        return self.folder / CSV_NAME

    @property
    def png_path(self) -> Path:
        return self.folder / PNG_NAME

    # -- data -----------------------------------------------------------------------------------
    def add(self, epoch: int, name: str, value: float, phase: str) -> None:
        """Record ``value`` of metric ``name`` (``loss``, ``lr``, ``dice/<region>``, ...) at ``epoch``.

        Adding the same (epoch, phase, name) again replaces the earlier value.
        """
        if not name or not phase:
            raise ValueError("a curve value needs a metric name and a phase")
        column = f"{phase}/{name}"
        if column not in self._columns:
            self._columns.append(column)
        self._rows.setdefault(int(epoch), {})[column] = float(value) if value is not None else math.nan

    def add_event(self, event: Mapping[str, Any]) -> bool:
        """Record a ``metric`` event (``{"event": "metric", "phase", "epoch", "name", "value"}``).

        Returns False (and records nothing) for other events or metrics without an epoch.
        """
        if event.get("event", "metric") != "metric" or event.get("epoch") is None or event.get("name") is None:
            return False
        self.add(int(event["epoch"]), str(event["name"]), event.get("value"), str(event.get("phase", "train")))
        return True

    def truncate(self, last_epoch: int) -> None:
        """Forget every epoch after ``last_epoch`` (resume from a checkpoint older than the curves)."""
        for epoch in [e for e in self._rows if e > last_epoch]:
            del self._rows[epoch]

    @property
    def epochs(self) -> list[int]:
        return sorted(self._rows)

    @property
    def columns(self) -> list[str]:
        """``<phase>/<name>`` columns in CSV order: train before validate; loss, lr, dice, hd95, others."""
        index = {c: i for i, c in enumerate(self._columns)}

        def key(column: str) -> tuple[int, int, int]:
            phase, _, name = column.partition("/")
            return (_PHASE_ORDER.get(phase, 2), _KIND_ORDER.get(_kind(name), 4), index[column])

        return sorted(self._columns, key=key)

    def series(self, name: str, phase: str) -> tuple[list[int], list[float]]:
        """The (epochs, values) of one metric, skipping epochs where it was not reported."""
        column = f"{phase}/{name}"
        points = [(e, row[column]) for e, row in sorted(self._rows.items()) if column in row]
        return [p[0] for p in points], [p[1] for p in points]

    def last(self, name: str, phase: str) -> float | None:
        """The latest value of a metric, or None if it was never reported."""
        _, values = self.series(name, phase)
        return values[-1] if values else None

    def rows(self) -> list[dict[str, float | int | None]]:
        """One dict per epoch: ``{"epoch": e, "<phase>/<name>": value or None, ...}``."""
        columns = self.columns
        return [{"epoch": e, **{c: self._rows[e].get(c) for c in columns}} for e in self.epochs]

    def __len__(self) -> int:
        return len(self._rows)

    # -- files ----------------------------------------------------------------------------------
    def to_csv(self) -> str:
        columns = self.columns
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["epoch", *columns])
        for epoch in self.epochs:
            row = self._rows[epoch]
            writer.writerow([epoch, *(_format_value(row[c]) if c in row else "" for c in columns)])
        return buf.getvalue()

    def write(self, png: bool = True) -> tuple[Path, Path | None]:
        """Write ``curves.csv`` (and ``curves.png`` unless ``png=False``) atomically; return the paths."""
        write_bytes_atomic(self.csv_path, self.to_csv().encode("utf-8"), "training curves")
        if not png:
            return self.csv_path, None
        write_bytes_atomic(self.png_path, self.render_png(), "training curves")
        return self.csv_path, self.png_path

    @classmethod
    def load(cls, folder: Path, title: str | None = None, region_colors: Mapping[str, Color] | None = None,
             last_epoch: int | None = None) -> "TrainingCurves":
        """Curves from ``folder/curves.csv``; empty curves if there is no CSV yet.

        ``last_epoch``: drop epochs after it (the epoch of the resume state: the curves are written
        before the state, so a run killed in between has one epoch more in its curves).

        Raises ValueError if the CSV is not one this class wrote (no ``epoch`` column, bad numbers).
        """
        curves = cls(folder, title=title, region_colors=region_colors)
        path = curves.csv_path
        if not path.is_file():
            return curves
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or reader.fieldnames[0] != "epoch":
                raise ValueError(f"{path} is not a MedTuning curves file (first column must be 'epoch')")
            for line_no, record in enumerate(reader, start=2):
                try:
                    epoch = int(record["epoch"])
                    for column in reader.fieldnames[1:]:
                        text = record.get(column)
                        if text is None or text == "":
                            continue
                        phase, _, name = column.partition("/")
                        curves.add(epoch, name, float(text), phase)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"{path} line {line_no} cannot be read: {exc}") from exc
        if last_epoch is not None:
            curves.truncate(last_epoch)
        return curves

    # -- picture --------------------------------------------------------------------------------
    def render_png(self, dpi: int = 100) -> bytes:
        """The curves picture as PNG bytes (matplotlib, Agg; no pyplot state)."""
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        columns = self.columns
        groups: dict[str, list[str]] = {"loss": [], "dice": [], "hd95": [], "lr": []}
        for column in columns:
            kind = _kind(column.partition("/")[2])
            if kind in groups:
                groups[kind].append(column)
        panels = ["loss", "dice"] + (["hd95"] if groups["hd95"] else []) + ["lr"]
        heights = {"loss": 3.0, "dice": 3.0, "hd95": 2.4, "lr": 1.8}

        fig = Figure(figsize=(9, sum(heights[p] for p in panels) + 0.6), dpi=dpi, layout="constrained")
        axes = fig.subplots(len(panels), 1, sharex=True,
                            gridspec_kw={"height_ratios": [heights[p] for p in panels]})
        best_epoch = self._best_dice_epoch()
        cycle = iter(DEFAULT_COLORS * 4)
        region_color: dict[str, Any] = {}

        def color_of(name: str) -> Any:
            region = _region(name)
            if region == "mean":
                return "black"
            if region in self.region_colors:
                return self.region_colors[region]
            if region not in region_color:
                region_color[region] = next(cycle)
            return region_color[region]

        titles = {"loss": "loss", "dice": "Dice", "hd95": "HD95 (mm)", "lr": "learning rate"}
        for ax, panel in zip(axes, panels):
            ax.set_ylabel(titles[panel])
            ax.grid(True, alpha=0.3)
            drawn = False
            for column in groups[panel]:
                phase, _, name = column.partition("/")
                xs, ys = self.series(name, phase)
                if not xs:
                    continue
                if panel in ("loss", "lr"):
                    color = {"train": "tab:blue", "validate": "tab:red"}.get(phase, "tab:gray")
                    label = f"{phase} {name}"
                else:
                    color = color_of(name)
                    label = f"{_region(name)} ({phase})" if phase != "validate" else _region(name)
                style = "-" if phase == ("train" if panel in ("loss", "lr") else "validate") else "--"
                ax.plot(xs, ys, style, color=color, label=label, linewidth=1.6,
                        marker="o" if len(xs) < 30 else None, markersize=3)
                drawn = True
            if panel == "dice":
                ax.set_ylim(-0.02, 1.02)
            if panel == "lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            if best_epoch is not None and panel in ("dice", "hd95"):
                ax.axvline(best_epoch, color="0.4", linestyle=":", linewidth=1)
            if drawn:
                ax.legend(loc="best", fontsize="small", frameon=False,
                          ncol=2 if len(groups[panel]) > 4 else 1)
            else:
                ax.text(0.5, 0.5, "not reported yet", transform=ax.transAxes, ha="center", va="center",
                        color="0.5")
        axes[-1].set_xlabel("epoch")
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
        heading = self.title or "training curves"
        if self.epochs:
            heading += f" — epoch {self.epochs[-1]}"
            if best_epoch is not None:
                heading += f", best mean validation Dice at epoch {best_epoch}"
        fig.suptitle(heading, fontsize="medium")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()

    def _best_dice_epoch(self) -> int | None:
        """Epoch of the highest ``validate/dice/mean`` if reported, else of the mean over regions."""
        dice_columns = [c for c in self._columns if c.startswith("validate/dice/")]
        if "validate/dice/mean" in dice_columns:
            dice_columns = ["validate/dice/mean"]
        best: tuple[float, int] | None = None
        for epoch, row in sorted(self._rows.items()):
            values = [row[c] for c in dice_columns if c in row and math.isfinite(row[c])]
            if values:
                mean = sum(values) / len(values)
                if best is None or mean > best[0]:
                    best = (mean, epoch)
        return best[1] if best else None

