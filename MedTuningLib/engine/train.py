"""The training run behind ``medtuning train``.

A run works in ``OUT.partial/`` (resume state, curves, the ``STOP`` file) and renames it to ``OUT``
only when complete, so a folder named ``OUT`` is always a finished model. The resume state is
written at the end of every epoch (safetensors + JSON, never pickle). Every epoch reseeds all
random generators from ``(seed, epoch, rank)``, so a run resumed after a kill continues exactly as
the uninterrupted run would have.

Under ``torchrun`` the run is data-parallel (gloo on CPU, NCCL on GPU): every rank draws its own
crops, gradients are averaged by DistributedDataParallel, and rank 0 validates and writes files.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from MedTuningLib.cancel import CancelToken
from MedTuningLib.engine.device import (autocast, peak_memory_mb, resolve_checkpointing, resolve_device,
                                        resolve_precision)
from MedTuningLib.engine.modelfolder import (load_model_folder, load_safetensors, now_iso, read_model_manifest,
                                             save_safetensors, weights_to_store, write_model_folder)
from MedTuningLib.errors import Cancelled, MedTuningError
from MedTuningLib.events import EventStream
from MedTuningLib.fileio import (FileLock, check_output_folder, ensure_writable_dir, read_json, replace_dir,
                                 write_json_atomic)
from MedTuningLib.data.spacing import to_working_grid
from MedTuningLib.engine.budget import EpochBudget, adopt_plan
from MedTuningLib.engine.objectives import learning_rate
from MedTuningLib.engine.recipe import steps_per_epoch as recipe_steps_per_epoch
from MedTuningLib.engine.recipe import use_sync_batchnorm
from MedTuningLib.models.base import compact_frozen_weights
from MedTuningLib.schema import (FORMAT_VERSION, CaseScores, EvaluationReport, ModelManifest, RoundRecord,
                                 correction_totals, summarise_scores)

STATE_JSON = "state.json"
BEST_WEIGHTS = "best.safetensors"


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
                                      "segments": segments}.items() if v is not None}
        return cls(library=args.library, out=args.out, task=args.task or "custom", labels=args.labels,
                   source_labels=args.source_labels or "brats2015", arch=args.arch or "vit_upernet",
                   backbone=args.backbone,
                   backbone_kwargs=parse_backbone_args(getattr(args, "backbone_args", None)),
                   decoder_width=getattr(args, "decoder_width", None), method=args.method or "med_tuning",
                   adapter=adapter, weights=args.weights if args.weights is not None or args.init_from else "hub", crop=tuple(args.crop), batch=args.batch, accumulate=args.accumulate,
                   epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, minutes=args.minutes, lr=args.lr,
                   weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, loss=args.loss,
                   precision=args.precision, checkpointing=args.checkpointing, val_every=args.val_every,
                   val_split=args.val_split, device=args.device, seed=args.seed, init_from=args.init_from,
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


# ------------------------------------------------------------------------------------------------
# distributed helpers
# ------------------------------------------------------------------------------------------------

@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Distributed":
        return cls(rank=int(os.environ.get("RANK", 0)), world=int(os.environ.get("WORLD_SIZE", 1)),
                   local_rank=int(os.environ.get("LOCAL_RANK", 0)))

    def setup(self, device: torch.device) -> None:
        if not self.enabled:
            return
        import torch.distributed as dist

        try:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        except Exception as exc:  # noqa: BLE001 - any rendezvous failure is reported the same way
            raise MedTuningError("DISTRIBUTED_ERROR", f"could not join the torchrun group: {exc}",
                                 "start with 'torchrun --nproc_per_node N -m MedTuningLib train ...' "
                                 "and check MASTER_ADDR / MASTER_PORT") from exc

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (stop decisions must agree)."""
        if not self.enabled:
            return flag
        import torch.distributed as dist

        value = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def smallest(self, value: int) -> int:
        """The smallest ``value`` of all ranks, on every rank (the epoch plan must agree)."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        tensor = torch.tensor([float(value)])
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def teardown(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def seed_everything(seed: int, epoch: int, rank: int) -> int:
    """Reseed Python, NumPy and torch from (seed, epoch, rank); returns the derived seed."""
    derived = (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % (2**31 - 1)
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)
    return derived


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------

def make_scheme(opts: TrainOptions, label_paths: list[Path]):
    from MedTuningLib.data.labels import scheme_from_segmentations, scheme_for_task

    if opts.task == "custom" and not opts.labels:
        segs = [p for p in label_paths if p.name.lower().endswith(".seg.nrrd")]
        if len(segs) != len(label_paths):
            raise MedTuningError("LABEL_SPEC_INVALID",
                                 "a custom task needs segment names: some labels are plain labelmaps",
                                 'name the labels with --labels "Name=1;Other=2,3", or add the cases as .seg.nrrd')
        return scheme_from_segmentations(segs, names=opts.segments)
    return scheme_for_task(opts.task, labels=opts.labels, source=opts.source_labels)


def is_lateral(scheme) -> bool:
    """True when classes differ only by side (right / left lung, kidney): then no left-right flips."""
    for segment in scheme.segments:
        words = segment.name.lower().replace("_", " ").split()
        modifier = (segment.terminology or {}).get("typeModifier") or []
        if "right" in words or "left" in words or any(str(m).lower() in ("right", "left") for m in modifier):
            return True
    return False


def read_raw_case(case, scheme, cache=None, allow_empty: bool = False,
                  log: Callable[[str], None] | None = None) -> dict:
    """A library case as arrays: image ``[C, D, H, W]`` (not yet normalised), label ``[D, H, W]`` class indices.

    Decoding (gzip NIfTI, .seg.nrrd layers) is what costs; the cache keeps the decoded arrays between
    runs (re-tuning on the same library, resume, evaluation).
    """
    from MedTuningLib.data.io import read_case_images, read_label

    def build():
        image, reference = read_case_images(case.image_paths, log=log)
        label = read_label(case.label_path, reference, scheme, allow_empty=allow_empty, log=log)
        spacing = [float(s) for s in reversed(reference.GetSpacing())]  # (z, y, x)
        return image.astype(np.float32), label.astype(np.uint8), {"spacing": spacing}

    if cache is None:
        image, label, meta = build()
    else:
        image, label, meta = cache.get_or_compute(case.image_paths, case.label_path, None, scheme, build)
    return {"id": case.id, "image": image, "label": label, "spacing": tuple(meta["spacing"])}


# Codes of a label that the scheme cannot map: re-raised naming the case (and the model, for a warm start).
_LABEL_CODES = ("UNKNOWN_LABEL_VALUES", "SEGMENT_NAMES_MISMATCH", "LABEL_SPEC_INVALID", "EMPTY_LABEL")


def read_case_for(case, scheme, cache=None, allow_empty: bool = False, log: Callable[[str], None] | None = None,
                  model: Path | None = None) -> dict:
    """:func:`read_raw_case`, with a label the scheme cannot map refused by a message that names the case."""
    try:
        return read_raw_case(case, scheme, cache, allow_empty=allow_empty, log=log)
    except MedTuningError as exc:
        if exc.code not in _LABEL_CODES or "case" in exc.details:
            raise
        whose = f"the label scheme of model {model}" if model is not None else f"the '{scheme.task}' label scheme"
        hint = exc.hint
        if model is not None:
            hint = (f"{hint}; a re-tune keeps {whose} (classes {', '.join(scheme.class_names)}): fix or remove case "
                    f"{case.id!r} ('medtuning cases remove --id {case.id}'), or train a new model")
        raise MedTuningError(exc.code, f"case {case.id!r}: {exc.message} ({whose})", hint,
                             **{**exc.details, "case": case.id}) from exc


def warm_start_scheme(opts: TrainOptions, parent):
    """The label scheme of the model a run warm-starts from; given options that contradict it are refused."""
    from MedTuningLib.data.labels import LabelScheme, normalize_name, scheme_from_spec

    scheme = LabelScheme.from_dict(parent.label_scheme)
    given = opts.explicit
    model = opts.init_from

    def refuse(what: str, theirs: object, ours: object) -> MedTuningError:
        return MedTuningError("INVALID_OPTION", f"--{what} {ours} contradicts the model {model}, trained with "
                              f"{what} {theirs}: a warm start keeps the model's setup",
                              f"drop --{what} (the model's is used), or train a new model without --init-from")

    if "task" in given and given["task"] != scheme.task:
        raise refuse("task", scheme.task, given["task"])
    if "source_labels" in given and scheme.source and given["source_labels"] != scheme.source:
        raise refuse("source-labels", scheme.source, given["source_labels"])
    if "labels" in given:
        wanted = scheme_from_spec(given["labels"], task=scheme.task)
        if [(normalize_name(c.name), sorted(c.source_values)) for c in wanted.classes] != [
                (normalize_name(c.name), sorted(c.source_values)) for c in scheme.classes]:
            spec = ";".join(f"{c.name}={','.join(map(str, c.source_values))}" for c in scheme.classes)
            raise refuse("labels", repr(spec), repr(given["labels"]))
    if "segments" in given and [normalize_name(n) for n in given["segments"]] != [
            normalize_name(n) for n in scheme.class_names]:
        raise refuse("segments", repr(",".join(scheme.class_names)), repr(",".join(given["segments"])))
    for key, theirs in (("arch", parent.arch), ("backbone", parent.backbone), ("method", parent.method_name)):
        if key in given and theirs and given[key] != theirs:
            raise refuse(key, theirs, given[key])
    return scheme


def warm_start_modalities(opts: TrainOptions, parent, library_modalities: list[str],
                          log: Callable[[str], None]) -> list[str]:
    """The model's modalities (channel order); the library's cases must have as many."""
    theirs = list(parent.modalities)
    if len(library_modalities) != len(theirs):
        raise MedTuningError("MODALITY_COUNT_MISMATCH", f"the model {opts.init_from} reads {len(theirs)} modalities "
                             f"({', '.join(theirs)}); the library's cases have {len(library_modalities)} "
                             f"({', '.join(library_modalities)})",
                             "re-tune on a library whose cases have the model's modalities, in its channel order")
    if [m.casefold() for m in library_modalities] != [m.casefold() for m in theirs]:
        log(f"the library names its modalities {library_modalities}, the model {theirs}: they are used in the "
            "model's channel order")
    return theirs


def warm_start_weights(opts: TrainOptions, parent) -> str | None:
    """``--weights`` for a warm start: only where the model's own base-weights file now lies (sha256 checked)."""
    if opts.weights is None:
        return None
    source = str(parent.base_weights.get("source") or "")
    if opts.weights in ("hub", "none"):
        if opts.weights == source:  # the same as recorded: nothing to override
            return None
        raise MedTuningError("INVALID_OPTION", f"--weights {opts.weights}: the model {opts.init_from} was tuned on "
                             f"base weights from '{source}' ({parent.base_weights.get('id') or 'random'})",
                             "drop --weights (the model's base weights are used), or give the base-weights FILE "
                             "when it has moved (its sha256 is checked)")
    return opts.weights


