"""``medtuning train``: tune a model on a case library (see :mod:`MedTuningLib.engine.train`)."""

from __future__ import annotations

from MedTuningLib.engine.train import TrainingRun, TrainOptions


def run(args, ctx) -> dict:
    from MedTuningLib.engine.recipe import apply_train_options

    recipe = None
    if getattr(args, "recipe", None) == "paper":
        from MedTuningLib.cli import build_parser
        from MedTuningLib.engine.recipe import apply_recipe, explicit_dests

        # The recipe fills every option the command line left unset (explicit ones override single points).
        recipe = apply_recipe(args, explicit_dests(build_parser(), ctx.argv) if ctx.argv else set())
    opts = TrainOptions.from_args(args)
    apply_train_options(opts, args, recipe)
    return TrainingRun(opts, ctx.events, ctx.cancel).run()
