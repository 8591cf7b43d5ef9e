"""The ``medtuning`` command line (also ``python -m MedTuningLib``).

The parser is the contract the Slicer module, the benches and the tests build against
(docs/method.md, "Contracts"): add options, never rename these. Each sub-command lives in
``MedTuningLib/commands/<name>.py`` as ``run(args, ctx) -> dict`` (its outputs); this module owns
the common parts: the ``start`` / ``error`` / ``done`` events, exit statuses, cancel handling.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from MedTuningLib import __version__
from MedTuningLib.cancel import CancelToken
from MedTuningLib.errors import (EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_FAILURE, EXIT_OK, Cancelled,
                                 MedTuningError)
from MedTuningLib.engine.windows import (DEFAULT_OVERLAP, INFERENCE_PRECISIONS, TRAIN_PRECISIONS, describe_overlap,
                                         overlap_argument)
from MedTuningLib.engine.train_options import DEFAULT_WORKERS
from MedTuningLib.events import EventStream
from MedTuningLib.schema import ARCHS, LABELLED_SPLITS, METHODS, PROVENANCES, SOURCE_LABELS, SPLITS, TASKS

DEVICES = ("auto", "cpu", "cuda")
FAST_HELP = ("the quickest settings measured: windows without overlap and, on a CPU, int8 Linear layers (about "
             "4x faster on ViT-B, at a small Dice cost); --overlap / --precision given as well win")
OVERLAP_HELP = (f"sliding-window overlap: one fraction for every axis or one per window axis D,H,W "
                f"(default {describe_overlap(DEFAULT_OVERLAP)})")
INFERENCE_PRECISION_HELP = "auto: bf16 where the device has it, else fp32; int8: int8 Linear layers (CPU only)"
MAX_SIZE = 4096  # voxels along one axis of a crop: beyond any scanner's matrix


@dataclass
class CommandContext:
    """What every sub-command receives besides its parsed arguments."""

    events: EventStream
    cancel: CancelToken = field(default_factory=CancelToken)
    command: str = ""
    argv: list = field(default_factory=list)  # the command line as given (what was set explicitly: recipes)


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so usage errors become ``error`` events."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _crop(text: str) -> tuple[int, int, int]:
    parts = text.lower().replace("×", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"crop must look like DxHxW (e.g. 16x128x128), not {text!r}")
    if len(dims) != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"crop must be three positive sizes DxHxW, not {text!r}")
    if max(dims) > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"crop sizes must be at most {MAX_SIZE} voxels, not {text!r}")
    return dims  # type: ignore[return-value]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _finite(text: str) -> float:
    # Every number that reaches the optimiser, a manifest or a file is finite (issue 15: --lr inf).
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


def _positive_float(text: str) -> float:
    value = _finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or positive, not {text}")
    return value


MAX_RATE = 1000.0  # learning rate / weight decay: far beyond any useful value, well inside float32


def _learning_rate(text: str) -> float:
    value = _positive_float(text)
    if value > MAX_RATE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_RATE:g}, not {text}")
    return value


def _decay(text: str) -> float:
    value = _non_negative_float(text)
    if value > MAX_RATE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_RATE:g}, not {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, not {text}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", choices=("jsonl", "text"), default="text",
                   help="jsonl: one JSON event per line on stdout and nothing else (for programs); "
                        "text: human-readable output (default)")


def _add_model_options(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    p.add_argument("--arch", choices=ARCHS, default="vit_upernet" if defaults else None,
                   help="architecture (default vit_upernet: ViT-B/16 + UPerNet)")
    p.add_argument("--backbone", default=None,
                   help="timm backbone name (default: the paper's for the arch; e.g. vit_tiny_patch16_224, "
                        "vit_small_patch16_224 for CPU work)")
    p.add_argument("--method", choices=METHODS, default="med_tuning" if defaults else None,
                   help="tuning method (default med_tuning)")
    p.add_argument("--alpha", type=_positive_float, default=6.0, help="Med-Adapter reduction: bottleneck = C / alpha")
    p.add_argument("--no-local", dest="local_branch", action="store_false",
                   help="ablation: drop the adapter's multi-scale local branch")
    p.add_argument("--global-branch", choices=("fft", "dwconv9", "dwconv11", "none"), default="fft",
                   help="ablation: adapter global branch (FFT, or a large-kernel depthwise conv instead, or none)")
    p.add_argument("--no-mix", dest="mix", action="store_false", help="ablation: drop the adapter's 1x1x1 mixing conv")
    p.add_argument("--fusion", choices=("concat", "add", "max", "none"), default="concat",
                   help="ablation: inter-stage feature fusion")
    p.add_argument("--backbone-args", default=None,
                   help='timm size overrides for CPU-sized models, e.g. "depth=4,embed_dim=192,num_heads=3,patch_size=8"')
    p.add_argument("--decoder-width", type=_positive_int, default=None,
                   help="decoder channel width (default: the paper's)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="medtuning", description="Med-Tuning for 3D medical image segmentation: fine-tune "
                     "Med-Adapters on a frozen pretrained vision transformer, segment, evaluate.")
    parser.add_argument("--version", action="version", version=f"medtuning {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    # train ---------------------------------------------------------------------------------------
    p = sub.add_parser("train", help="tune a model on a case library")
    p.add_argument("--library", type=Path, required=True, help="case library folder (cases.json)")
    p.add_argument("--out", type=Path, required=True, help="model folder to create (works in OUT.partial/)")
    # task, source labels, arch, method, weights: None = not given, so that a warm start (--init-from)
    # takes them from the model folder and refuses only what contradicts it (defaults: TrainOptions).
    p.add_argument("--task", choices=TASKS, default=None, help="label scheme preset (default custom)")
    p.add_argument("--labels", default=None,
                   help='custom label mapping for unnamed labelmaps, e.g. "Kidney=2,3;Spleen=1"')
    p.add_argument("--source-labels", choices=SOURCE_LABELS, default=None,
                   help="label convention of the BraTS source files (brats task; default brats2015)")
    p.add_argument("--segments", default=None,
                   help='custom task: train only these segments of the .seg.nrrd labels, e.g. "right lung,left lung"')
    _add_model_options(p, defaults=False)
    p.add_argument("--weights", default=None,
                   help="base weights: hub (Hugging Face cache or download; the default), a local FILE, or none "
                        "(random, not pretrained); with --init-from: the model's, checked by sha256")
    p.add_argument("--crop", type=_crop, default=(16, 128, 128), help="training crop DxHxW (default 16x128x128)")
    p.add_argument("--batch", type=_positive_int, default=2, help="crops per step")
    p.add_argument("--accumulate", type=_positive_int, default=1, help="gradient accumulation steps")
    p.add_argument("--epochs", type=_positive_int, default=50)
    p.add_argument("--steps-per-epoch", type=_positive_int, default=None,
                   help="training steps per epoch (default: one pass over the training cases' crops)")
    p.add_argument("--minutes", type=_positive_float, default=None, help="time budget; stops cleanly when spent")
    p.add_argument("--lr", type=_learning_rate, default=2e-3, help="learning rate (paper: 2e-3)")
    p.add_argument("--weight-decay", type=_decay, default=1e-5)
    p.add_argument("--warmup-epochs", type=_non_negative_int, default=None,
                   help="warm-up epochs before the decay (default min(5, epochs // 10))")
    p.add_argument("--loss", choices=("dice_ce", "dice", "dice_fg_batch"), default="dice_ce",
                   help="dice_ce: Dice + cross-entropy (default); dice: MONAI Dice with background, per sample; "
                        "dice_fg_batch: the official Med-Tuning loss (foreground classes, batch-global, summed)")
    # --recipe paper and the options it sets (docs/method.md: each official choice and why the defaults differ).
    p.add_argument("--recipe", choices=("paper",), default=None,
                   help="paper: the official Med-Tuning training protocol (128³ crops, 250 epochs, its loss, "
                        "schedule, augmentation, initialisation, SyncBatchNorm, last epoch); options given "
                        "explicitly override single points")
    p.add_argument("--schedule", choices=("cosine", "paper"), default="cosine",
                   help="cosine: per step, linear warm-up, cosine to 0 (default); paper: the official per-epoch "
                        "schedule")
    p.add_argument("--epoch-passes", type=_positive_int, default=2,
                   help="crops per training case per epoch (default 2; paper 1)")
    p.add_argument("--case-order", choices=("random", "shuffle"), default="random",
                   help="random: each crop from a case drawn at random (default); shuffle: every case once per "
                        "pass in a fresh order per epoch, shared out among processes (paper: DistributedSampler)")
    p.add_argument("--crop-sampling", choices=("foreground", "uniform"), default="foreground",
                   help="foreground: crops centred on foreground 2:1 (default); uniform: any position (paper)")
    p.add_argument("--intensity-aug", choices=("global", "per_column"), default="global",
                   help="intensity scale/shift: one draw per crop (default) or per (column, channel) (paper)")
    p.add_argument("--base-init", choices=("project", "official"), default="project",
                   help="how base weights are loaded: project (converted, default) or official (the official "
                        "code's choices: some tensors stay random, Swin decoder from the encoder)")
    p.add_argument("--select", choices=("best", "last"), default="best",
                   help="the model kept: best validation epoch (default) or the last epoch (paper)")
    p.add_argument("--sync-batchnorm", action="store_true",
                   help="SyncBatchNorm under torchrun on GPUs (paper); CPU runs keep BatchNorm")
    p.add_argument("--norm-eps", type=_positive_float, default=None,
                   help="ViT LayerNorm eps (default timm's 1e-6; paper 1e-5)")
    p.add_argument("--decoder-init", choices=("default", "trunc_normal"), default="default",
                   help="decoder Linear/LayerNorm initialisation: PyTorch's (default) or truncated normal 0.02 "
                        "(official Swin-UNet)")
    p.add_argument("--precision", choices=TRAIN_PRECISIONS, default="auto",
                   help="autocast precision (auto: bf16 where the device supports it)")
    p.add_argument("--checkpointing", choices=("auto", "on", "off"), default="auto",
                   help="activation checkpointing of frozen blocks")
    p.add_argument("--val-every", type=_positive_int, default=1, help="validate every N epochs")
    p.add_argument("--val-split", choices=("val", "test", "train"), default="val",
                   help="split that picks the best epoch (falls back to the training cases when empty); 'test' is "
                        "refused: test cases are only ever scored, never used for selection")
    p.add_argument("--spacing", default=None, metavar="auto|native|X,Y,Z",
                   help="working spacing in mm that every input is resampled to (recorded in the model): auto (the "
                        "default) = the training cases' median (nnU-Net's rule for anisotropic data), native = each "
                        "scan's own grid; a warm start keeps its model's")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=_non_negative_int, default=DEFAULT_WORKERS,
                   help="processes that prepare training crops while the step runs (0: the main process prepares "
                        f"them; default {DEFAULT_WORKERS}); results are the same for every value (each crop has its "
                        "own seed), only the speed differs")
    p.add_argument("--init-from", type=Path, default=None,
                   help="warm start from an earlier model folder: its label scheme, modalities, preprocessing, "
                        "architecture and base weights are kept (see also 'medtuning retune')")
    p.add_argument("--resume", action="store_true", help="continue OUT.partial/ from its last saved state")
    p.add_argument("--force", action="store_true", help="replace an existing OUT (kept until the new one is complete)")
    _add_common(p)

    # retune / history / suggest: the correction loop ------------------------------------------------
    p = sub.add_parser("retune", help="warm-start a model on its case library after corrections (keeps its setup)")
    p.add_argument("--model", type=Path, required=True, help="model folder to start from")
    p.add_argument("--library", type=Path, required=True, help="case library (with the corrected cases)")
    p.add_argument("--out", type=Path, default=None,
                   help="new model folder (default: MODEL-roundN beside the model, N its round + 1)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=_positive_int, default=None, help="epochs (default 10)")
    budget.add_argument("--minutes", type=_positive_float, default=None, help="time budget; stops cleanly when spent")
    p.add_argument("--steps-per-epoch", type=_positive_int, default=None)
    p.add_argument("--batch", type=_positive_int, default=None, help="crops per step (default: as the model was trained)")
    p.add_argument("--lr", type=_learning_rate, default=None, help="learning rate (default: as the model was trained)")
    p.add_argument("--weights", default=None, help="the model's base-weights FILE when it has moved (sha256 checked)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue OUT.partial/ from its last saved state")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    _add_common(p)

    p = sub.add_parser("history", help="held-out Dice per region and correction effort per round of a model")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--json", action="store_true", help="print the rounds as JSON")
    _add_common(p)

    p = sub.add_parser("suggest", help="rank the library's unlabelled scans by the model's uncertainty")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--library", type=Path, required=True)
    p.add_argument("--top", type=_positive_int, default=None, help="list only the K most uncertain scans")
    p.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="auto", help=INFERENCE_PRECISION_HELP)
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--json", action="store_true")
    _add_common(p)

    # segment -------------------------------------------------------------------------------------
    p = sub.add_parser("segment", help="segment a scan with a model folder")
    p.add_argument("--model", type=Path, required=True, help="model folder")
    p.add_argument("--image", type=Path, action="append", default=None,
                   help="input volume or DICOM series folder; one per modality, in the model's channel order "
                        "(required unless --batch-list)")
    p.add_argument("--out", type=Path, default=None,
                   help="result .seg.nrrd, or .dcm (DICOM SEG) when the input is a DICOM series; with --batch-list "
                        "a folder for the results")
    p.add_argument("--series", action="append", default=None, metavar="UID",
                   help="SeriesInstanceUID to read from a DICOM folder holding several series (repeat: one per "
                        "--image, in order)")
    p.add_argument("--dicom-seg", type=Path, default=None, metavar="FILE",
                   help="also write the result as DICOM SEG (the input must be a DICOM series)")
    p.add_argument("--seg-type", choices=("binary", "fractional"), default="binary",
                   help="DICOM SEG type: binary masks, or fractional (the model's probabilities, 0..255)")
    p.add_argument("--dicom-resample", action="store_true",
                   help="resample a DICOM series with a gantry tilt, uneven spacing or missing slices onto a "
                        "regular grid (logged) instead of refusing it; the result is then a .seg.nrrd only")
    p.add_argument("--batch-list", type=Path, default=None, metavar="CSV_OR_FOLDER",
                   help="segment many scans with one model load: a CSV (one row per scan: a column per modality, "
                        "out, optional labelmap / dicom_seg / series / id) or a folder with one scan per "
                        "sub-folder; finished outputs are skipped on a rerun")
    p.add_argument("--batch-format", choices=("seg.nrrd", "dcm", "both"), default="seg.nrrd",
                   help="results of a --batch-list folder: .seg.nrrd, DICOM SEG (.dcm), or both")
    p.add_argument("--labelmap", type=Path, default=None, help="also write a labelmap (e.g. .nii.gz)")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    p.add_argument("--overlap", type=overlap_argument, default=DEFAULT_OVERLAP, help=OVERLAP_HELP)
    p.add_argument("--fast", action="store_true", help=FAST_HELP)
    p.add_argument("--protocol", choices=("project", "paper"), default="project",
                   help="paper: the official inference (windows at stride crop/3, uniform averaging, 8-flip TTA, "
                        "BraTS ET < 500 voxels -> necrosis, fp32); implies --tta, excludes --overlap")
    p.add_argument("--min-component", type=_non_negative_int, default=0,
                   help="remove connected components smaller than this many voxels (0: keep all)")
    p.add_argument("--weights", default=None, help="base-weights file, when not where the model folder recorded")
    p.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="auto", help=INFERENCE_PRECISION_HELP)
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    _add_common(p)

    # evaluate ------------------------------------------------------------------------------------
    p = sub.add_parser("evaluate", help="Dice and HD95 of a model on a case library split")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--library", type=Path, required=True)
    p.add_argument("--split", choices=LABELLED_SPLITS + ("all",), default="test")
    p.add_argument("--report", type=Path, default=None, help="folder for report.json / report.md / report.html")
    p.add_argument("--force", action="store_true", help="replace an earlier report in --report")
    p.add_argument("--tta", action="store_true")
    p.add_argument("--overlap", type=overlap_argument, default=DEFAULT_OVERLAP, help=OVERLAP_HELP)
    p.add_argument("--fast", action="store_true", help=FAST_HELP)
    p.add_argument("--protocol", choices=("project", "paper"), default="project",
                   help="paper: the official evaluation (stride crop/3 windows, uniform averaging, 8-flip TTA, "
                        "ET < 500 voxels -> necrosis, HD95 of regions absent from both left out, fp32)")
    p.add_argument("--weights", default=None)
    p.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="auto", help=INFERENCE_PRECISION_HELP)
    p.add_argument("--device", choices=DEVICES, default="auto")
    _add_common(p)

    # params --------------------------------------------------------------------------------------
    p = sub.add_parser("params", help="parameter counts of an architecture under a tuning method")
    _add_model_options(p)
    p.add_argument("--in-channels", type=_positive_int, default=4)
    p.add_argument("--classes", type=_positive_int, default=4)
    p.add_argument("--img-size", type=_positive_int, default=128, help="slice size H=W (paper 128)")
    p.add_argument("--depth", type=_positive_int, default=128, help="crop depth D (FFT filter size; paper 128)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_common(p)

    # info ----------------------------------------------------------------------------------------
    p = sub.add_parser("info", help="versions, devices, models and where files live")
    p.add_argument("--json", action="store_true")
    p.add_argument("--errors", action="store_true", help="print the error-code catalogue (Markdown)")
    p.add_argument("--model", type=Path, default=None, help="describe a model folder")
    _add_common(p)

    # demo ----------------------------------------------------------------------------------------
    p = sub.add_parser("demo", help="tune, segment and evaluate on the chest CT shipped with slicerio")
    p.add_argument("--out", type=Path, default=Path("demo-output"))
    p.add_argument("--minutes", type=_positive_float, default=None, help="training time budget")
    p.add_argument("--weights", default="auto",
                   help="auto (pretrained from the hub cache if present, else none), hub, FILE or none")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an earlier demo output")
    _add_common(p)

    # cases ---------------------------------------------------------------------------------------
    p = sub.add_parser("cases", help="manage a case library (add / list / remove)")
    csub = p.add_subparsers(dest="cases_command", metavar="ACTION", parser_class=_Parser)
    csub.required = True
    c = csub.add_parser("add", help="copy a labelled case into the library")
    c.add_argument("--library", type=Path, required=True)
    c.add_argument("--image", type=Path, action="append", required=True, help="one per modality, in channel order")
    c.add_argument("--label", type=Path, default=None,
                   help="labelmap or .seg.nrrd (required unless --split unlabelled)")
    c.add_argument("--modality", action="append", default=None, help="modality name per --image (e.g. CT, FLAIR)")
    c.add_argument("--split", choices=SPLITS, default="train",
                   help="train, val (picks the best epoch), test (held out: only scored) or unlabelled (a scan "
                        "without a label, never trained on; 'medtuning suggest' ranks these)")
    c.add_argument("--id", dest="case_id", default=None, help="case id (default: from the first image's name)")
    c.add_argument("--provenance", choices=PROVENANCES, default="import")
    c.add_argument("--from-model", type=Path, default=None,
                   help="correction: the model folder whose result was corrected")
    c.add_argument("--model-output", type=Path, default=None,
                   help="correction: the model's result before correcting it (.seg.nrrd from 'medtuning segment'); "
                        "the correction effort per segment (Dice, mm³ added / removed) is recorded")
    c.add_argument("--source", default=None, help="where the case came from (free text)")
    c.add_argument("--series", action="append", default=None, metavar="UID",
                   help="SeriesInstanceUID to read from a DICOM folder holding several series (repeat: one per "
                        "--image, in order)")
    c.add_argument("--dicom-resample", action="store_true",
                   help="resample a DICOM series with a gantry tilt, uneven spacing or missing slices onto a "
                        "regular grid (logged, recorded in the case's provenance) instead of refusing it")
    c.add_argument("--slices", default=None, metavar="START:STOP",
                   help="add only these slices (end excluded), e.g. 0:80 to train on a slab and hold out the rest")
    _add_common(c)
    c = csub.add_parser("list", help="list the library's cases")
    c.add_argument("--library", type=Path, required=True)
    c.add_argument("--split", choices=SPLITS, default=None)
    c.add_argument("--json", action="store_true")
    _add_common(c)
    c = csub.add_parser("remove", help="remove a case (its files too)")
    c.add_argument("--library", type=Path, required=True)
    c.add_argument("--id", dest="case_id", required=True)
    _add_common(c)
    c = csub.add_parser("split", help="change a case's split")
    c.add_argument("--library", type=Path, required=True)
    c.add_argument("--id", dest="case_id", required=True)
    c.add_argument("--split", choices=SPLITS, required=True)
    _add_common(c)

    # bench ---------------------------------------------------------------------------------------
    p = sub.add_parser("bench", help="benchmarks that print tables")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH", parser_class=_Parser)
    bsub.required = True
    b = bsub.add_parser("train", help="tuning methods side by side: tuned params, step time, peak memory")
    b.add_argument("--arch", choices=ARCHS, default="vit_upernet")
    b.add_argument("--backbone", default=None)
    b.add_argument("--crop", type=_crop, default=(16, 128, 128))
    b.add_argument("--batch", type=_positive_int, default=2)
    b.add_argument("--in-channels", type=_positive_int, default=4)
    b.add_argument("--classes", type=_positive_int, default=4)
    b.add_argument("--methods", default="full,head,med_tuning,adapter,st_adapter",
                   help="comma-separated tuning methods")
    b.add_argument("--steps", type=_positive_int, default=5, help="timed steps per method (after warm-up)")
    b.add_argument("--warmup", type=_positive_int, default=2)
    b.add_argument("--repeats", type=_positive_int, default=1,
                   help="run every method N times, interleaved (A B C A B C ...), each in a fresh process; report "
                        "medians and the ratios' spread")
    b.add_argument("--device", choices=DEVICES, default="auto")
    b.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    _add_common(b)
    b = bsub.add_parser("infer", help="seconds per volume: plain fp32 against the tuned inference path")
    b.add_argument("--model", type=Path, default=None, help="model folder (default: build one from --arch)")
    b.add_argument("--arch", choices=ARCHS, default="vit_upernet")
    b.add_argument("--backbone", default=None)
    b.add_argument("--image", type=Path, action="append", default=None, help="real volume(s) to segment")
    b.add_argument("--label", type=Path, default=None, help="reference label for the Dice difference")
    b.add_argument("--size", type=_crop, default=None, help="synthetic volume size DxHxW when no --image")
    b.add_argument("--crop", type=_crop, default=(16, 128, 128))
    b.add_argument("--repeats", type=_positive_int, default=2)
    b.add_argument("--variant", action="append", default=None, metavar="SPEC",
                   help="time settings of the tuned path instead of plain vs tuned, each against the first, e.g. "
                        "--variant overlap=0.5 --variant \"overlap=0.25,0,0 precision=int8\" (keys: overlap, "
                        "precision, sw_batch, tta, threads)")
    b.add_argument("--device", choices=DEVICES, default="auto")
    b.add_argument("--json", type=Path, default=None)
    _add_common(b)

    b = bsub.add_parser("peers", help="MedTuning's segment against nnU-Net's and MONAI's networks on one volume "
                        "(s / volume, voxels / s, peak memory, one training step)")
    from MedTuningLib.bench.peers_bench import SYSTEMS, add_shared_options

    b.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated rows: " + ", ".join(SYSTEMS))
    add_shared_options(b)
    b.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    _add_common(b)

    # compare -------------------------------------------------------------------------------------
    p = sub.add_parser("compare", help="paper-style table from several model folders")
    p.add_argument("models", type=Path, nargs="+", metavar="MODEL_DIR")
    p.add_argument("--library", type=Path, default=None, help="evaluate the models on this library's test split")
    p.add_argument("--split", choices=LABELLED_SPLITS + ("all",), default="test")
    p.add_argument("--out", type=Path, default=None, help="folder for compare.md / compare.csv")
    p.add_argument("--force", action="store_true", help="replace an earlier comparison in --out")
    p.add_argument("--device", choices=DEVICES, default="auto")
    _add_common(p)

    # web -----------------------------------------------------------------------------------------
    p = sub.add_parser("web", help="the browser app: segment, correct, add cases and re-tune in a web page "
                       "(needs the web extra: pip install 'medtuning[web]')",
                       description="Serve MedTuning in a browser (3D Slicer's MRML scene, views and segment "
                       "editor through trame-slicer). One scene per server process: every browser tab sees "
                       "the same scans and results. Bound to a non-loopback address it requires an access token.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; another address needs a token)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--models", type=Path, default=None, help="model folders (default ~/.medtuning/models)")
    p.add_argument("--cases", type=Path, default=None, help="case library (default ~/.medtuning/cases)")
    p.add_argument("--scans", type=Path, default=None,
                   help="server folder whose scans the page may open (default: none, uploads only)")
    p.add_argument("--token", default=None,
                   help="access token the address must carry (?token=...); made and printed when the host is "
                        "not loopback and none is given")
    p.add_argument("--python", default=None, help="interpreter of the backend processes (default: this one)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="device of the backend runs")
    _add_common(p)
    return parser


def _command_module_name(args: argparse.Namespace) -> str:
    return {"cases": "cases", "bench": "bench"}.get(args.command, args.command)


def _make_output_streams_safe(events_mode: str) -> None:
    """The JSON-lines stream is UTF-8 whatever the locale (its readers decode UTF-8); human text
    keeps the terminal's encoding but never crashes on a character it cannot show (C/ASCII locales)."""
    for stream in (sys.stdout, sys.stderr):
        if not hasattr(stream, "reconfigure"):  # replaced by a test harness or an embedding host
            continue
        try:
            if events_mode == "jsonl" and stream is sys.stdout:
                stream.reconfigure(encoding="utf-8", errors="strict")
            else:
                stream.reconfigure(errors="backslashreplace")
        except (ValueError, OSError):  # a stream that has been written to cannot change encoding
            pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command; returns the exit status (0, 2, 3 or 130)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    events_mode = "jsonl" if _wants_jsonl(argv) else "text"
    _make_output_streams_safe(events_mode)
    rank = int(os.environ.get("RANK", "0"))
    events = EventStream(events_mode, enabled=(rank == 0))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        events.error("USAGE", str(exc), "run 'medtuning COMMAND --help' for the options")
        return EXIT_BAD_INPUT
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)

    ctx = CommandContext(events=events, command=args.command, argv=argv)
    ctx.cancel.install_signal_handlers()
    # 'cases' never polls for a cancel (issue 15: SIGINT during 'cases add' was ignored); its writes are
    # staged and atomic, so a signal may stop it wherever it is.
    ctx.cancel.immediate = args.command == "cases"
    try:
        module = importlib.import_module(f"MedTuningLib.commands.{_command_module_name(args)}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("MedTuningLib.commands"):
            events.error("NOT_IMPLEMENTED", f"'medtuning {args.command}' is not available in this build",
                         "update MedTuning; see the README for the commands this version has")
            return EXIT_FAILURE
        raise
    try:
        outputs = module.run(args, ctx)
        events.done("ok", outputs=outputs or {})
        return EXIT_OK
    except Cancelled as exc:
        events.log(f"cancelled ({exc}); the run's state is resumable", level="warning")
        events.done("cancelled", outputs=getattr(exc, "outputs", {}) or {})
        return EXIT_CANCELLED
    except MedTuningError as exc:
        events.error(**exc.to_event())
        return exc.exit_status
    except KeyboardInterrupt:
        events.done("cancelled")
        return EXIT_CANCELLED
    except Exception as exc:  # a bug: still an event with a code, never a bare traceback on stdout
        from MedTuningLib.fileio import os_failure

        # Disk full, permission, name too long where no command named it: still their code (issue 15).
        mapped = os_failure(exc, Path(getattr(exc, "filename", None) or "(unknown path)"), "output")
        if mapped is not None:
            events.error(**mapped.to_event())
            return mapped.exit_status
        traceback.print_exc(file=sys.stderr)
        events.error("INTERNAL_ERROR", f"{type(exc).__name__}: {exc}",
                     "this is a bug in MedTuning; please report it with the command and the log above")
        return EXIT_FAILURE
    finally:
        ctx.cancel.restore_signal_handlers()


def _wants_jsonl(argv: Sequence[str]) -> bool:
    for i, arg in enumerate(argv):
        if arg == "--events=jsonl" or (arg == "--events" and i + 1 < len(argv) and argv[i + 1] == "jsonl"):
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())
