"""Sliding-window settings shared by ``segment``, ``evaluate``, ``suggest`` and the benches, without
importing PyTorch (the command line parses them before any model is loaded)."""

from __future__ import annotations

import math
from typing import Sequence, Union

from MedTuningLib.errors import MedTuningError

Overlap = Union[float, tuple[float, float, float]]

# Overlap of neighbouring windows (every axis) for segment / evaluate. Chosen by measurement with
# ``medtuning bench infer --variant overlap=...`` (README, "Choosing the inference settings"): on the abdominal
# CT, 0.25 took about half the windows of 0.5 (84 against 167 forward calls) at no loss of Dice (+3.7 points
# there); 0.25 is also MONAI's default. No overlap at all is the fastest (``--overlap 0``, 38 calls, +2.1).
DEFAULT_OVERLAP: Overlap = 0.25

# ``--fast`` of segment / evaluate: the quickest settings measured (README, "Choosing the inference settings"):
# windows that do not overlap and, on a CPU, int8 Linear layers. On the clinical-grid CT (ViT-B/16, 1.5 mm) that
# took 101 s against 431 s at the defaults; on the abdominal CT's model overlap 0 cost 1.5 Dice points against
# 0.25, int8 another 0.1 or less. An explicit --overlap or --precision wins over it.
FAST_OVERLAP: Overlap = 0.0
FAST_CPU_PRECISION = "int8"

# ``--precision`` of the inference commands: the training precisions and int8 (dynamically quantized Linear
# layers on the CPU, engine/infer.int8_linear_copy).
TRAIN_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
INFERENCE_PRECISIONS = TRAIN_PRECISIONS + ("int8",)


def parse_overlap(text: str) -> Overlap:
    """``--overlap``: one fraction for every axis (``0.5``) or one per window axis ``D,H,W`` (``0.25,0,0``),
    each at least 0 and below 1."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 3) or not all(math.isfinite(v) and 0 <= v < 1 for v in values):
        raise MedTuningError("INVALID_OPTION", f"--overlap {text!r} is not an overlap",
                             "give one fraction from 0 to below 1 (0.5), or one per window axis D,H,W (0.25,0,0)")
    return values[0] if len(values) == 1 else (values[0], values[1], values[2])


def overlap_argument(text: str) -> Overlap:
    """:func:`parse_overlap` as an argparse ``type`` (a bad value is a usage error with the hint)."""
    import argparse

    try:
        return parse_overlap(text)
    except MedTuningError as error:
        raise argparse.ArgumentTypeError(error.hint) from error


def describe_overlap(overlap: float | Sequence[float]) -> str:
    """``0.5`` or ``0.25,0,0`` (D, H, W), as ``--overlap`` takes it."""
    if isinstance(overlap, (int, float)):
        return f"{overlap:g}"
    return ",".join(f"{v:g}" for v in overlap)


def windows_per_volume(shape: Sequence[int], window: Sequence[int], overlap: Overlap) -> int:
    """How many windows MONAI's sliding window places on a volume of ``shape`` (its scan-interval rule; a
    volume smaller than the window along an axis is padded up to one window there)."""
    total = 1
    overlaps = [overlap] * len(window) if isinstance(overlap, (int, float)) else list(overlap)
    for size, roi, axis_overlap in zip(shape, window, overlaps):
        if size <= roi:
            continue
        interval = max(1, int(roi * (1 - axis_overlap)))
        total *= math.ceil((size - roi) / interval) + 1
    return total
