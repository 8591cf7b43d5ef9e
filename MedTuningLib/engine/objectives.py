"""Training objectives: the loss (``--loss``) and the learning-rate schedule (``--schedule``).

Losses are MONAI's, on logits (softmax inside the loss):

- ``dice_ce`` (project default): Dice + cross-entropy, background included, Dice averaged per sample;
- ``dice``: MONAI's plain Dice loss with the same reductions (background included, per sample);
- ``dice_fg_batch``: the official Med-Tuning loss (``utils/criterions.py: softmax_dice``): the sum over the
  foreground classes of ``1 - 2·Σ(p·t) / (Σp + Σt + 1e-5)``, sums taken over the whole batch.

Schedules (the learning rate of every optimiser step):

- ``cosine`` (project default): per step, linear warm-up, then cosine decay to zero;
- ``paper``: the official ``warm_up_learning_rate``, per epoch ``e`` (0-based), warm-up ``W`` epochs and
  ``E`` epochs in all: ``lr·(1 − cos(π/2·(e+1)/W))`` for ``e < W``, then ``lr·(cos(π(e − W)/E) + 1)/2``.
  The decay divides by all epochs, not by ``E − W``, so it ends near 2.6 % of ``lr`` (W = 25, E = 250).

Why the defaults differ from the official choices is written in ``docs/method.md``.
"""

from __future__ import annotations

import math

from MedTuningLib.errors import MedTuningError

LOSSES = ("dice_ce", "dice", "dice_fg_batch")
SCHEDULES = ("cosine", "paper")


def make_loss(name: str):
    """The MONAI loss called ``name`` (see the module docstring); inputs are logits and class-index labels."""
    from monai.losses import DiceCELoss, DiceLoss

    if name == "dice":
        return DiceLoss(to_onehot_y=True, softmax=True)
    if name == "dice_ce":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    if name == "dice_fg_batch":
        # Official softmax_dice: foreground classes only, batch-global sums, smooth only in the denominator,
        # the per-class losses summed (not averaged).
        return DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=0.0,
                        smooth_dr=1e-5, reduction="sum")
    raise MedTuningError("INVALID_OPTION", f"unknown loss {name!r}", f"use one of {', '.join(LOSSES)}")


def cosine_step_factor(step: int, total: int, warmup: int) -> float:
    """Project schedule: linear warm-up over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def paper_epoch_factor(epoch: int, warmup: int, total: int) -> float:
    """Official schedule at 0-based ``epoch`` (same for every step of the epoch)."""
    if epoch < warmup:
        return 1.0 - math.cos(math.pi / 2 * (epoch + 1) / warmup)
    return (math.cos(math.pi * (epoch - warmup) / total) + 1.0) / 2.0


def learning_rate(schedule: str, base_lr: float, epoch: int, step: int, steps_per_epoch: int, total_epochs: int,
                  warmup_epochs: int) -> float:
    """The learning rate of ``step`` (0-based, within the epoch) of ``epoch`` (1-based, as the training loop counts)."""
    if schedule == "paper":
        return base_lr * paper_epoch_factor(epoch - 1, warmup_epochs, total_epochs)
    if schedule == "cosine":
        global_step = (epoch - 1) * steps_per_epoch + step
        return base_lr * cosine_step_factor(global_step, total_epochs * steps_per_epoch,
                                            warmup_epochs * steps_per_epoch)
    raise MedTuningError("INVALID_OPTION", f"unknown schedule {schedule!r}", f"use one of {', '.join(SCHEDULES)}")
