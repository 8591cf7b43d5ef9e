"""``--recipe paper`` (train) and ``--protocol paper`` (segment / evaluate): the official Med-Tuning
protocol, point by point, as data.

Every choice names the option it sets, its value under the recipe, what the official code does (github
jessie-chen99/Med-Tuning-Official @82dea1e, BraTS only) and why the project default differs. The recipe
sets an option only where the command line did not: ``--recipe paper --epochs 2`` is the recipe with two
epochs, and the model folder records the recipe and every option that overrode it. docs/method.md renders
the same facts as a table (a test keeps the two in step).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from MedTuningLib.engine.windows import DEFAULT_OVERLAP, Overlap, describe_overlap

# Official slide_window: stride int(128 / 3) = 42 for 128-voxel windows, uniform averaging.
PAPER_WINDOW_FRACTION = 1.0 / 3.0
# Official postprocess (utils/predict_fold_3D.py): an enhancing tumour of fewer voxels becomes necrosis.
PAPER_ET_MIN_VOXELS = 500


@dataclass(frozen=True)
class Choice:
    """One point of the recipe."""

    dest: str                 # the parsed argument it sets (argparse dest)
    option: str               # how a user writes it
    value: Any                # the value under the recipe; a callable gets the parsed arguments
    official: str             # what the official code does (and where)
    project: str              # the project default and why it differs
    applies: Callable[[argparse.Namespace], bool] | None = None  # None: every architecture
    merge: bool = False       # applied over an explicit value too (the value function keeps what was given)

    def value_for(self, args: argparse.Namespace) -> Any:
        return self.value(args) if callable(self.value) else self.value


def _is_vit(args: argparse.Namespace) -> bool:
    return str(getattr(args, "arch", None) or "vit_upernet").startswith("vit")


def _is_swin_unet(args: argparse.Namespace) -> bool:
    return getattr(args, "arch", None) == "swin_unet"


def _swin_drop_path(args: argparse.Namespace) -> str:
    text = getattr(args, "backbone_args", None) or ""
    if "drop_path_rate" in text:
        return text
    return ",".join(p for p in (text, "drop_path_rate=0.1") if p)


PAPER_TRAIN: tuple[Choice, ...] = (
    Choice("crop", "--crop 128x128x128", (128, 128, 128),
           "random 128³ crops (data/BraTS.py Random_Crop; config TRAIN.input_size)",
           "16×128×128: a 128-slice crop of ViT-B needs a large GPU; the FFT branch then mixes 16 slices"),
    Choice("batch", "--batch 2", 2, "batch 2 per GPU on 8 GPUs = 16 (train_3D.sh)",
           "2 per process as well; a single GPU reaches 16 with --accumulate 8"),
    Choice("epochs", "--epochs 250", 250, "250 epochs (train_3D.sh --end_epoch)",
           "50: user libraries are small and tuned on one GPU or a CPU"),
    Choice("warmup_epochs", "--warmup-epochs 25", 25, "25 warm-up epochs (train_3D.sh --warmup_epoch)",
           "min(5, epochs // 10)"),
    Choice("lr", "--lr 2e-3", 2e-3, "Adam (amsgrad) lr 2e-3 (train_3D.sh)", "the same"),
    Choice("weight_decay", "--weight-decay 1e-5", 1e-5, "weight decay 1e-5", "the same"),
    Choice("loss", "--loss dice_fg_batch", "dice_fg_batch",
           "softmax_dice (utils/criterions.py): Σ over the 3 foreground classes of 1 − Dice, batch-global sums",
           "dice_ce: Dice + cross-entropy with background is steadier on small user libraries"),
    Choice("schedule", "--schedule paper", "paper",
           "per epoch: warm-up lr·(1 − cos(π/2·(e+1)/W)), then lr·(cos(π(e − W)/E) + 1)/2 (train_3D.py)",
           "cosine: per step, linear warm-up, cosine to 0 (no end at 2.6 % of lr, smooth within an epoch)"),
    Choice("epoch_passes", "--epoch-passes 1", 1,
           "an epoch is one pass over the training cases (DistributedSampler, drop_last)",
           "2 crops per case per epoch: small libraries get useful epochs"),
    Choice("case_order", "--case-order shuffle", "shuffle",
           "DistributedSampler(shuffle=True): every case once per epoch, a fresh order per epoch split among GPUs",
           "random: each crop's case drawn at random (any number of processes, resumable mid-run)"),
    Choice("crop_sampling", "--crop-sampling uniform", "uniform", "every crop position equally likely",
           "foreground: crops centred on foreground 2 : 1, so small tumours in small crops are seen"),
    Choice("intensity_aug", "--intensity-aug per_column", "per_column",
           "scale U(0.9, 1.1) and shift U(−0.1, 0.1) drawn per (W column, channel) (Random_intencity_shift)",
           "global: one scale and one shift per crop (MONAI RandScaleIntensityd / RandShiftIntensityd)"),
    Choice("base_init", "--base-init official", "official",
           "ViT: position embedding random; Swin: tensors of another shape random (4-channel patch embedding, "
           "every relative-position table), decoder blocks from the encoder stages (load_from)",
           "project: ViT position embedding resampled, patch embedding adapted, tables resized, decoder random"),
    Choice("select", "--select last", "last", "the last epoch's model (model_epoch_last.pth)",
           "best: the epoch with the best validation Dice"),
    Choice("sync_batchnorm", "--sync-batchnorm", True,
           "nn.SyncBatchNorm.convert_sync_batchnorm under DDP (train_3D.py)",
           "per-process BatchNorm; on CPU (gloo) torch has no SyncBatchNorm: plain BatchNorm, said in the log"),
    Choice("precision", "--precision fp32", "fp32", "fp32 (no autocast)",
           "auto: bf16 autocast where the device has it (same Dice, half the memory)"),
    Choice("norm_eps", "--norm-eps 1e-5", 1e-5, "ViT blocks' and final LayerNorm: nn.LayerNorm, eps 1e-5",
           "timm's 1e-6 (what the pretrained weights were trained with)", applies=_is_vit),
    Choice("decoder_init", "--decoder-init trunc_normal", "trunc_normal",
           "Swin-UNet _init_weights: Linear truncated-normal std 0.02, bias 0; LayerNorm 1, 0",
           "PyTorch's default initialisation", applies=_is_swin_unet),
    Choice("backbone_args", "--backbone-args drop_path_rate=0.1", _swin_drop_path,
           "Swin encoder stochastic depth 0.1 (config DROP_PATH_RATE), also in the frozen blocks",
           "timm's 0 in the frozen encoder", applies=_is_swin_unet, merge=True),
    Choice("val_every", "--val-every 10", 10, "no validation during training",
           "every epoch (it picks the best epoch); under --select last validation only draws curves"),
)

PAPER_EVAL: tuple[Choice, ...] = (
    Choice("tta", "--tta", True, "8-flip test-time augmentation, on by default (test_fold_3D.py --use_TTA)",
           "off: 8 times faster; --tta turns it on"),
    Choice("overlap", "(window stride int(crop / 3))", "paper",
           "128³ windows at stride 42 (utils/slide_test_3D.py), last window flush with the edge",
           "overlap 0.25: fewer windows (chosen by measurement, README \"Choosing the inference settings\")"),
    Choice("blend", "(uniform averaging)", "constant", "every window weighs the same (count_norm)",
           "gaussian: window centres weigh more, fewer seams"),
    Choice("flip_softmax", "(softmax of each flip's probabilities)", True,
           "F.softmax over slide_window's averaged probabilities (the network already ends in a softmax)",
           "probabilities averaged as they are"),
    Choice("et_min_voxels", "(ET < 500 voxels -> necrosis)", PAPER_ET_MIN_VOXELS,
           "postprocess, on by default: fewer than 500 predicted ET voxels (in all) become NCR/NET",
           "no rule: a small enhancing tumour is reported as found"),
    Choice("hd95_empty", "(HD95 of a region absent from both: left out)", None,
           "hd95 NaN when either mask is empty, left out of the mean",
           "0 mm when the region is absent from both reference and prediction (a correct 'no tumour')"),
    Choice("precision", "--precision fp32", "fp32", "fp32", "auto: bf16 where the device has it"),
)


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The argparse dests that ``argv`` sets explicitly (parsed again with every default suppressed)."""
    import copy

    quiet = copy.deepcopy(parser)
    stack = [quiet]
    while stack:
        p = stack.pop()
        for action in p._actions:
            if action.dest != "help":
                action.default = argparse.SUPPRESS
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
    return set(vars(quiet.parse_args(list(argv))))


