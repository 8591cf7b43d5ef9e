"""--loss dice_fg_batch and --schedule paper against the official definitions, written out here
(github jessie-chen99/Med-Tuning-Official @82dea1e: utils/criterions.py, train_3D.py)."""

from __future__ import annotations

import math

import pytest
import torch

from engine_helpers import TINY_TRAIN, make_blob_library
from MedTuningLib.engine.objectives import learning_rate, make_loss, paper_epoch_factor


def official_softmax_dice(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """utils/criterions.py, with the official label 4 written as class 3 (our class indices)."""
    def dice(o, t, eps=1e-5):
        t = t.float()
        num = 2 * (o * t).sum()
        den = o.sum() + t.sum() + eps
        return 1.0 - num / den

    return dice(output[:, 1], target == 1) + dice(output[:, 2], target == 2) + dice(output[:, 3], target == 3)


def official_lr(init_lr: float, epoch: int, warm_epoch: int, max_epoch: int) -> float:
    """train_3D.py warm_up_learning_rate (0-based epoch)."""
    if epoch < warm_epoch:
        return init_lr * (1 - math.cos(math.pi / 2 * (epoch + 1) / warm_epoch))
    return init_lr * (math.cos(math.pi * (epoch - warm_epoch) / max_epoch) + 1) / 2


def test_dice_fg_batch_equals_the_official_softmax_dice():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, 6, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 1, 3, 5, 6))
    labels[1, 0, 0] = 0  # some class missing from one sample: batch-global sums still count it once
    ours = make_loss("dice_fg_batch")(logits, labels)
    official = official_softmax_dice(torch.softmax(logits, dim=1), labels[:, 0])
    assert float(ours) == pytest.approx(float(official), rel=1e-12, abs=1e-12)
    # A class absent from the whole batch and never predicted: 1 − 0/(0 + 1e-5) = 1 per class, as officially.
    empty = torch.zeros(1, 1, 2, 2, 2, dtype=torch.long)
    certain = torch.full((1, 4, 2, 2, 2), -50.0, dtype=torch.float64)
    certain[:, 0] = 50.0
    assert float(make_loss("dice_fg_batch")(certain, empty)) == pytest.approx(
        float(official_softmax_dice(torch.softmax(certain, 1), empty[:, 0])), abs=1e-9)
    # The project losses are not that formula (background in, per-sample mean): the README says so.
    assert abs(float(make_loss("dice")(logits, labels)) - float(official)) > 0.1


def test_paper_schedule_formula_every_epoch():
    warm, total, lr = 25, 250, 2e-3
    for e in range(total):
        assert paper_epoch_factor(e, warm, total) * lr == pytest.approx(official_lr(lr, e, warm, total), rel=1e-15)
        # Constant within an epoch (the official sets it before every batch with the epoch number).
        assert learning_rate("paper", lr, e + 1, 0, 7, total, warm) == learning_rate("paper", lr, e + 1, 6, 7, total,
                                                                                      warm)
    assert official_lr(lr, total - 1, warm, total) / lr == pytest.approx(0.0262, abs=5e-4)  # ends near 2.6 % of lr


def test_training_run_uses_the_paper_lr_at_every_epoch(tmp_path, cli):
    library = make_blob_library(cli, tmp_path, n_train=1, n_test=0)
    epochs, warm, lr = 5, 2, 2e-3
    status, events = cli(["train", "--library", str(library), "--out", str(tmp_path / "m"), "--labels", "Blob=1",
                          *TINY_TRAIN, "--epochs", str(epochs), "--steps-per-epoch", "1", "--warmup-epochs", str(warm),
                          "--schedule", "paper", "--lr", str(lr), "--val-every", "5"])
    assert status == 0, events[-1]
    seen = {e["epoch"]: e["value"] for e in events if e["event"] == "metric" and e["name"] == "lr"}
    assert sorted(seen) == list(range(1, epochs + 1))
    for epoch, value in seen.items():
        assert value == pytest.approx(official_lr(lr, epoch - 1, warm, epochs), rel=1e-12), epoch


def test_docs_and_recipe_agree():
    """docs/method.md has a row for every point of the recipe and of the paper protocol."""
    from pathlib import Path

    from MedTuningLib.engine.recipe import PAPER_EVAL, PAPER_TRAIN, steps_per_epoch

    text = (Path(__file__).resolve().parents[1] / "docs" / "method.md").read_text(encoding="utf-8")
    for choice in PAPER_TRAIN:
        assert f"| `{choice.option}`" in text, choice.option
    for words in ("8 flips", "stride `int(crop/3)`", "uniform averaging", "softmax of each flip", "ET < 500 voxels",
                  "HD95 of a region absent from both", "### KiTS"):
        assert words in text, words
    assert len(PAPER_EVAL) == 7
    # One GPU with --accumulate 8 takes as many steps per epoch as 8 GPUs with batch 2 (335 BraTS cases).
    assert steps_per_epoch(335, 2 * 8, 1, 1) == steps_per_epoch(335, 2, 8, 1) == 21
