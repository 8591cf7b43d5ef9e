"""The --minutes budget: planned from steady-state epochs, so a run trains until about its budget."""

from __future__ import annotations

import json

from MedTuningLib.engine.budget import EpochBudget, adopt_plan
from engine_helpers import TINY_TRAIN, make_blob_library


def test_a_slow_first_epoch_does_not_shrink_the_plan():
    # The demo's case: a 10 s warm-up epoch, then 3 s epochs, validation (2 s) every 5 epochs, 420 s budget.
    budget = EpochBudget(budget_s=420.0, ceiling=1000, val_every=5)
    budget.record(10.0, None)
    first = budget.plan(1, elapsed_s=20.0)  # 20 s = preparation + the first epoch
    assert first == 1 + int((420 - 20) // 10)  # one epoch seen: it is all there is to plan from
    for epoch in range(2, 6):
        budget.record(3.0, 2.0 if epoch == 5 else None)
    assert budget.epoch_estimate() == 3.0 + 2.0 / 5
    planned = budget.plan(5, elapsed_s=20.0 + 4 * 3.0 + 2.0)
    assert planned == 5 + int((420 - 34 - 2.0) // 3.4)  # one final validation kept in reserve
    assert planned > 2.5 * first


def test_the_plan_keeps_what_is_done_and_stays_under_the_ceiling():
    budget = EpochBudget(budget_s=60.0, ceiling=12, val_every=1)
    budget.record(5.0, 1.0)
    budget.record(1.0, 0.5)
    assert budget.plan(2, elapsed_s=10.0) == 12  # fast epochs: the user's --epochs is the ceiling
    assert budget.plan(2, elapsed_s=100.0) == 2  # over budget: stop after what is done, never fewer
    assert not adopt_plan(100, 103, done=10)  # a 3% wobble keeps the schedule
    assert adopt_plan(100, 130, done=10) and adopt_plan(100, 11, done=10) and not adopt_plan(7, 7, done=3)


def test_training_uses_its_time_budget(tmp_path, cli):
    """A real run with a 20 s budget and a far ceiling trains until about the budget, not a fraction of it."""
    library = make_blob_library(cli, tmp_path)
    model = tmp_path / "model"
    minutes = 1 / 3
    status, events = cli(["train", "--library", str(library), "--out", str(model), "--labels", "Blob=1", *TINY_TRAIN,
                          "--epochs", "5000", "--steps-per-epoch", "1", "--val-every", "50", "--minutes", str(minutes)])
    assert status == 0, events[-3:]
    training = json.loads((model / "medtuning.json").read_text(encoding="utf-8"))["training"]
    assert 1 < training["epochs"] < 5000
    # The budget covers preparation and training; finishing (test scoring, writing) comes after it.
    assert 0.7 * minutes * 60 <= training["seconds"] <= 1.3 * minutes * 60, training
    plans = [e["message"] for e in events if e["event"] == "log" and "planning" in e.get("message", "")]
    assert plans and "steady state" in plans[-1]