def apply_recipe(args: argparse.Namespace, explicit: set[str], choices: Sequence[Choice] = PAPER_TRAIN
                 ) -> dict[str, Any]:
    """Set every recipe choice on ``args`` that the command line left unset; returns the record for the
    model folder: ``{"name": "paper", "settings": {...}, "overridden": {dest: value given}}``."""
    settings: dict[str, Any] = {}
    overridden: dict[str, Any] = {}
    for choice in choices:
        if choice.applies is not None and not choice.applies(args):
            continue
        if choice.dest in explicit and not choice.merge:
            overridden[choice.dest] = _jsonable(getattr(args, choice.dest, None))
            continue
        value = choice.value_for(args)
        setattr(args, choice.dest, value)
        settings[choice.dest] = _jsonable(value)
    return {"name": "paper", "settings": settings, "overridden": overridden}


def describe_recipe(record: dict[str, Any]) -> str:
    """One log line: what the recipe set and what the command line overrode."""
    text = f"recipe {record.get('name')}: " + ", ".join(f"{k}={v}" for k, v in record.get("settings", {}).items())
    if record.get("overridden"):
        text += "; given explicitly: " + ", ".join(f"{k}={v}" for k, v in record["overridden"].items())
    return text


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# -- training pieces ----------------------------------------------------------------------------------

