"""The time budget of a training run (``--minutes``): how many epochs fit, planned from steady-state epochs.

The first epoch of a process is slow (allocator warm-up, lazy initialisation, first reads of the case cache):
planning from it alone under-plans (the demo planned 36 epochs from a slow first epoch and used 2 of its 7
minutes). Epochs that validate cost more than the others, so the two costs are estimated separately.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class EpochBudget:
    """Epoch timings of this process and the plan they give under ``budget_s`` seconds of training."""

    budget_s: float
    ceiling: int  # the user's --epochs: the plan never goes above it
    val_every: int = 1
    train_s: list[float] = field(default_factory=list)  # training part of each epoch run in this process
    val_s: list[float] = field(default_factory=list)  # each validation run in this process

    def record(self, train_seconds: float, val_seconds: float | None) -> None:
        self.train_s.append(train_seconds)
        if val_seconds is not None:
            self.val_s.append(val_seconds)

    def epoch_estimate(self) -> float:
        """Seconds per epoch in the steady state: median training part without the warm-up epoch, plus the
        validation cost spread over ``val_every`` epochs."""
        steady = self.train_s[1:] or self.train_s
        train = statistics.median(steady) if steady else 0.0
        validation = statistics.median(self.val_s[1:] or self.val_s) if self.val_s else 0.0
        return train + validation / max(1, self.val_every)

    def plan(self, epoch: int, elapsed_s: float) -> int:
        """Epochs to run in total, after ``epoch`` epochs and ``elapsed_s`` seconds spent (resumed time included).

        At least ``epoch`` (what is done stays done) and at most the ceiling. The last epoch always validates,
        so one validation is reserved."""
        per_epoch = max(self.epoch_estimate(), 1e-6)
        last_validation = statistics.median(self.val_s) if self.val_s else 0.0
        left = self.budget_s - elapsed_s - last_validation
        return max(epoch, min(self.ceiling, epoch + int(left // per_epoch)))


def adopt_plan(current: int, proposed: int, done: int) -> bool:
    """Whether a re-plan is worth taking: the learning-rate schedule stretches with the plan, so small
    wobbles of the estimate are ignored (a 5% band), while a real change is taken at once."""
    if proposed == current:
        return False
    return proposed <= done + 1 or abs(proposed - current) > max(1, 0.05 * current)
