"""``medtuning demo``: tune, segment and evaluate on the chest CT shipped with slicerio."""

from __future__ import annotations


def run(args, ctx) -> dict:
    from MedTuningLib.engine.demo import run_demo

    return run_demo(args.out, ctx.events, ctx.cancel, weights=args.weights, device=args.device, minutes=args.minutes,
                    seed=args.seed, force=args.force)
