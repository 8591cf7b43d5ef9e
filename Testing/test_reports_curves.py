"""Training curves: CSV values equal what was added, a valid PNG, load / resume continues."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from MedTuningLib.reports.curves import TrainingCurves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fill(curves: TrainingCurves, epochs: range) -> dict[str, float]:
    rng = np.random.default_rng(epochs.start)
    last: dict[str, float] = {}
    for epoch in epochs:
        values = {("train", "loss"): 1.0 / epoch + rng.random() * 1e-3, ("train", "lr"): 2e-3 * math.cos(epoch / 20),
                  ("validate", "dice/kidney"): 1 - 1 / (epoch + 1) + rng.random() * 1e-9,
                  ("validate", "dice/tumour"): 0.5 - 0.5 / (epoch + 1), ("validate", "hd95/kidney"): 30.0 / epoch}
        for (phase, name), value in values.items():
            curves.add(epoch, name, value, phase)
            last[f"{phase}/{name}"] = value
    return last


def test_csv_last_values_equal_what_was_added_and_png_is_valid(tmp_path):
    curves = TrainingCurves(tmp_path, title="kidney — med_tuning")
    last = _fill(curves, range(1, 8))
    csv_path, png_path = curves.write()

    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:3] == ["epoch", "train/loss", "train/lr"]
    assert [int(r["epoch"]) for r in rows] == list(range(1, 8))
    for column, value in last.items():
        assert float(rows[-1][column]) == value  # exact: repr round-trips

    data = png_path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    import matplotlib.image as mpimg

    pixels = mpimg.imread(png_path)
    height, width = pixels.shape[:2]
    assert 400 <= width <= 3000 and 400 <= height <= 3000
    assert pixels[..., :3].std() > 0.05  # something is drawn
    assert not list(tmp_path.glob(".*.tmp*"))  # atomic writes leave no temporaries


def test_load_resume_continues_the_same_curves(tmp_path):
    first = TrainingCurves(tmp_path)
    _fill(first, range(1, 5))
    first.write()

    resumed = TrainingCurves.load(tmp_path)
    assert resumed.epochs == [1, 2, 3, 4]
    assert resumed.columns == first.columns
    assert resumed.rows() == first.rows()
    last = _fill(resumed, range(5, 9))
    resumed.write()

    again = TrainingCurves.load(tmp_path)
    assert again.epochs == list(range(1, 9))
    for column, value in last.items():
        phase, _, name = column.partition("/")
        assert again.last(name, phase) == value
    xs, ys = again.series("loss", "train")
    assert xs == list(range(1, 9)) and ys[:4] == first.series("loss", "train")[1]


def test_resume_from_an_older_checkpoint_drops_later_epochs(tmp_path):
    curves = TrainingCurves(tmp_path)
    _fill(curves, range(1, 6))
    curves.write(png=False)
    resumed = TrainingCurves.load(tmp_path, last_epoch=3)
    assert resumed.epochs == [1, 2, 3]


def test_sparse_validation_events_and_missing_csv(tmp_path):
    assert len(TrainingCurves.load(tmp_path / "nothing-yet")) == 0
    curves = TrainingCurves(tmp_path)
    for epoch in range(1, 5):
        curves.add_event({"event": "metric", "phase": "train", "epoch": epoch, "name": "loss", "value": 1 / epoch})
        if epoch % 2 == 0:  # --val-every 2
            curves.add_event({"event": "metric", "phase": "validate", "epoch": epoch, "name": "dice/spleen",
                              "value": epoch / 10})
    assert not curves.add_event({"event": "progress", "step": 1})
    assert not curves.add_event({"event": "metric", "phase": "evaluate", "name": "dice/spleen", "value": 1.0})
    curves.write()
    loaded = TrainingCurves.load(tmp_path)
    assert loaded.series("dice/spleen", "validate") == ([2, 4], [0.2, 0.4])
    assert loaded.rows()[0]["validate/dice/spleen"] is None


def test_first_epoch_picture_without_validation(tmp_path):
    curves = TrainingCurves(tmp_path)
    curves.add(1, "loss", float("nan"), "train")  # a diverging first step still draws
    curves.add(1, "lr", 1e-4, "train")
    _, png = curves.write()
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert math.isnan(TrainingCurves.load(tmp_path).last("loss", "train"))


def test_foreign_csv_is_refused(tmp_path):
    (tmp_path / "curves.csv").write_text("step,loss\n1,0.5\n", encoding="utf-8")
    with pytest.raises(ValueError, match="epoch"):
        TrainingCurves.load(tmp_path)
