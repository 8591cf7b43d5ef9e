"""The epoch loop of a training run: seeds, learning rate, cancellation, validation cadence, time budget.

The loop owns *when* things happen; the run (engine/train.py) supplies *what* happens through
:class:`EpochHooks`: the optimiser step, metrics (events and curves), validation with the best-epoch
checkpoint, and the end-of-epoch files (curves and resume state). Decisions that every rank must share
(cancel, the planned epochs, stopping on the budget) are agreed through :class:`~.distributed.Distributed`.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np

from MedTuningLib.cancel import CancelToken
from MedTuningLib.engine.budget import EpochBudget, adopt_plan
from MedTuningLib.engine.distributed import Distributed, seed_everything
from MedTuningLib.engine.objectives import learning_rate
from MedTuningLib.engine.train_options import TrainOptions
from MedTuningLib.errors import Cancelled
from MedTuningLib.events import EventStream


class EpochHooks(Protocol):
    def start_epoch(self, epoch: int, seed: int, crops_per_rank: int) -> None:
        """Before the epoch's first step: ``seed`` is the epoch's derived seed (generators already reseeded)."""

    def train_step(self, lr: float) -> float:
        """One optimiser step at learning rate ``lr``; returns its loss."""

    def metric(self, phase: str, epoch: int, name: str, value: float) -> None:
        """A metric for the events and the curves."""

    def validate(self, epoch: int) -> None:
        """Validate after ``epoch`` (main rank only), keeping the best epoch's weights."""

    def end_epoch(self, epoch: int) -> None:
        """After ``epoch`` on the main rank: curves and the resume state (with the loop's planned epochs)."""


def warmup_epochs_for(opts: TrainOptions, total_epochs: int) -> int:
    """``--warmup-epochs``, or by default a tenth of the epochs, at most 5."""
    return opts.warmup_epochs if opts.warmup_epochs is not None else min(5, max(0, total_epochs // 10))


class TrainingLoop:
    """Epochs ``start_epoch + 1 .. total_epochs``, re-planned under ``--minutes`` (engine/budget.py)."""

    def __init__(self, opts: TrainOptions, dist: Distributed, events: EventStream, cancel: CancelToken,
                 hooks: EpochHooks, steps_per_epoch: int, start_epoch: int, total_epochs: int,
                 elapsed_before: float, t_start: float) -> None:
        self.opts, self.dist, self.events, self.cancel, self.hooks = opts, dist, events, cancel, hooks
        self.steps_per_epoch = steps_per_epoch
        self.start_epoch = start_epoch
        self.total_epochs = total_epochs
        self.elapsed_before = elapsed_before  # seconds spent before a resume
        self.t_start = t_start
        self.warmup_epochs = warmup_epochs_for(opts, total_epochs)
        self.budget = EpochBudget(opts.minutes * 60, opts.epochs, opts.val_every) if opts.minutes is not None else None

    def elapsed(self) -> float:
        """Seconds of this run so far, resumed time included."""
        return self.elapsed_before + time.monotonic() - self.t_start

    def run(self) -> int:
        """Train to the end (or the budget); returns the last epoch done. Raises Cancelled on a cancel request."""
        opts, dist = self.opts, self.dist
        epoch = self.start_epoch
        while epoch < self.total_epochs:
            epoch += 1
            t_epoch = time.monotonic()
            derived = seed_everything(opts.seed, epoch, dist.rank)
            self.hooks.start_epoch(epoch, derived, self.steps_per_epoch * opts.accumulate * opts.batch)
            self._train_epoch(epoch)
            t_trained, validated = time.monotonic(), False
            if dist.main and (epoch % opts.val_every == 0 or epoch == self.total_epochs):
                validated = True
                self.hooks.validate(epoch)
            epoch_seconds = time.monotonic() - t_epoch
            if self.budget is not None:
                # Re-planned after every epoch from steady-state epoch times (engine/budget.py), up to --epochs.
                self.budget.record(t_trained - t_epoch, time.monotonic() - t_trained if validated else None)
                proposed = dist.smallest(self.budget.plan(epoch, self.elapsed()))
                if adopt_plan(self.total_epochs, proposed, epoch):
                    self.total_epochs = proposed
                    self.events.log(f"time budget {opts.minutes} min: planning {self.total_epochs} epochs "
                                    f"({self.budget.epoch_estimate():.1f} s each in the steady state)")
            if dist.main:
                self.hooks.end_epoch(epoch)
            dist.barrier()
            over_budget = opts.minutes is not None and self.elapsed() + epoch_seconds > opts.minutes * 60
            if dist.any(over_budget) and epoch < self.total_epochs:
                self.events.log(f"time budget of {opts.minutes} min reached after epoch {epoch}")
                self.total_epochs = epoch
        return epoch

    def _train_epoch(self, epoch: int) -> None:
        opts, steps = self.opts, self.steps_per_epoch
        losses = []
        lr = opts.lr
        for step in range(steps):
            if self.dist.any(self.cancel.requested):
                raise Cancelled(self.cancel.reason or "cancel requested on another rank")
            global_step = (epoch - 1) * steps + step
            total_steps = self.total_epochs * steps
            lr = learning_rate(opts.schedule, opts.lr, epoch, step, steps, self.total_epochs, self.warmup_epochs)
            loss_value = self.hooks.train_step(lr)
            losses.append(loss_value)
            done_steps = global_step + 1 - self.start_epoch * steps
            rate = (time.monotonic() - self.t_start) / max(1, done_steps)
            self.events.progress("train", global_step + 1, total_steps, epoch=epoch, epochs=self.total_epochs,
                                 eta_s=round(rate * (total_steps - global_step - 1), 1), loss=loss_value)
        self.hooks.metric("train", epoch, "loss", float(np.mean(losses)))
        self.hooks.metric("train", epoch, "lr", lr)
