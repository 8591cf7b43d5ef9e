"""Correction effort and unlabelled scans: a real model's result, corrected, added with its provenance;
effort per segment in `cases list --events jsonl`, in the Slicer bridge's reader and in `history`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from engine_helpers import TINY_TRAIN, make_blob_library, write_blob_case

QUICK = ["--epochs", "1", "--steps-per-epoch", "1"]


def done(events):
    assert events[-1]["event"] == "done", events[-1]
    return events[-1]["outputs"]


@pytest.fixture(scope="module")
def model_and_library(tmp_path_factory):
    from conftest import run_cli

    root = tmp_path_factory.mktemp("effort")
    library = make_blob_library(run_cli, root)
    status, events = run_cli(["train", "--library", str(library), "--out", str(root / "m0"), "--labels", "Blob=1",
                              *TINY_TRAIN, "--epochs", "2"])
    assert status == 0, events[-1]
    return root, library, root / "m0"


def _expected_effort(model_output: Path, corrected: Path, spacing_mm3: float) -> dict:
    from MedTuningLib.data.io import read_segments

    reference = sitk.ReadImage(str(corrected))
    before = read_segments(model_output, reference)[0].mask if read_segments(model_output, reference) else \
        np.zeros(sitk.GetArrayFromImage(reference).shape, bool)
    after = sitk.GetArrayFromImage(reference) > 0
    added, removed = int((after & ~before).sum()), int((before & ~after).sum())
    dice = 2 * int((after & before).sum()) / (int(after.sum()) + int(before.sum()))
    return {"dice": dice, "voxels_added": added, "voxels_removed": removed, "mm3_added": added * spacing_mm3,
            "mm3_removed": removed * spacing_mm3}


def test_correction_effort_is_recorded_listed_and_read_by_the_bridge(cli, tmp_path, model_and_library):
    from MedTuningLib.slicer_bridge.settings import read_case_library

    root, library, model = model_and_library
    image, reference = write_blob_case(tmp_path / "src", "scan7", seed=7, centre=(4, 18, 22))
    model_output = tmp_path / "scan7-model.seg.nrrd"
    status, events = cli(["segment", "--model", str(model), "--image", str(image), "--out", str(model_output),
                          "--device", "cpu"])
    assert status == 0, events[-1]
    # The "radiologist" corrects the model's result into the reference label.
    status, events = cli(["cases", "add", "--library", str(library), "--image", str(image), "--label", str(reference),
                          "--modality", "MR", "--id", "scan7", "--provenance", "correction", "--from-model", str(model),
                          "--model-output", str(model_output), "--events", "jsonl"])
    assert status == 0, events[-1]
    spacing = sitk.ReadImage(str(image)).GetSpacing()
    expected = _expected_effort(model_output, reference, float(np.prod(spacing)))
    assert expected["voxels_added"] + expected["voxels_removed"] > 0  # a 2-epoch model is not perfect

    status, events = cli(["cases", "list", "--library", str(library), "--events", "jsonl"])
    listed = {c["id"]: c for c in done(events)["cases"]}
    provenance = listed["scan7"]["provenance"]
    assert provenance["from"] == "correction" and provenance["from_model"] == str(model.absolute())
    effort = provenance["effort"]["Blob"]
    assert effort["dice"] == pytest.approx(expected["dice"], abs=1e-9)
    for key in ("voxels_added", "voxels_removed"):
        assert effort[key] == expected[key], key
    for key in ("mm3_added", "mm3_removed"):
        assert effort[key] == pytest.approx(expected[key], abs=1e-3), key
    assert listed["case0"]["provenance"]["from"] == "import" and "effort" not in listed["case0"]["provenance"]

    # What the Slicer cases table and the browser app read: the bridge's reader.
    entries = {e.case_id: e for e in read_case_library(library)}
    entry = entries["scan7"]
    assert entry.provenance == "correction" and entry.from_model == str(model.absolute()) and entry.added
    assert entry.effort["Blob"].voxels_added == expected["voxels_added"]
    assert entry.effort["Blob"].dice == pytest.approx(expected["dice"], abs=1e-9)
    assert "Blob: Dice" in entry.effort_text() and entries["case0"].effort == {}

    # history: the re-tune that trained on the correction shows its effort as round 1's.
    status, events = cli(["retune", "--model", str(model), "--library", str(library), "--out", str(tmp_path / "m1"),
                          "--device", "cpu", *QUICK])
    assert status == 0, events[-1]
    status, events = cli(["history", "--model", str(tmp_path / "m1"), "--events", "jsonl"])
    rounds = done(events)["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] and rounds[1]["new_cases"] == ["scan7"]
    assert rounds[1]["effort"]["Blob"]["cases"] == 1
    assert rounds[1]["effort"]["Blob"]["mm3_added"] == pytest.approx(expected["mm3_added"], abs=1e-2)
    assert rounds[0]["test_case_ids"] == rounds[1]["test_case_ids"] == ["case2"]
    assert all(r["dice"]["Blob"] is not None for r in rounds)
    from MedTuningLib.slicer_bridge.settings import read_history

    assert read_history(tmp_path / "m1") == rounds


def test_correction_options_are_checked(cli, tmp_path, model_and_library):
    _, library, model = model_and_library
    image, label = write_blob_case(tmp_path / "src", "x", seed=3)
    base = ["cases", "add", "--library", str(library), "--image", str(image), "--label", str(label), "--modality", "MR"]
    status, events = cli([*base, "--from-model", str(model)])
    assert status == 2 and events[-1]["code"] == "INVALID_OPTION" and "--provenance correction" in events[-1]["hint"]
    status, events = cli([*base, "--provenance", "correction", "--model-output", str(label)])
    assert status == 2 and events[-1]["code"] == "INVALID_OPTION" and "--from-model" in events[-1]["message"]
    status, events = cli([*base, "--provenance", "correction", "--from-model", str(model),
                          "--model-output", str(tmp_path / "missing.seg.nrrd")])
    assert status == 2 and events[-1]["code"] == "FILE_NOT_FOUND"
    status, events = cli([*base, "--provenance", "correction", "--from-model", str(tmp_path)])
    assert status == 2 and events[-1]["code"] == "MODEL_FOLDER_INVALID"


def test_unlabelled_scans_are_listed_never_trained_on_nor_scored(cli, tmp_path, model_and_library):
    _, library, model = model_and_library
    image, label = write_blob_case(tmp_path / "src", "u", seed=4)
    status, events = cli(["cases", "add", "--library", str(library), "--image", str(image), "--modality", "MR",
                          "--split", "unlabelled", "--id", "u1"])
    assert status == 0, events[-1]
    status, events = cli(["cases", "add", "--library", str(library), "--image", str(image), "--modality", "MR",
                          "--id", "nolabel"])
    assert status == 2 and events[-1]["code"] == "INVALID_OPTION" and "--split unlabelled" in events[-1]["hint"]
    status, events = cli(["cases", "add", "--library", str(library), "--image", str(image), "--label", str(label),
                          "--modality", "MR", "--split", "unlabelled"])
    assert status == 2 and events[-1]["code"] == "INVALID_OPTION"
    status, events = cli(["cases", "split", "--library", str(library), "--id", "u1", "--split", "train"])
    assert status == 2 and events[-1]["code"] == "INVALID_OPTION" and events[-1]["case"] == "u1"
    status, events = cli(["cases", "list", "--library", str(library), "--events", "jsonl"])
    listed = done(events)
    u1 = next(c for c in listed["cases"] if c["id"] == "u1")
    assert u1["label"] is None and u1["split"] == "unlabelled" and listed["splits"]["unlabelled"] == 1

    status, events = cli(["retune", "--model", str(model), "--library", str(library), "--out", str(tmp_path / "m"),
                          "--device", "cpu", "--events", "jsonl", *QUICK])
    assert status == 0, events[-1]
    import json

    manifest = json.loads((tmp_path / "m" / "medtuning.json").read_text(encoding="utf-8"))
    assert "u1" not in manifest["training"]["train_cases"] + manifest["training"]["val_cases"]
    assert "u1" not in manifest["training"]["test_cases"]
    status, events = cli(["evaluate", "--model", str(model), "--library", str(library), "--split", "all",
                          "--device", "cpu", "--events", "jsonl"])
    assert status == 0, events[-1]
    scored = {e["case"] for e in events if e["event"] == "metric"}
    assert "u1" not in scored and "case0" in scored
    status, events = cli(["cases", "remove", "--library", str(library), "--id", "u1"])
    assert status == 0, events[-1]
