"""``medtuning train``: tune a model on a case library (see :mod:`MedTuningLib.engine.train`)."""

from __future__ import annotations

from MedTuningLib.engine.train import TrainingRun, TrainOptions


def run(args, ctx) -> dict:
    return TrainingRun(TrainOptions.from_args(args), ctx.events, ctx.cancel).run()
