"""The model of a training run: built (or warm-started), its base weights loaded, placed on the device with
its precision and checkpointing, and checked against the memory it will need."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from MedTuningLib.engine.device import resolve_checkpointing, resolve_precision
from MedTuningLib.engine.distributed import seed_everything
from MedTuningLib.engine.modelfolder import load_model_folder
from MedTuningLib.engine.train_options import TrainOptions
from MedTuningLib.engine.warm_start import warm_start_weights
from MedTuningLib.errors import MedTuningError
from MedTuningLib.events import EventStream
from MedTuningLib.models.base import compact_frozen_weights


@dataclass
class ModelSetup:
    """The model as it trains, and the settings it trains under."""

    model: torch.nn.Module
    base: dict  # the base weights' record (source, id, sha256, pretrained)
    crop: tuple[int, int, int]
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None: fp32
    checkpointing: bool
    report: dict  # parameter counts (model.param_report())


def build_model(opts: TrainOptions, parent, in_channels: int, num_classes: int, events: EventStream):
    """A new model with its base weights, or the ``--init-from`` model; returns it and its base-weights record."""
    from MedTuningLib.models import AdapterConfig, ModelConfig, build_model as build, load_base_weights

    if opts.init_from is not None:
        loaded = load_model_folder(opts.init_from, "cpu", weights=warm_start_weights(opts, parent))
        cfg = loaded.model.config
        if cfg.num_classes != num_classes or cfg.in_channels != in_channels:
            raise MedTuningError("INVALID_OPTION",
                                 f"--init-from {opts.init_from} has {cfg.in_channels} channel(s) and "
                                 f"{cfg.num_classes} classes; these cases need {in_channels} and {num_classes}",
                                 "warm-start only from a model trained on the same modalities and labels")
        events.log(f"warm start from {opts.init_from} (round {parent.round}): {cfg.arch} "
                   f"{cfg.backbone or ''} {cfg.method}, crop {cfg.depth}x{cfg.img_size}x{cfg.img_size}, "
                   "the model's preprocessing and base weights (sha256 checked)")
        return loaded.model, dict(loaded.manifest["base_weights"])
    d, h, w = opts.crop
    if h != w:
        raise MedTuningError("INVALID_OPTION", f"--crop {d}x{h}x{w}: slices must be square (H = W)",
                             "use e.g. --crop 16x128x128")
    cfg = ModelConfig(arch=opts.arch, backbone=opts.backbone, in_channels=in_channels, num_classes=num_classes,
                      img_size=h, depth=d, method=opts.method, adapter=AdapterConfig(**opts.adapter),
                      backbone_kwargs=dict(opts.backbone_kwargs), decoder_width=opts.decoder_width,
                      norm_eps=opts.norm_eps)
    model = build(cfg)
    if opts.decoder_init == "trunc_normal":
        from MedTuningLib.engine.recipe import init_decoder_trunc_normal

        init_decoder_trunc_normal(model)  # before the base weights: official init, then load_from
    base = load_base_weights(model, opts.weights, progress=events.log, init=opts.base_init)
    if not base.pretrained:
        events.log("base weights: none (random initialisation, not pretrained)", level="warning")
    else:
        events.log(f"base weights: {base.id} ({base.source}, sha256 {str(base.sha256)[:12]}…)")
    return model, base.to_dict()


def prepare_model(opts: TrainOptions, parent, in_channels: int, num_classes: int, device: torch.device,
                  events: EventStream) -> ModelSetup:
    """The model on ``device``, ready to train (MEMORY_ESTIMATE_TOO_LARGE before any step)."""
    from MedTuningLib.engine.resources import check_memory

    seed_everything(opts.seed, 0, 0)  # identical initial weights on every rank
    model, base = build_model(opts, parent, in_channels, num_classes, events)
    if opts.init_from is not None:
        # The warm-started model keeps its own architecture, hence its crop.
        cfg = model.config
        crop = (cfg.depth, cfg.img_size, cfg.img_size)
    else:
        crop = tuple(opts.crop)
    dtype = resolve_precision(opts.precision, device)
    checkpointing = resolve_checkpointing(opts.checkpointing, device, model)
    model.set_activation_checkpointing(checkpointing)
    model.to(device)
    compact_frozen_weights(model, dtype)  # frozen matmul weights in the autocast dtype (same results, less memory)
    check_memory(model, crop, opts.batch, device, checkpointing, dtype)
    report = model.param_report()
    events.log(f"{opts.method}: {report['tuned']:,} tuned of {report['full']:,} parameters "
               f"({report['inserted']:,} inserted); precision {dtype or 'fp32'}, "
               f"checkpointing {'on' if checkpointing else 'off'}")
    return ModelSetup(model=model, base=base, crop=crop, device=device, dtype=dtype, checkpointing=checkpointing,
                      report=report)
