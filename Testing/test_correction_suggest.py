"""`medtuning suggest`: with a real small model, a scan unlike anything it was trained on ranks above a scan
it has seen; the bridge parameters of the loop's commands round-trip through the real parser."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from engine_helpers import TINY_TRAIN, write_blob_case


def done(events):
    assert events[-1]["event"] == "done", events[-1]
    return events[-1]["outputs"]


def _faint_scan(folder: Path) -> Path:
    """A scan the model has not seen: the blob at a quarter of the contrast, in twice the noise."""
    image, _ = write_blob_case(folder, "faint-src", seed=11, centre=(4, 16, 24))
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(image)))
    rng = np.random.default_rng(5)
    faint = 100.0 + (array - 100.0) * 0.25 + rng.normal(0.0, 15.0, array.shape)
    out = sitk.GetImageFromArray(faint.astype(np.float32))
    out.CopyInformation(sitk.ReadImage(str(image)))
    path = folder / "faint.nrrd"
    sitk.WriteImage(out, str(path), True)
    return path


def test_suggest_ranks_an_unfamiliar_scan_above_a_seen_one(cli, tmp_path):
    library = tmp_path / "library"
    seen_image, seen_label = write_blob_case(tmp_path / "src", "seen", seed=1)
    status, events = cli(["cases", "add", "--library", str(library), "--image", str(seen_image), "--label",
                          str(seen_label), "--modality", "MR", "--id", "train-case"])
    assert status == 0, events[-1]
    model = tmp_path / "model"
    status, events = cli(["train", "--library", str(library), "--out", str(model), "--labels", "Blob=1",
                          *TINY_TRAIN, "--epochs", "12", "--steps-per-epoch", "3", "--lr", "3e-3"])
    assert status == 0, events[-1]
    assert done(events)["best"]["dice/Blob"] > 0.6  # the model has learnt the scan it was trained on

    for image, case_id in ((seen_image, "scan-seen"), (_faint_scan(tmp_path / "src"), "scan-unfamiliar")):
        status, events = cli(["cases", "add", "--library", str(library), "--image", str(image), "--modality", "MR",
                              "--split", "unlabelled", "--id", case_id])
        assert status == 0, events[-1]
    status, events = cli(["suggest", "--model", str(model), "--library", str(library), "--device", "cpu",
                          "--events", "jsonl"])
    outputs = done(events)
    ranking = outputs["ranking"]
    assert [e["id"] for e in ranking] == ["scan-unfamiliar", "scan-seen"] and outputs["next"] == "scan-unfamiliar"
    seen, unfamiliar = ranking[1], ranking[0]
    assert unfamiliar["score"] > seen["score"] and 0.0 <= seen["score"] <= 1.0
    assert seen["candidate_voxels"] > 0 and seen["candidate_mm3"] > 0  # the model does find the seen blob
    assert "entropy" in outputs["measure"] and [e["rank"] for e in ranking] == [1, 2]
    assert Path(ranking[0]["images"][0]).is_file()
    scored = [e for e in events if e["event"] == "metric" and e["name"] == "uncertainty"]
    assert {e["case"] for e in scored} == {"scan-seen", "scan-unfamiliar"}  # labelled cases are not ranked

    status, events = cli(["suggest", "--model", str(model), "--library", str(library), "--top", "1",
                          "--device", "cpu", "--events", "jsonl"])
    assert [e["id"] for e in done(events)["ranking"]] == ["scan-unfamiliar"]


def test_suggest_refusals(cli, tmp_path):
    library = tmp_path / "library"
    image, label = write_blob_case(tmp_path / "src", "c", seed=1)
    status, events = cli(["cases", "add", "--library", str(library), "--image", str(image), "--label", str(label),
                          "--modality", "MR"])
    assert status == 0
    status, events = cli(["suggest", "--model", str(tmp_path / "none"), "--library", str(library), "--device", "cpu"])
    assert status == 2 and events[-1]["code"] == "NO_TRAINING_CASES" and "--split unlabelled" in events[-1]["hint"]
    status, events = cli(["history", "--model", str(tmp_path / "none")])
    assert status == 2 and events[-1]["code"] == "FILE_NOT_FOUND"
    status, events = cli(["retune", "--model", str(tmp_path), "--library", str(library)])
    assert status == 2 and events[-1]["code"] == "MODEL_FOLDER_INVALID"
    status, events = cli(["retune", "--model", str(tmp_path), "--library", str(library), "--epochs", "2",
                          "--minutes", "1"])
    assert status == 2 and events[-1]["code"] == "USAGE"


def test_uncertainty_measure():
    from MedTuningLib.commands.suggest import uncertainty

    confident = np.zeros((2, 2, 4, 4), np.float32)
    confident[0] = 1.0
    confident[0, :, 1:3, 1:3], confident[1, :, 1:3, 1:3] = 0.02, 0.98
    unsure = confident.copy()
    unsure[:, :, 1:3, 1:3] = 0.5
    assert uncertainty(unsure)["score"] == pytest.approx(1.0) and uncertainty(confident)["score"] < 0.2
    nothing = np.zeros((2, 2, 4, 4), np.float32)
    nothing[0] = 1.0
    assert uncertainty(nothing) == {"score": 1.0, "candidate_voxels": 0, "candidate_mm3": 0.0, "foreground_voxels": 0}


def test_bridge_params_of_the_loop_parse_with_the_real_parser(tmp_path):
    from MedTuningLib.cli import build_parser
    from MedTuningLib.slicer_bridge.commands import (CaseAddParams, HistoryParams, RetuneParams, SuggestParams,
                                                     backend_argv, stop_dir)

    parser = build_parser()
    model, lib = tmp_path / "Modèle 1", tmp_path / "my cases"

    def parse(params):
        return parser.parse_args(backend_argv("/usr/bin/python3", params)[3:])

    args = parse(RetuneParams(model=model, library=lib, minutes=2.5, device="cpu"))
    assert (args.command, args.model, args.library, args.minutes, args.epochs) == ("retune", model, lib, 2.5, None)
    assert stop_dir(RetuneParams(model=model, library=lib, out=tmp_path / "r")) == tmp_path / "r.partial"
    with pytest.raises(ValueError):
        RetuneParams(model=model, library=lib, epochs=3, minutes=1.0).argv()
    args = parse(SuggestParams(model=model, library=lib, top=3))
    assert (args.command, args.top) == ("suggest", 3)
    assert parse(HistoryParams(model=model)).model == model
    args = parse(CaseAddParams(library=lib, images=[tmp_path / "a.nrrd"], label=tmp_path / "l.seg.nrrd",
                               provenance="correction", from_model=model, model_output=tmp_path / "out.seg.nrrd"))
    assert args.from_model == model and args.model_output == tmp_path / "out.seg.nrrd"
    args = parse(CaseAddParams(library=lib, images=[tmp_path / "a.nrrd"], label=None, split="unlabelled"))
    assert args.label is None and args.split == "unlabelled"
    with pytest.raises(ValueError):
        CaseAddParams(library=lib, images=[tmp_path / "a.nrrd"], label=None).argv()
    with pytest.raises(ValueError):
        CaseAddParams(library=lib, images=[tmp_path / "a.nrrd"], label=tmp_path / "l", from_model=model).argv()
