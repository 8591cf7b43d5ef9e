"""Training, segmentation and evaluation through the CLI, on small real NRRD cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import slicerio
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from engine_helpers import TINY_TRAIN, make_blob_library, write_blob_case


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny model trained on a blob library, shared by the tests of this module."""
    from conftest import run_cli

    root = tmp_path_factory.mktemp("engine")
    library = make_blob_library(run_cli, root)
    model = root / "model"
    status, events = run_cli(["train", "--library", str(library), "--out", str(model), "--labels", "Blob=1",
                              *TINY_TRAIN, "--epochs", "6", "--steps-per-epoch", "4", "--lr", "3e-3", "--seed", "1"])
    assert status == 0, events[-3:]
    return root, library, model, events


def test_train_writes_a_complete_model_folder(trained):
    root, _, model, events = trained
    assert (model / "medtuning.json").is_file() and (model / "weights.safetensors").is_file()
    assert not model.with_name("model.partial").exists()
    assert not any(p.name.startswith("state") for p in model.iterdir()), "resume state must not stay in the model"
    manifest = json.loads((model / "medtuning.json").read_text(encoding="utf-8"))
    assert manifest["pretrained"] is False and manifest["base_weights"]["source"] == "none"
    assert manifest["stored"] == "full"  # a random base is not reproducible: the whole model is stored
    assert manifest["modalities"] == ["MR"]
    assert [s["name"] for s in manifest["label_scheme"]["segments"]] == ["Blob"]
    assert manifest["training"]["epochs"] == 6
    # Events: JSON lines with the contract's kinds, a start first and a done last.
    assert events[0]["event"] == "start" and events[-1]["event"] == "done" and events[-1]["status"] == "ok"
    kinds = {e["event"] for e in events}
    assert {"progress", "metric", "checkpoint"} <= kinds
    losses = [e["value"] for e in events if e["event"] == "metric" and e["name"] == "loss"]
    assert len(losses) == 6 and losses[-1] < losses[0], losses


def test_curves_csv_and_png_match_the_final_events(trained):
    _, _, model, events = trained
    csv_lines = (model / "curves.csv").read_text(encoding="utf-8").strip().splitlines()
    header, last = csv_lines[0].split(","), csv_lines[-1].split(",")
    row = dict(zip(header, last))
    final_loss = [e for e in events if e["event"] == "metric" and e["name"] == "loss"][-1]
    assert float(row["train/loss"]) == pytest.approx(final_loss["value"], rel=1e-9)
    final_dice = [e for e in events if e["event"] == "metric" and e["name"] == "dice/Blob" and e["phase"] == "validate"][-1]
    assert float(row["validate/dice/Blob"]) == pytest.approx(final_dice["value"], rel=1e-9)
    assert (model / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_segment_writes_a_slicer_segmentation_on_the_input_grid(trained, cli):
    root, _, model, _ = trained
    image, _ = write_blob_case(root / "new", "unseen", seed=11, centre=(4, 22, 18))
    out = root / "result dir é" / "unseen.seg.nrrd"
    status, events = cli(["segment", "--model", str(model), "--image", str(image), "--out", str(out),
                          "--labelmap", str(root / "unseen-labels.nii.gz"), "--device", "cpu"])
    assert status == 0, events[-2:]
    seg = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in seg["segments"]] == ["Blob"]
    reference = sitk.ReadImage(str(image))
    ijk = np.array(seg["ijkToLPS"])
    np.testing.assert_allclose(ijk[:3, 3], reference.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ijk[:3, :3], axis=0), reference.GetSpacing(), atol=1e-6)
    assert seg["voxels"].shape == reference.GetSize()
    labelmap = sitk.ReadImage(str(root / "unseen-labels.nii.gz"))
    assert labelmap.GetSize() == reference.GetSize()
    # Refuses to overwrite without --force, and leaves the first result untouched.
    before = out.read_bytes()
    status, events = cli(["segment", "--model", str(model), "--image", str(image), "--out", str(out)])
    assert status == 2 and events[-1]["code"] == "OUTPUT_EXISTS" and out.read_bytes() == before


def test_segment_checks_modalities_and_model(trained, cli, tmp_path):
    root, _, model, _ = trained
    image, _ = write_blob_case(tmp_path, "x", seed=3)
    status, events = cli(["segment", "--model", str(model), "--image", str(image), "--image", str(image),
                          "--out", str(tmp_path / "r.seg.nrrd")])
    assert status == 2 and events[-1]["code"] == "MODALITY_COUNT_MISMATCH"
    assert not (tmp_path / "r.seg.nrrd").exists()
    status, events = cli(["segment", "--model", str(tmp_path), "--image", str(image), "--out", str(tmp_path / "r.seg.nrrd")])
    assert status == 2 and events[-1]["code"] == "MODEL_FOLDER_INVALID"