def init_decoder_trunc_normal(model: nn.Module) -> int:
    """Official Swin-UNet ``_init_weights`` on the decoder: Linear weights truncated-normal (std 0.02) and
    zero bias, LayerNorm weight 1 and bias 0. Returns the number of Linear layers set."""
    count = 0
    for module in model.decoder.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            count += 1
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return count


def use_sync_batchnorm(model: nn.Module, device: torch.device, world: int,
                       log: Callable[..., None] | None = None) -> tuple[nn.Module, str]:
    """Convert BatchNorm to SyncBatchNorm for a data-parallel run on GPUs (the official choice).

    torch's SyncBatchNorm only runs on GPU-like devices (its forward raises ``ValueError`` for CPU tensors
    under an initialised process group), so a CPU run under torchrun (gloo) keeps per-process BatchNorm and
    says so. Returns the model and what was used, for the model folder.
    """
    if world <= 1:
        return model, "BatchNorm (one process: nothing to synchronise)"
    if device.type != "cuda":
        if log is not None:
            log("--sync-batchnorm: torch's SyncBatchNorm needs GPU tensors; this CPU run keeps per-process "
                "BatchNorm (statistics of each process's own crops)", level="warning")
        return model, "BatchNorm (SyncBatchNorm unavailable on CPU)"
    return nn.SyncBatchNorm.convert_sync_batchnorm(model), "SyncBatchNorm"


