"""``medtuning retune --model M --library LIB [--epochs N | --minutes M]``: the "Re-tune now" of the loop.

A warm start (``train --init-from M``) that needs nothing but the model, the library and a budget: the
label scheme (task, source convention, custom mapping, segment subset, names, colours, terminology),
modalities in channel order, preprocessing statistics (not refitted), architecture, backbone, method
and base weights (sha256 checked) come from the model folder; so do batch and learning rate unless
given. The new model is ``MODEL-roundN`` beside the old one (N = the old model's round + 1) unless
``--out`` says otherwise; its ``medtuning.json`` carries the lineage's history (see ``medtuning history``).
"""

from __future__ import annotations

import re
from pathlib import Path

from MedTuningLib.engine.modelfolder import read_model_manifest
from MedTuningLib.engine.train import TrainingRun, TrainOptions

DEFAULT_EPOCHS = 10  # a short re-tune: the model already knows the task


def default_out(model: Path, round_number: int) -> Path:
    """``<model>-round<N>`` beside the model (a trailing ``-round<k>`` of the model's name is replaced)."""
    model = Path(model).absolute()
    base = re.sub(r"-round\d+$", "", model.name) or model.name
    return model.with_name(f"{base}-round{round_number}")


def run(args, ctx) -> dict:
    parent = read_model_manifest(args.model)
    training = parent.training
    out = args.out if args.out is not None else default_out(args.model, parent.round + 1)
    opts = TrainOptions(
        library=args.library, out=out, init_from=args.model, weights=args.weights,
        # With --minutes the budget decides how many epochs run (planned after the first one).
        epochs=(args.epochs or DEFAULT_EPOCHS) if args.minutes is None else 1000, minutes=args.minutes,
        steps_per_epoch=args.steps_per_epoch,
        batch=args.batch or int(training.extra.get("batch") or 2),
        lr=args.lr or float(training.extra.get("lr") or 2e-3),
        loss=str(training.extra.get("loss") or "dice_ce"), device=args.device, seed=args.seed,
        resume=args.resume, force=args.force)
    return TrainingRun(opts, ctx.events, ctx.cancel, command="retune").run()