def test_evaluate_reports_dice_and_hd95(trained, cli):
    root, library, model, _ = trained
    report_dir = root / "report"
    status, events = cli(["evaluate", "--model", str(model), "--library", str(library), "--split", "test",
                          "--report", str(report_dir), "--device", "cpu"])
    assert status == 0, events[-2:]
    report = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
    assert report["regions"] == ["Blob"] and len(report["cases"]) == 1
    dice = report["summary"]["dice/Blob"]["mean"]
    assert 0.5 < dice <= 1.0, dice  # a bright blob is learnt in a few steps
    assert report["summary"]["hd95/Blob"]["mean"] is not None
    assert "| case1" not in (report_dir / "report.md").read_text(encoding="utf-8")  # only test cases are scored
    assert "case2" in (report_dir / "report.md").read_text(encoding="utf-8")
    html = (report_dir / "report.html").read_text(encoding="utf-8")
    assert "images/" in html and any((report_dir / "images").iterdir())
    before = (report_dir / "report.json").read_bytes()
    status, events = cli(["evaluate", "--model", str(model), "--library", str(library), "--report", str(report_dir)])
    assert status == 2 and events[-1]["code"] == "OUTPUT_EXISTS"  # an earlier report is not replaced silently
    assert (report_dir / "report.json").read_bytes() == before


def test_warm_start_from_a_model_folder(trained, cli):
    root, library, model, _ = trained
    out = root / "retuned"
    status, events = cli(["train", "--library", str(library), "--out", str(out), "--labels", "Blob=1", *TINY_TRAIN,
                          "--epochs", "1", "--steps-per-epoch", "1", "--init-from", str(model)])
    assert status == 0, events[-2:]
    manifest = json.loads((out / "medtuning.json").read_text(encoding="utf-8"))
    assert manifest["training"]["init_from"] == str(model)
    first = [e for e in events if e["event"] == "metric" and e["name"] == "dice/Blob"][0]["value"]
    assert first > 0.3  # starts from the tuned model, not from scratch


def test_output_exists_and_missing_resume(trained, cli):
    root, library, model, _ = trained
    status, events = cli(["train", "--library", str(library), "--out", str(model), "--labels", "Blob=1", *TINY_TRAIN])
    assert status == 2 and events[-1]["code"] == "OUTPUT_EXISTS"
    status, events = cli(["train", "--library", str(library), "--out", str(root / "nothing"), "--labels", "Blob=1",
                          *TINY_TRAIN, "--resume"])
    assert status == 2 and events[-1]["code"] == "RESUME_STATE_MISSING"


def test_stop_file_cancels_and_resume_finishes_identically(tmp_path, cli):
    """A run cancelled by a STOP file exits 130, leaves no finished model, and resumes to the same weights."""
    library = make_blob_library(cli, tmp_path, n_train=2, n_test=0)
    common = ["--library", str(library), "--labels", "Blob=1", *TINY_TRAIN, "--epochs", "3", "--steps-per-epoch", "2",
              "--seed", "5"]
    status, _ = cli(["train", "--out", str(tmp_path / "straight"), *common])
    assert status == 0

    from MedTuningLib.cli import main  # cancel from inside: the STOP file appears after the first epoch's state
    from MedTuningLib.engine import train as train_module

    original = train_module.TrainingRun._save_state
    calls = {"n": 0}

    def save_then_stop(self, model, optimizer, state):
        original(self, model, optimizer, state)
        calls["n"] += 1
        if state["epoch"] == 1:
            (self.work / "STOP").write_text("", encoding="utf-8")

    train_module.TrainingRun._save_state = save_then_stop
    try:
        status, events = cli(["train", "--out", str(tmp_path / "resumed"), *common])
    finally:
        train_module.TrainingRun._save_state = original
    assert status == 130 and events[-1]["status"] == "cancelled"
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.partial" / "state.json").exists()
    (tmp_path / "resumed.partial" / "STOP").unlink()
    status, events = cli(["train", "--out", str(tmp_path / "resumed"), *common, "--resume"])
    assert status == 0, events[-2:]
    a = load_file(str(tmp_path / "straight" / "weights.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