def steps_per_epoch(cases: int, batch: int, world: int, passes: int) -> int:
    """Optimiser steps per epoch: ``passes`` crops per training case, shared out among the processes."""
    return max(1, -(-cases * passes // (batch * world)))


# -- evaluation pieces --------------------------------------------------------------------------------

@dataclass(frozen=True)
class InferenceProtocol:
    """How volumes are windowed, blended and post-processed (``--protocol``)."""

    name: str = "project"
    overlap: float | tuple[float, ...] = DEFAULT_OVERLAP
    blend: str = "gaussian"         # MONAI sliding_window_inference mode
    tta: bool = False
    flip_softmax: bool = False      # official: softmax again over each flip's window-averaged probabilities
    et_min_voxels: int = 0          # official 500: a smaller predicted enhancing tumour becomes necrosis
    hd95_both_empty: float | None = 0.0  # official: left out (None)

    def describe(self) -> str:
        if self.name == "paper":
            return ("paper protocol: windows at stride int(crop/3) (42 for 128), uniform averaging, "
                    f"{'8-flip TTA' if self.tta else 'no TTA'}, ET < {self.et_min_voxels} voxels -> NCR/NET")
        return f"windows at overlap {describe_overlap(self.overlap)}, {self.blend} blending, {'flip TTA' if self.tta else 'no TTA'}"


def paper_overlap(crop: Sequence[int]) -> tuple[float, ...]:
    """Per-axis overlaps that make MONAI's scan interval ``int(roi·(1 − overlap))`` equal the official stride
    ``int(roi / 3)`` (42 for 128): half a voxel above the stride keeps float rounding from dropping a voxel."""
    result = []
    for roi in crop:
        stride = max(1, int(roi * PAPER_WINDOW_FRACTION))
        result.append(1.0 - (stride + 0.5) / roi)
    return tuple(result)


def inference_protocol(name: str, crop: Sequence[int], tta: bool = False,
                       overlap: Overlap = DEFAULT_OVERLAP) -> InferenceProtocol:
    """The protocol called ``name`` for a model trained with ``crop``; ``tta`` / ``overlap``: the project's."""
    if name == "paper":
        return InferenceProtocol(name="paper", overlap=paper_overlap(crop), blend="constant", tta=True,
                                 flip_softmax=True, et_min_voxels=PAPER_ET_MIN_VOXELS, hd95_both_empty=None)
    return InferenceProtocol(name="project", overlap=overlap, tta=tta)


def relabel_small_enhancing(scheme, class_map: np.ndarray, min_voxels: int) -> tuple[np.ndarray, bool]:
    """Official BraTS post-processing: if fewer than ``min_voxels`` voxels (in all, not per component) are
    predicted enhancing tumour, they become necrotic / non-enhancing core. Schemes without both classes
    (KiTS, custom) are returned unchanged. Returns the class map and whether it changed."""
    if min_voxels <= 0:
        return class_map, False
    et, ncr = scheme.class_index("ET"), scheme.class_index("NCR/NET")
    if et is None or ncr is None:
        return class_map, False
    mask = class_map == et
    count = int(mask.sum())
    if count == 0 or count >= min_voxels:
        return class_map, False
    out = class_map.copy()
    out[mask] = ncr
    return out, True


def apply_train_options(opts: Any, args: argparse.Namespace, recipe: dict | None) -> None:
    """Copy the options of the official choices from the parsed arguments into ``TrainOptions``."""
    for name, default in (("schedule", "cosine"), ("epoch_passes", 2), ("case_order", "random"),
                          ("crop_sampling", "foreground"),
                          ("intensity_aug", "global"), ("base_init", "project"), ("select", "best"),
                          ("sync_batchnorm", False), ("norm_eps", None), ("decoder_init", "default")):
        setattr(opts, name, getattr(args, name, default))
    opts.recipe = recipe


def inference_options(args: argparse.Namespace, argv: Sequence[str], device_type: str) -> str | None:
    """The settings ``--protocol paper`` and ``--fast`` imply on segment / evaluate, where the command line does
    not give them itself. Changes ``args`` in place; returns what ``--fast`` set, for the log.

    ``--protocol paper``: fp32 unless ``--precision`` is given; ``--overlap`` is refused (the protocol fixes the
    windows). ``--fast``: no window overlap and, on a CPU, int8 Linear layers (engine/windows.py), unless
    ``--overlap`` / ``--precision`` are given; refused with ``--protocol paper``."""
    from MedTuningLib.engine.windows import FAST_CPU_PRECISION, FAST_OVERLAP
    from MedTuningLib.errors import MedTuningError

    paper = getattr(args, "protocol", "project") == "paper"
    fast = getattr(args, "fast", False)
    if not paper and not fast:
        return None
    explicit: set[str] = set()
    if argv:
        from MedTuningLib.cli import build_parser

        explicit = explicit_dests(build_parser(), argv)
    if paper:
        if "overlap" in explicit:
            raise MedTuningError("INVALID_OPTION", "--overlap cannot be combined with --protocol paper, which fixes "
                                 "the windows (stride crop/3, uniform averaging)",
                                 "drop --overlap, or use --protocol project with your own --overlap")
        if fast:
            raise MedTuningError("INVALID_OPTION", "--fast cannot be combined with --protocol paper, which fixes "
                                 "the windows, the precision and the flips", "drop one of them")
        if "precision" not in explicit:
            args.precision = "fp32"
        return None
    if "overlap" not in explicit:
        args.overlap = FAST_OVERLAP
    if "precision" not in explicit and device_type == "cpu":
        args.precision = FAST_CPU_PRECISION
    return f"fast settings: window overlap {describe_overlap(args.overlap)}, precision {args.precision}"


def protocol_for(args: argparse.Namespace, crop: Sequence[int]) -> InferenceProtocol | None:
    """The paper protocol for a loaded model's crop when ``--protocol paper`` was given, else None."""
    if getattr(args, "protocol", "project") != "paper":
        return None
    return inference_protocol("paper", crop)
