"""``medtuning train --workers N``: crops prepared by N DataLoader worker processes (engine/train_data.py).

Every crop carries its own seed, so a run gives the same weights whatever --workers is, twice in a row, and
after a stop and ``--resume``; the worker processes really exist while the run trains and end with it.
"""

from __future__ import annotations

import numpy as np
import psutil
import torch
from safetensors.torch import load_file

from engine_helpers import TINY_TRAIN, make_blob_library


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_worker_processes_prepare_the_same_crops_as_the_main_process():
    from MedTuningLib.engine.train_data import CropSampler

    rng = np.random.default_rng(0)
    cases = [{"image": rng.normal(size=(1, 6, 20, 20)).astype(np.float32),
              "label": (rng.random((1, 6, 20, 20)) > 0.9).astype(np.uint8)} for _ in range(3)]

    def epoch_batches(workers: int, epoch: int, started: list[set[int]] | None = None) -> list:
        sampler = CropSampler(cases, (4, 8, 8), 2, workers=workers)
        before = _children()
        try:
            sampler.reseed(1000 + epoch)
            sampler.start_epoch(seed=7, epoch=epoch, rank=0, world=1, crops=6)
            batches = [sampler.batch(2) for _ in range(3)]
            if started is not None:
                started.append(_children() - before)
        finally:
            sampler.close()
        assert _children() - before == set(), "close() must end the worker processes"
        return batches

    started: list[set[int]] = []
    main = epoch_batches(0, 1, started)
    assert started == [set()]  # --workers 0: prepared in this process
    workers = epoch_batches(2, 1, started)
    assert len(started[1]) == 2  # two worker processes prepared them
    for (img_a, lab_a), (img_b, lab_b) in zip(main, workers):
        assert img_a.shape == (2, 1, 4, 8, 8) and img_a.dtype == torch.float32 and lab_a.dtype == torch.int64
        torch.testing.assert_close(img_a, img_b, rtol=0, atol=0)
        assert torch.equal(lab_a, lab_b)
    other = epoch_batches(2, 2)  # another epoch: other crops
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(workers, other))


def test_workers_give_the_same_weights_twice_and_after_a_resume(tmp_path, cli):
    """--workers 2: the same weights as --workers 0 (so the same twice), and a run stopped after its first epoch
    and resumed (still --workers 2) ends with them too."""
    library = make_blob_library(cli, tmp_path, n_train=2, n_test=0)
    common = ["--library", str(library), "--labels", "Blob=1", *TINY_TRAIN, "--epochs", "2", "--steps-per-epoch", "2",
              "--seed", "3"]
    from MedTuningLib.engine import train as train_module

    original = train_module.TrainingRun._save_state
    seen: dict[str, set[int]] = {}

    def save_and_look(stop: bool):
        def save(self, model, optimizer, state):
            original(self, model, optimizer, state)
            if state["epoch"] == 1:
                seen[self.out.name] = _children()  # the crop workers live while the run trains
                if stop:
                    (self.work / "STOP").write_text("", encoding="utf-8")
        return save

    def train(name: str, workers: str, *extra: str, stop: bool = False) -> tuple[int, list[dict]]:
        train_module.TrainingRun._save_state = save_and_look(stop)
        try:
            return cli(["train", "--out", str(tmp_path / name), *common, "--workers", workers, *extra])
        finally:
            train_module.TrainingRun._save_state = original

    before = _children()
    status, _ = train("main", "0")
    assert status == 0 and seen["main"] - before == set()
    status, events = train("workers", "2")
    assert status == 0, events[-2:]
    assert len(seen["workers"] - before) == 2
    status, events = train("resumed", "2", stop=True)
    assert status == 130 and events[-1]["status"] == "cancelled"
    (tmp_path / "resumed.partial" / "STOP").unlink()
    status, events = train("resumed", "2", "--resume")
    assert status == 0, events[-2:]
    assert _children() - before == set(), "the worker processes end with the run"

    reference = load_file(str(tmp_path / "main" / "weights.safetensors"))
    for name in ("workers", "resumed"):
        weights = load_file(str(tmp_path / name / "weights.safetensors"))
        assert weights.keys() == reference.keys()
        for key in reference:
            assert torch.equal(weights[key], reference[key]), (name, key)
