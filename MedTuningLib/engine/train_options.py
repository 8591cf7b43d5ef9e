"""The options of a training run (``medtuning train``, ``retune``, ``demo``) and the resume fingerprint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from MedTuningLib.errors import MedTuningError

# Crop-preparing worker processes of --workers (engine/train_data.py). Two: on a 2-core CPU (README, --workers)
# steps were as fast or faster with the crops prepared beside them in three interleaved measurements.
DEFAULT_WORKERS = 2


@dataclass
class TrainOptions:
    """Everything that defines a training run (the parsed ``medtuning train`` options)."""

    library: Path
    out: Path
    task: str = "custom"
    labels: str | None = None
    source_labels: str = "brats2015"
    arch: str = "vit_upernet"
    backbone: str | None = None
    backbone_kwargs: dict = field(default_factory=dict)
    decoder_width: int | None = None
    method: str = "med_tuning"
    adapter: dict = field(default_factory=dict)
    weights: str | None = "hub"  # None: hub for a new model; a warm start's own base weights
    crop: tuple[int, int, int] = (16, 128, 128)
    batch: int = 2
    accumulate: int = 1
    epochs: int = 50
    steps_per_epoch: int | None = None
    minutes: float | None = None
    lr: float = 2e-3
    weight_decay: float = 1e-5
    warmup_epochs: int | None = None
    loss: str = "dice_ce"
    # The official Med-Tuning choices, one option each (``--recipe paper`` sets them all; engine/recipe.py,
    # docs/method.md): schedule, epoch size, crop sampling, intensity augmentation, base-weight loading,
    # model selection, SyncBatchNorm, ViT LayerNorm eps, decoder initialisation.
    schedule: str = "cosine"
    epoch_passes: int = 2
    case_order: str = "random"
    crop_sampling: str = "foreground"
    intensity_aug: str = "global"
    base_init: str = "project"
    select: str = "best"
    sync_batchnorm: bool = False
    norm_eps: float | None = None
    decoder_init: str = "default"
    recipe: dict | None = None  # {"name": "paper", "settings": ..., "overridden": ...} under --recipe
    precision: str = "auto"
    checkpointing: str = "auto"
    val_every: int = 1
    val_split: str = "val"
    spacing: str = "auto"  # working spacing: auto | native | X,Y,Z mm (MedTuningLib/data/spacing.py)
    device: str = "auto"
    seed: int = 0
    # Crop-preparing worker processes (engine/train_data.py): crops are seeded per crop, so the value changes
    # only the speed, never the result; hence not in the fingerprint (a run may resume with another value).
    workers: int = DEFAULT_WORKERS
    init_from: Path | None = None
    resume: bool = False
    force: bool = False
    # Cases to train on when not the whole split (the demo's held-out slab): ids in the library.
    train_case_ids: list[str] | None = None
    val_case_ids: list[str] | None = None
    # A subset of segment names to train (custom task from .seg.nrrd files), e.g. the two lungs.
    segments: list[str] | None = None
    # The setup options the user gave (task, labels, source_labels, arch, backbone, method, segments): a
    # warm start takes the rest from the model folder and refuses given ones that contradict it.
    explicit: dict = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: Any) -> "TrainOptions":
        adapter = {"alpha": args.alpha, "local_branch": args.local_branch, "global_branch": args.global_branch,
                   "mix": args.mix, "fusion": args.fusion}
        segments = [n.strip() for n in args.segments.split(",") if n.strip()] if args.segments else None
        from MedTuningLib.data.spacing import parse_spacing_option

        parse_spacing_option(getattr(args, "spacing", None))  # INVALID_OPTION before anything is read or written
        explicit = {k: v for k, v in {"task": args.task, "labels": args.labels, "source_labels": args.source_labels,
                                      "arch": args.arch, "backbone": args.backbone, "method": args.method,
                                      "segments": segments, "spacing": getattr(args, "spacing", None)}.items()
                    if v is not None}
        return cls(library=args.library, out=args.out, task=args.task or "custom", labels=args.labels,
                   source_labels=args.source_labels or "brats2015", arch=args.arch or "vit_upernet",
                   backbone=args.backbone,
                   backbone_kwargs=parse_backbone_args(getattr(args, "backbone_args", None)),
                   decoder_width=getattr(args, "decoder_width", None), method=args.method or "med_tuning",
                   adapter=adapter, weights=args.weights if args.weights is not None or args.init_from else "hub",
                   crop=tuple(args.crop), batch=args.batch, accumulate=args.accumulate,
                   epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, minutes=args.minutes, lr=args.lr,
                   weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, loss=args.loss,
                   precision=args.precision, checkpointing=args.checkpointing, val_every=args.val_every,
                   val_split=args.val_split, device=args.device, seed=args.seed,
                   workers=getattr(args, "workers", DEFAULT_WORKERS), init_from=args.init_from,
                   resume=args.resume, force=args.force, segments=segments, explicit=explicit,
                   spacing=getattr(args, "spacing", None) or "auto")

    def fingerprint(self) -> dict:
        """The settings a resumed run must share with the interrupted one."""
        keep = ("task", "labels", "source_labels", "arch", "backbone", "backbone_kwargs", "decoder_width", "method",
                "adapter", "weights", "crop", "batch", "accumulate", "epochs", "steps_per_epoch", "lr",
                "weight_decay", "warmup_epochs", "loss", "seed", "train_case_ids", "val_case_ids", "segments",
                "schedule", "epoch_passes", "case_order", "crop_sampling", "intensity_aug", "base_init", "select",
                "norm_eps", "decoder_init", "spacing")
        data = asdict(self)
        result = {k: data[k] for k in keep}
        result["crop"] = list(self.crop)
        result["init_from"] = str(self.init_from) if self.init_from else None
        return result


def parse_backbone_args(text: str | None) -> dict:
    """``"depth=4,embed_dim=96,num_heads=3,patch_size=8"`` -> kwargs for timm.create_model."""
    if not text:
        return {}
    result: dict = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MedTuningError("INVALID_OPTION", f"--backbone-args item {item!r} is not KEY=VALUE",
                                 'write e.g. --backbone-args "depth=4,embed_dim=192,num_heads=3"')
        value = value.strip()
        try:
            parsed: Any = int(value)
        except ValueError:
            try:
                parsed = float(value)
            except ValueError:
                parsed = {"true": True, "false": False}.get(value.lower(), value)
        result[key.strip()] = parsed
    return result
