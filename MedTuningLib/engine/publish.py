"""The end of a training run: the kept weights scored on the test cases, the model folder written in
``OUT.partial/`` and renamed to ``OUT`` (only then is the resume state removed), the lineage's history."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from MedTuningLib.engine.device import peak_memory_mb, precision_name
from MedTuningLib.engine.modelfolder import load_safetensors, now_iso, weights_to_store, write_model_folder
from MedTuningLib.engine.resume import BEST_WEIGHTS
from MedTuningLib.engine.scoring import score_test_cases
from MedTuningLib.engine.setup import ModelSetup
from MedTuningLib.engine.train_data import TrainingData
from MedTuningLib.fileio import check_output_folder, replace_dir
from MedTuningLib.schema import FORMAT_VERSION, ModelManifest, RoundRecord, correction_totals

if TYPE_CHECKING:
    from MedTuningLib.engine.train import TrainingRun


def publish_model(run: "TrainingRun", setup: ModelSetup, data: TrainingData, best: dict, epochs_done: int,
                  seconds: float) -> dict:
    """Write and publish the model folder; returns the outputs of the ``done`` event."""
    opts, events = run.opts, run.events
    model, device, dtype, crop, report = setup.model, setup.device, setup.dtype, setup.crop, setup.report
    events.progress("write", 0, 1)
    if opts.select == "best" and (run.work / BEST_WEIGHTS).exists():  # "last": the model as trained
        tensors = load_safetensors(run.work / BEST_WEIGHTS, "best weights")
        run._load_stored(model, {k: v.to(device) for k, v in tensors.items()})
    stored, tensors = weights_to_store(model, setup.base["pretrained"])
    test = score_test_cases(model, run.library, data.scheme, data.preprocessing, run.cache, run.spacing, crop, device,
                            dtype, run.cancel, events, run.out, opts.library, opts.init_from)
    cfg = model.config
    manifest = {
        "created": now_iso(),
        "architecture": cfg.to_dict(),
        "method": {"name": cfg.method, "adapter": cfg.to_dict().get("adapter")},
        "base_weights": setup.base,
        "pretrained": bool(setup.base["pretrained"]),
        "stored": stored,
        "modalities": data.modalities,
        "preprocessing": data.preprocessing.to_dict(),
        "label_scheme": data.scheme.to_dict(),
        "crop": list(crop),
        "flip_axes": list(data.flip_axes),
        "spacing": list(reversed(run.spacing)) if run.spacing is not None else None,
        "parameters": {k: report[k] for k in ("full", "tuned", "inserted", "head") if k in report},
        "recipe": (opts.recipe or {}).get("name", "none"),
        "training_choices": {"loss": opts.loss, "schedule": opts.schedule, "epoch_passes": opts.epoch_passes,
                             "case_order": opts.case_order,
                             "crop_sampling": opts.crop_sampling, "intensity_aug": opts.intensity_aug,
                             "base_init": opts.base_init, "selection": opts.select, "batchnorm": run.batchnorm,
                             "norm_eps": opts.norm_eps, "decoder_init": opts.decoder_init,
                             "recipe_overridden": (opts.recipe or {}).get("overridden", {})},
        "training": {
            "epochs": epochs_done, "seconds": round(seconds, 1), "peak_memory_mb": round(peak_memory_mb(device), 1),
            "best": best["metrics"], "best_epoch": best["epoch"], "batch": opts.batch,
            "accumulate": opts.accumulate, "world_size": run.dist.world, "lr": opts.lr, "loss": opts.loss,
            "precision": precision_name(dtype), "checkpointing": setup.checkpointing,
            "seed": opts.seed, "device": str(device), "library": str(Path(opts.library).absolute()),
            "train_cases": [c.id for c in data.train_cases], "val_cases": [c.id for c in data.val_cases],
            "validation": data.protocol,
            "init_from": str(Path(opts.init_from).absolute()) if opts.init_from else None,
            "test_cases": test.case_ids if test is not None else [],
        },
    }
    record = ModelManifest.from_dict({"format_version": FORMAT_VERSION, **manifest}, "the new model description")
    record.test = test
    record.history = round_history(run.parent, opts.init_from, run.out, record, data.train_cases, test, epochs_done,
                                   seconds)
    write_model_folder(run.work, model, record, tensors)
    run.curves.write()
    # Checked again right before replacing: the folder may have changed during the run.
    check_output_folder(run.out, "model", opts.force, inputs=run._inputs())
    (run.work / ".lock").unlink(missing_ok=True)
    replace_dir(run.work, run.out)
    # The resume state and cache are working files, not part of the model. They go only after
    # the model is published: a kill before this point leaves a resumable run, after it a model.
    for path in list(run.out.iterdir()):
        if path.name.startswith("state") or path.name in (BEST_WEIGHTS, "cache", "STOP"):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    events.checkpoint(str(run.out), epochs_done, best=True)
    events.progress("write", 1, 1)
    outputs = {"model": str(run.out), "best_epoch": best["epoch"], "best": best["metrics"], "round": record.round}
    if test is not None:
        outputs["test"] = {k: v.get("mean") for k, v in test.summary.items()}
    return outputs


def round_history(parent, init_from: Path | None, out: Path, record, train_cases: list, test, epochs_done: int,
                  seconds: float) -> list[RoundRecord]:
    """The lineage's rounds, this one last: the parent's history (or its round 0, for a model folder
    written before histories existed), then this round with its new cases and their correction effort."""
    history: list[RoundRecord] = []
    parent_train: list[str] = []
    if parent is not None:
        history = list(parent.history)
        if not history:
            history = [RoundRecord(round=0, model=str(Path(init_from).absolute()),
                                   created=parent.created, train_cases=list(parent.training.train_cases),
                                   epochs=parent.training.epochs, seconds=parent.training.seconds,
                                   test=parent.test)]
        parent_train = list(history[-1].train_cases)
    new = [c for c in train_cases if c.id not in parent_train] if parent is not None else []
    efforts = [c.provenance_record.effort for c in new if c.provenance_record.effort]
    history.append(RoundRecord(
        round=history[-1].round + 1 if history else 0, model=str(out), created=record.created,
        init_from=str(Path(init_from).absolute()) if init_from else None,
        train_cases=[c.id for c in train_cases], new_cases=[c.id for c in new], epochs=epochs_done,
        seconds=round(seconds, 1), test=test, effort=correction_totals(efforts)))
    return history