def normalise_cases(raw: list[dict], preprocessing) -> list[dict]:
    from MedTuningLib.data.preprocess import normalize_intensity

    return [{"id": c["id"], "image": normalize_intensity(c["image"], preprocessing), "label": c["label"][None],
             "spacing": c["spacing"]} for c in raw]


class CropSampler:
    """Draws training batches of random crops (MONAI transforms) from cases held in memory."""

    def __init__(self, cases: list[dict], crop: tuple[int, int, int], num_classes: int,
                 flip_axes: tuple[int, ...] = (0, 1, 2), sampling: str = "foreground", intensity: str = "global",
                 order: str = "random") -> None:
        from MedTuningLib.data.transforms import training_transforms

        self.cases = cases
        self.transforms = training_transforms(crop, num_classes=num_classes, flip_axes=flip_axes, sampling=sampling,
                                              intensity=intensity)
        self.rng = np.random.default_rng(0)
        # "random": each crop from a case drawn at random; "shuffle" (official DistributedSampler): every case
        # once per pass, in an order drawn per epoch from (seed, epoch) alone, each process taking every world-th.
        self.order = order
        self._queue: list[int] = []
        self._epoch = (0, 0, 0, 1, 0)  # seed, epoch, rank, world, passes drawn

    def start_epoch(self, seed: int, epoch: int, rank: int, world: int) -> None:
        self._epoch = (seed % 2**32, epoch, rank, world, 0)
        self._queue = []

    def _next_case(self) -> dict:
        if self.order != "shuffle":
            return self.cases[int(self.rng.integers(len(self.cases)))]
        if not self._queue:
            seed, epoch, rank, world, passes = self._epoch
            order = np.random.default_rng([seed, epoch, passes]).permutation(len(self.cases))
            order = np.resize(order, -(-len(order) // world) * world)  # padded by repeating, as DistributedSampler
            self._queue = [int(i) for i in order[rank::world]]
            self._epoch = (seed, epoch, rank, world, passes + 1)
        return self.cases[self._queue.pop(0)]

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.transforms.set_random_state(seed=seed % (2**32))

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for _ in range(size):
            case = self._next_case()
            sample = self.transforms({"image": case["image"], "label": case["label"]})
            if isinstance(sample, list):  # crop transforms with num_samples return a list
                sample = sample[0]
            images.append(torch.as_tensor(np.asarray(sample["image"]), dtype=torch.float32))
            labels.append(torch.as_tensor(np.asarray(sample["label"])).long())
        return torch.stack(images), torch.stack(labels)


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------

def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero (per optimiser step)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if not name.startswith("optimizer/"):
            continue
        _, index, key = name.split("/", 2)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


class TrainingRun:
    """One ``medtuning train`` run; :meth:`run` returns the outputs for the ``done`` event."""

    def __init__(self, opts: TrainOptions, events: EventStream, cancel: CancelToken | None = None,
                 command: str = "train") -> None:
        self.opts = opts
        self.events = events
        self.cancel = cancel or CancelToken()
        self.command = command
        self.dist = Distributed.from_env()
        self.out = Path(opts.out).absolute()
        self.work = self.out.with_name(self.out.name + ".partial")
        self.curves = None

    # -- preparation --------------------------------------------------------------------------------
    def _inputs(self) -> list[tuple[str, Path | None]]:
        """What the run reads: never replaced by its output (issue 15: --force once deleted the library)."""
        weights = Path(self.opts.weights) if self.opts.weights not in (None, "hub", "none", "auto") else None
        return [("case library (--library)", Path(self.opts.library)),
                ("model folder of --init-from", self.opts.init_from), ("base-weights file (--weights)", weights)]

    def _check_output(self) -> None:
        # --force replaces only an earlier model folder (medtuning.json and MedTuning's own files).
        check_output_folder(self.out, "model", self.opts.force, inputs=self._inputs())
        if self.work.exists() and not self.opts.resume:
            if (self.work / STATE_JSON).exists():
                raise MedTuningError("OUTPUT_EXISTS", f"an interrupted run of this model is in {self.work}",
                                     "add --resume to continue it, or remove that folder to start again")
        if self.opts.resume and not (self.work / STATE_JSON).exists():
            raise MedTuningError("RESUME_STATE_MISSING", f"--resume: no resumable run in {self.work}",
                                 "start without --resume")

    def _select_cases(self, library) -> tuple[list, list, str]:
        opts = self.opts
        # Honest scores: test cases are only ever scored (recorded in the model folder), never trained on
        # and never used to pick the best epoch; unlabelled scans have nothing to train on.
        if opts.val_split == "test":
            raise MedTuningError("INVALID_OPTION", "--val-split test would pick the best epoch on the held-out test "
                                 "cases, so their scores would no longer be held out",
                                 "validate on a 'val' split (medtuning cases split --id ID --split val), or leave "
                                 "--val-split at its default; test cases are scored after training anyway")
        for ids, what in ((opts.train_case_ids, "train on"), (opts.val_case_ids, "validate on")):
            for case_id in ids or []:
                case = library.get(case_id)
                if case.split in ("test", "unlabelled"):
                    raise MedTuningError("INVALID_OPTION", f"case {case_id!r} is in split '{case.split}': a run may "
                                         f"not {what} it", "choose train or val cases", case=case_id)
        if opts.train_case_ids is not None:
            train = [library.get(i) for i in opts.train_case_ids]
        else:
            train = library.cases("train")
        if not train:
            raise MedTuningError("NO_TRAINING_CASES", f"the case library {opts.library} has no training cases",
                                 "add cases with 'medtuning cases add --library ... --split train'")
        if opts.val_case_ids is not None:
            val = [library.get(i) for i in opts.val_case_ids]
        else:
            val = library.cases(opts.val_split) if opts.val_split != "train" else []
        protocol = f"validation on the '{opts.val_split}' split"
        if not val:
            val = list(train)
            protocol = "validation on the training cases (no validation cases in the library: self-fit)"
        modalities = train[0].modalities
        for case in train + val:
            if list(case.modalities) != list(modalities):
                raise MedTuningError("MODALITY_COUNT_MISMATCH",
                                     f"case {case.id} has modalities {case.modalities}, case {train[0].id} has "
                                     f"{modalities}", "train on cases that share the same modalities in the same order")
        return train, val, protocol

    def _working_spacing(self, raw_train: list[dict]) -> tuple[float, float, float] | None:
        """The model's working spacing (z, y, x) or None (native): a warm start keeps its model's."""
        from MedTuningLib.data.spacing import describe, parse_spacing_option, working_spacing_for

        if self.parent is not None:
            spacing = tuple(reversed(self.parent.spacing)) if self.parent.spacing else None
            origin = "kept from the model it starts from"
        else:
            spacing = working_spacing_for(parse_spacing_option(self.opts.spacing), raw_train)
            origin = {"auto": "from the training cases", "native": "as given"}.get(self.opts.spacing, "as given")
        self.events.log(f"working spacing {describe(spacing)} ({origin})")
        return spacing  # type: ignore[return-value]

    def _build_model(self, in_channels: int, num_classes: int):
        from MedTuningLib.models import AdapterConfig, ModelConfig, build_model, load_base_weights

        opts = self.opts
        if opts.init_from is not None:
            loaded = load_model_folder(opts.init_from, "cpu", weights=warm_start_weights(opts, self.parent))
            cfg = loaded.model.config
            if cfg.num_classes != num_classes or cfg.in_channels != in_channels:
                raise MedTuningError("INVALID_OPTION",
                                     f"--init-from {opts.init_from} has {cfg.in_channels} channel(s) and "
                                     f"{cfg.num_classes} classes; these cases need {in_channels} and {num_classes}",
                                     "warm-start only from a model trained on the same modalities and labels")
            self.events.log(f"warm start from {opts.init_from} (round {self.parent.round}): {cfg.arch} "
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
        model = build_model(cfg)
        if opts.decoder_init == "trunc_normal":
            from MedTuningLib.engine.recipe import init_decoder_trunc_normal

            init_decoder_trunc_normal(model)  # before the base weights: official init, then load_from
        base = load_base_weights(model, opts.weights, progress=self.events.log, init=opts.base_init)
        if not base.pretrained:
            self.events.log("base weights: none (random initialisation, not pretrained)", level="warning")
        else:
            self.events.log(f"base weights: {base.id} ({base.source}, sha256 {str(base.sha256)[:12]}…)")
        return model, base.to_dict()

    # -- state ----------------------------------------------------------------------------------------
    def _save_state(self, model, optimizer, state: dict) -> None:
        tensors = {f"model/{k}": v for k, v in self.stored_tensors(model).items()}
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
        name = f"state-e{state['epoch']:04d}.safetensors"
        save_safetensors(self.work / name, tensors)
        previous = None
        if (self.work / STATE_JSON).exists():
            previous = read_json(self.work / STATE_JSON, "RESUME_MISMATCH", "resume state").get("tensors")
        write_json_atomic(self.work / STATE_JSON, {**state, "tensors": name, "optimizer": opt_meta}, "model folder")
        if previous and previous != name:
            (self.work / previous).unlink(missing_ok=True)

    def stored_tensors(self, model) -> dict[str, torch.Tensor]:
        return weights_to_store(model, self.base["pretrained"])[1]

    def _load_stored(self, model, tensors: dict[str, torch.Tensor]) -> None:
        if self.base["pretrained"]:
            model.load_tuned_state_dict(tensors)
        else:
            model.load_state_dict(tensors)

    # -- main -----------------------------------------------------------------------------------------
    def run(self) -> dict:
        opts = self.opts
        device = resolve_device(opts.device, self.dist.local_rank)
        self.events.start(self.command, device=str(device), world_size=self.dist.world)
        if self.opts.recipe:  # what --recipe set, and what the command line overrode (engine/recipe.py)
            from MedTuningLib.engine.recipe import describe_recipe

            self.events.log(describe_recipe(self.opts.recipe))
        if self.dist.main:
            self._check_output()
        self.dist.setup(device)
        lock = None
        created = self.dist.main and not self.work.exists()
        try:
            if self.dist.main:
                ensure_writable_dir(self.out.parent, "output")
                ensure_writable_dir(self.work, "model")
                lock = FileLock(self.work / ".lock", "OUTPUT_LOCKED", "model folder").acquire()
            self.cancel.watch_dir = self.work
            return self._run(device)
        except BaseException as exc:
            # A run that failed before its first resumable state leaves nothing behind; nor does a diverged
            # one (resuming it with the same settings diverges again).
            diverged = isinstance(exc, MedTuningError) and exc.code == "TRAINING_DIVERGED"
            if created and lock is not None and (diverged or not (self.work / STATE_JSON).exists()):
                lock.release()
                lock = None
                shutil.rmtree(self.work, ignore_errors=True)
            raise
        finally:
            if lock is not None:
                lock.release()
            self.dist.teardown()

    def _run(self, device: torch.device) -> dict:
        from MedTuningLib.cases import CaseLibrary
        from MedTuningLib.data.cache import CaseCache
        from MedTuningLib.data.preprocess import Preprocessing
        from MedTuningLib.paths import medtuning_home

        opts, events = self.opts, self.events
        t_start = time.monotonic()
        library = CaseLibrary(opts.library)
        train_cases, val_cases, protocol = self._select_cases(library)
        self.parent = read_model_manifest(opts.init_from) if opts.init_from is not None else None
        if self.parent is not None:
            scheme = warm_start_scheme(opts, self.parent)
            modalities = warm_start_modalities(opts, self.parent, train_cases[0].modalities, events.log)
        else:
            scheme = make_scheme(opts, [c.label_path for c in train_cases + val_cases])
            modalities = list(train_cases[0].modalities)
        cache = CaseCache(medtuning_home() / "cache") if self.dist.main else None
        self.library, self.cache = library, cache
        total_cases = len(train_cases) + len(val_cases)
        events.progress("prepare", 0, total_cases)
        raw_train, raw_val = [], []
        for i, case in enumerate(train_cases + val_cases):
            self.cancel.check()
            is_val = i >= len(train_cases)
            (raw_val if is_val else raw_train).append(
                read_case_for(case, scheme, cache, allow_empty=is_val, log=events.log, model=opts.init_from))
            events.progress("prepare", i + 1, total_cases)
        self.spacing = self._working_spacing(raw_train)
        for case in raw_train + raw_val:  # onto the working grid: images linear, labels nearest
            case["image"] = to_working_grid(case["image"], case["spacing"], self.spacing)
            case["label"] = to_working_grid(case["label"], case["spacing"], self.spacing, nearest=True)
            case["spacing"] = self.spacing or case["spacing"]
        if self.parent is not None:
            # A warm start keeps the model's CT window and statistics: refitting them on the new cases would
            # shift every input the tuned weights were fitted to.
            preprocessing = Preprocessing.from_dict(self.parent.preprocessing)
        else:
            # CT window and statistics come from the training cases only, then are fixed in the model folder.
            preprocessing = Preprocessing.infer(modalities, [raw_train[0]["image"]])
            preprocessing.fit([(c["image"], c["label"]) for c in raw_train])
        train_data, val_data = normalise_cases(raw_train, preprocessing), normalise_cases(raw_val, preprocessing)
        del raw_train, raw_val

        seed_everything(opts.seed, 0, 0)  # identical initial weights on every rank
        model, self.base = self._build_model(len(modalities), scheme.num_classes)
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
        from MedTuningLib.engine.resources import check_memory

        check_memory(model, crop, opts.batch, device, checkpointing, dtype)  # MEMORY_ESTIMATE_TOO_LARGE before any step
        tuned = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(tuned, lr=opts.lr, weight_decay=opts.weight_decay, amsgrad=True)
        report = model.param_report()
        events.log(f"{opts.method}: {report['tuned']:,} tuned of {report['full']:,} parameters "
                   f"({report['inserted']:,} inserted); precision {dtype or 'fp32'}, "
                   f"checkpointing {'on' if checkpointing else 'off'}")

        # Axes of the [D, H, W] arrays; W runs left-right in axial scans. Left/right segments must not be
        # mirrored into each other, so their models never see left-right flips (nor use them at test time).
        flip_axes = (0, 1) if is_lateral(scheme) else (0, 1, 2)
        if len(flip_axes) < 3:
            events.log("left/right segments: no left-right flips in training or test-time augmentation")
        sampler = CropSampler(train_data, crop, scheme.num_classes, flip_axes=flip_axes, sampling=opts.crop_sampling,
                              intensity=opts.intensity_aug, order=opts.case_order)
        # Crops per optimiser step: batch x accumulate x processes (one GPU with --accumulate 8 = 8 GPUs x 2).
        steps_per_epoch = opts.steps_per_epoch or recipe_steps_per_epoch(len(train_data), opts.batch * opts.accumulate,
                                                                         self.dist.world, opts.epoch_passes)
        loss_fn = make_loss(opts.loss)

        # Resume ---------------------------------------------------------------------------------------
        start_epoch, total_epochs, elapsed_before = 0, opts.epochs, 0.0
        best = {"score": -1.0, "epoch": 0, "metrics": {}}
        from MedTuningLib.reports.curves import TrainingCurves

        if opts.resume:
            state = read_json(self.work / STATE_JSON, "RESUME_MISMATCH", "resume state")
            if state.get("fingerprint") != opts.fingerprint():
                changed = sorted(k for k, v in opts.fingerprint().items() if state.get("fingerprint", {}).get(k) != v)
                raise MedTuningError("RESUME_MISMATCH", f"the interrupted run used other settings ({', '.join(changed)})",
                                     "resume with the same options, or remove the .partial folder to start again")
            tensors = load_safetensors(self.work / state["tensors"], "resume state")
            self._load_stored(model, {k[6:]: v.to(device) for k, v in tensors.items() if k.startswith("model/")})
            optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
            start_epoch, total_epochs = state["epoch"], state["total_epochs"]
            elapsed_before, best = state["elapsed_s"], state["best"]
            self.curves = TrainingCurves.load(self.work, last_epoch=start_epoch)
            events.log(f"resuming after epoch {start_epoch} of {total_epochs}")
        else:
            self.curves = TrainingCurves(self.work)

        train_model = model
        self.batchnorm = "BatchNorm"
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            if opts.sync_batchnorm:  # the official choice; torch has it on GPUs only (engine/recipe.py)
                model, self.batchnorm = use_sync_batchnorm(model, device, self.dist.world, events.log)
            train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

        def state_dict_for(epoch: int) -> dict:
            return {"epoch": epoch, "total_epochs": total_epochs, "elapsed_s": elapsed_before + time.monotonic() - t_start,
                    "best": best, "fingerprint": opts.fingerprint(), "crop": list(crop), "saved": now_iso()}

        if self.dist.main and not opts.resume:
            self._save_state(model, optimizer, state_dict_for(0))

        warmup_epochs = opts.warmup_epochs if opts.warmup_epochs is not None else min(5, max(0, total_epochs // 10))
        budget = EpochBudget(opts.minutes * 60, opts.epochs, opts.val_every) if opts.minutes is not None else None
        epoch = start_epoch
        loss_value = float("nan")
        try:
            while epoch < total_epochs:
                epoch += 1
                t_epoch = time.monotonic()
                derived = seed_everything(opts.seed, epoch, self.dist.rank)
                sampler.reseed(derived)
                sampler.start_epoch(opts.seed, epoch, self.dist.rank, self.dist.world)
                train_model.train()
                losses = []
                for step in range(steps_per_epoch):
                    if self.dist.any(self.cancel.requested):
                        raise Cancelled(self.cancel.reason or "cancel requested on another rank")
                    global_step = (epoch - 1) * steps_per_epoch + step
                    total_steps = total_epochs * steps_per_epoch
                    lr = learning_rate(opts.schedule, opts.lr, epoch, step, steps_per_epoch, total_epochs,
                                       warmup_epochs)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    loss_value = self._train_step(train_model, optimizer, sampler, loss_fn, device, dtype)
                    losses.append(loss_value)
                    done_steps = global_step + 1 - start_epoch * steps_per_epoch
                    rate = (time.monotonic() - t_start) / max(1, done_steps)
                    events.progress("train", global_step + 1, total_steps, epoch=epoch, epochs=total_epochs,
                                    eta_s=round(rate * (total_steps - global_step - 1), 1), loss=loss_value)
                mean_loss = float(np.mean(losses))
                self._metric("train", epoch, "loss", mean_loss)
                self._metric("train", epoch, "lr", lr)

                t_trained, validated = time.monotonic(), False
                if self.dist.main and (epoch % opts.val_every == 0 or epoch == total_epochs):
                    validated = True
                    metrics = self._validate(model, val_data, scheme, crop, device, dtype)
                    score = metrics.get("dice/mean", 0.0)
                    for name, value in metrics.items():
                        self._metric("validate", epoch, name, value)
                    if score > best["score"]:
                        best = {"score": score, "epoch": epoch, "metrics": metrics}
                        save_safetensors(self.work / BEST_WEIGHTS, self.stored_tensors(model))
                    events.checkpoint(str(self.work / BEST_WEIGHTS), epoch, best=best["epoch"] == epoch,
                                      dice=score)
                epoch_seconds = time.monotonic() - t_epoch
                if budget is not None:
                    # Re-planned after every epoch from steady-state epoch times (engine/budget.py), up to --epochs.
                    budget.record(t_trained - t_epoch, time.monotonic() - t_trained if validated else None)
                    proposed = self.dist.smallest(budget.plan(epoch, elapsed_before + time.monotonic() - t_start))
                    if adopt_plan(total_epochs, proposed, epoch):
                        total_epochs = proposed
                        events.log(f"time budget {opts.minutes} min: planning {total_epochs} epochs "
                                   f"({budget.epoch_estimate():.1f} s each in the steady state)")
                if self.dist.main:
                    self.curves.write()
                    self._save_state(model, optimizer, state_dict_for(epoch))
                self.dist.barrier()
                over_budget = opts.minutes is not None and (
                    elapsed_before + time.monotonic() - t_start + epoch_seconds > opts.minutes * 60)
                if self.dist.any(over_budget) and epoch < total_epochs:
                    events.log(f"time budget of {opts.minutes} min reached after epoch {epoch}")
                    total_epochs = epoch
        except Cancelled as exc:
            exc.outputs = {"partial": str(self.work)}  # type: ignore[attr-defined]
            raise
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            # CUDA raises OutOfMemoryError; the CPU allocator a RuntimeError ("... can't allocate memory").
            if not isinstance(exc, torch.cuda.OutOfMemoryError) and not any(
                    text in str(exc) for text in ("out of memory", "can't allocate memory", "not enough memory")):
                raise
            where = "GPU" if device.type == "cuda" else "computer"
            raise MedTuningError("OUT_OF_MEMORY", f"the {where} ran out of memory at crop {crop} and batch {opts.batch}",
                                 "use a smaller --batch or --crop, or --checkpointing on; the run is resumable "
                                 "with --resume after that") from exc

        if not self.dist.main:
            return {}
        return self._finish(model, scheme, preprocessing, modalities, crop, train_cases, val_cases, protocol, best,
                            report, epoch, elapsed_before + time.monotonic() - t_start, device, dtype, checkpointing,
                            flip_axes)

    def _train_step(self, model, optimizer, sampler, loss_fn, device, dtype) -> float:
        opts = self.opts
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(opts.accumulate):
            images, labels = sampler.batch(opts.batch)
            images, labels = images.to(device), labels.to(device)
            sync = micro == opts.accumulate - 1 or not self.dist.enabled
            context = model.no_sync() if not sync else _nullcontext()
            with context:
                with autocast(device, dtype):
                    logits = model(images)
                loss = loss_fn(logits.float(), labels) / opts.accumulate
                if not torch.isfinite(loss):
                    raise MedTuningError("TRAINING_DIVERGED", "the training loss became NaN or infinite",
                                         "lower --lr (e.g. 5e-4), or use --precision fp32")
                loss.backward()
            total += float(loss.detach())
        optimizer.step()
        # The loss is computed before the update: an update that makes a weight NaN/Inf (e.g. --lr too
        # large) shows only here. Such a run stops; nothing is published.
        tuned = [p for group in optimizer.param_groups for p in group["params"]]
        if tuned and not bool(torch.stack([torch.isfinite(p).all() for p in tuned]).all()):
            raise MedTuningError("TRAINING_DIVERGED", "the tuned weights became NaN or infinite after an optimiser "
                                 f"step (learning rate {optimizer.param_groups[0]['lr']:g})",
                                 "lower --lr (e.g. 5e-4), or use --precision fp32; no model was written")
        return total

    def _metric(self, phase: str, epoch: int, name: str, value: float) -> None:
        self.events.metric(phase, name, value, epoch=epoch)
        if self.curves is not None and self.dist.main:
            self.curves.add(epoch, name, value, phase)

    def _validate(self, model, val_data, scheme, crop, device, dtype) -> dict[str, float]:
        from MedTuningLib.engine.evaluate import region_scores
        from MedTuningLib.engine.infer import predict_probabilities

        per_case = []
        for i, case in enumerate(val_data):
            self.cancel.check()
            probs = predict_probabilities(model, torch.from_numpy(case["image"]), crop, device, dtype, overlap=0.25,
                                          on_window=self.cancel.check)
            pred = probs.argmax(0).numpy()
            per_case.append(region_scores(scheme, pred, case["label"][0], case["spacing"], hd95=False))
            self.events.progress("validate", i + 1, len(val_data))
        model.train()
        metrics: dict[str, float] = {}
        for name in per_case[0]:
            values = [c[name] for c in per_case if c[name] is not None and np.isfinite(c[name])]
            if values:
                metrics[name] = float(np.mean(values))
        dice_values = [v for k, v in metrics.items() if k.startswith("dice/") and k != "dice/mean"]
        metrics["dice/mean"] = float(np.mean(dice_values)) if dice_values else 0.0
        return metrics

    def _finish(self, model, scheme, preprocessing, modalities, crop, train_cases, val_cases, protocol, best, report,
                epochs_done, seconds, device, dtype, checkpointing, flip_axes) -> dict:
        opts = self.opts
        events = self.events
        events.progress("write", 0, 1)
        if opts.select == "best" and (self.work / BEST_WEIGHTS).exists():  # "last": the model as trained
            tensors = load_safetensors(self.work / BEST_WEIGHTS, "best weights")
            self._load_stored(model, {k: v.to(device) for k, v in tensors.items()})
        stored, tensors = weights_to_store(model, self.base["pretrained"])
        test = self._score_test_cases(model, scheme, preprocessing, crop, device, dtype)
        cfg = model.config
        manifest = {
            "created": now_iso(),
            "architecture": cfg.to_dict(),
            "method": {"name": cfg.method, "adapter": cfg.to_dict().get("adapter")},
            "base_weights": self.base,
            "pretrained": bool(self.base["pretrained"]),
            "stored": stored,
            "modalities": modalities,
            "preprocessing": preprocessing.to_dict(),
            "label_scheme": scheme.to_dict(),
            "crop": list(crop),
            "flip_axes": list(flip_axes),
            "spacing": list(reversed(self.spacing)) if self.spacing is not None else None,
            "parameters": {k: report[k] for k in ("full", "tuned", "inserted", "head") if k in report},
            "recipe": (opts.recipe or {}).get("name", "none"),
            "training_choices": {"loss": opts.loss, "schedule": opts.schedule, "epoch_passes": opts.epoch_passes,
                                 "case_order": opts.case_order,
                                 "crop_sampling": opts.crop_sampling, "intensity_aug": opts.intensity_aug,
                                 "base_init": opts.base_init, "selection": opts.select, "batchnorm": self.batchnorm,
                                 "norm_eps": opts.norm_eps, "decoder_init": opts.decoder_init,
                                 "recipe_overridden": (opts.recipe or {}).get("overridden", {})},
            "training": {
                "epochs": epochs_done, "seconds": round(seconds, 1), "peak_memory_mb": round(peak_memory_mb(device), 1),
                "best": best["metrics"], "best_epoch": best["epoch"], "batch": opts.batch,
                "accumulate": opts.accumulate, "world_size": self.dist.world, "lr": opts.lr, "loss": opts.loss,
                "precision": str(dtype or "fp32").replace("torch.", ""), "checkpointing": checkpointing,
                "seed": opts.seed, "device": str(device), "library": str(Path(opts.library).absolute()),
                "train_cases": [c.id for c in train_cases], "val_cases": [c.id for c in val_cases],
                "validation": protocol, "init_from": str(Path(opts.init_from).absolute()) if opts.init_from else None,
                "test_cases": test.case_ids if test is not None else [],
            },
        }
        record = ModelManifest.from_dict({"format_version": FORMAT_VERSION, **manifest}, "the new model description")
        record.test = test
        record.history = self._history(record, train_cases, test, epochs_done, seconds)
        write_model_folder(self.work, model, record, tensors)
        self.curves.write()
        # Checked again right before replacing: the folder may have changed during the run.
        check_output_folder(self.out, "model", opts.force, inputs=self._inputs())
        (self.work / ".lock").unlink(missing_ok=True)
        replace_dir(self.work, self.out)
        # The resume state and cache are working files, not part of the model. They go only after
        # the model is published: a kill before this point leaves a resumable run, after it a model.
        for path in list(self.out.iterdir()):
            if path.name.startswith("state") or path.name in (BEST_WEIGHTS, "cache", "STOP"):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        events.checkpoint(str(self.out), epochs_done, best=True)
        events.progress("write", 1, 1)
        outputs = {"model": str(self.out), "best_epoch": best["epoch"], "best": best["metrics"],
                   "round": record.round}
        if test is not None:
            outputs["test"] = {k: v.get("mean") for k, v in test.summary.items()}
        return outputs

    def _score_test_cases(self, model, scheme, preprocessing, crop, device, dtype) -> EvaluationReport | None:
        """Dice per region on the library's test cases (held out: never trained on nor used for selection),
        recorded in the model folder so that every round is scored on the same cases."""
        from MedTuningLib.engine.evaluate import region_scores
        from MedTuningLib.engine.infer import predict_on_input_grid

        cases = [c for c in self.library.cases("test") if c.labelled]
        if not cases:
            self.events.log("the library has no test cases: no held-out scores are recorded for this round "
                            "(add some with 'medtuning cases add --split test')", level="warning")
            return None
        scored = []
        for i, case in enumerate(cases):
            self.cancel.check()
            raw = read_case_for(case, scheme, self.cache, allow_empty=True, log=self.events.log,
                                model=self.opts.init_from)
            data = normalise_cases([raw], preprocessing)[0]
            # Scored on the case's own grid, as 'medtuning evaluate' scores it.
            probs = predict_on_input_grid(model, data["image"], data["spacing"], self.spacing, crop, device, dtype,
                                          overlap=0.25, on_window=self.cancel.check)
            metrics = region_scores(scheme, probs.argmax(0).numpy(), data["label"][0], data["spacing"], hd95=False)
            scored.append(CaseScores(id=case.id, metrics=metrics))
            self.events.progress("infer", i + 1, len(cases), case=case.id, split="test")
        regions = [r.name for r in scheme.regions] + (["composite"] if scheme.composite else [])
        report = EvaluationReport(model=str(self.out), library=str(Path(self.opts.library).absolute()), split="test",
                                  regions=regions, cases=scored, summary=summarise_scores(scored),
                                  protocol="held-out test cases of the library (never trained on, not used to "
                                           "pick the best epoch); Dice, no TTA", created=now_iso())
        for name, entry in report.summary.items():
            if entry.get("mean") is not None:
                self.events.metric("test", name, entry["mean"])
        return report

    def _history(self, record, train_cases, test, epochs_done, seconds) -> list[RoundRecord]:
        """The lineage's rounds, this one last: the parent's history (or its round 0, for a model folder
        written before histories existed), then this round with its new cases and their correction effort."""
        history: list[RoundRecord] = []
        parent_train: list[str] = []
        if self.parent is not None:
            history = list(self.parent.history)
            if not history:
                history = [RoundRecord(round=0, model=str(Path(self.opts.init_from).absolute()),
                                       created=self.parent.created, train_cases=list(self.parent.training.train_cases),
                                       epochs=self.parent.training.epochs, seconds=self.parent.training.seconds,
                                       test=self.parent.test)]
            parent_train = list(history[-1].train_cases)
        new = [c for c in train_cases if c.id not in parent_train] if self.parent is not None else []
        efforts = [c.provenance_record.effort for c in new if c.provenance_record.effort]
        history.append(RoundRecord(
            round=history[-1].round + 1 if history else 0, model=str(self.out), created=record.created,
            init_from=str(Path(self.opts.init_from).absolute()) if self.opts.init_from else None,
            train_cases=[c.id for c in train_cases], new_cases=[c.id for c in new], epochs=epochs_done,
            seconds=round(seconds, 1), test=test, effort=correction_totals(efforts)))
        return history


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def make_loss(name: str):
    """The MONAI loss ``name`` (dice_ce, dice, or dice_fg_batch: the official one): engine/objectives.py."""
    from MedTuningLib.engine.objectives import make_loss as _make_loss

    return _make_loss(name)
