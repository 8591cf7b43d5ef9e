"""Batch segmentation: ``segment --batch-list`` with a CSV or a folder of scans, one model load, progress
per scan, a bad scan reported with its code while the others finish, and a rerun that skips the
scans whose outputs are complete."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from dicom_helpers import write_series
from engine_helpers import TINY_TRAIN, blob_volume, make_blob_library, write_blob_case


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from conftest import run_cli

    root = tmp_path_factory.mktemp("batch")
    library = make_blob_library(run_cli, root)
    status, events = run_cli(["train", "--library", str(library), "--out", str(root / "model"), "--labels", "Blob=1",
                              *TINY_TRAIN, "--epochs", "2", "--steps-per-epoch", "2", "--seed", "1"])
    assert status == 0, events[-3:]
    return root / "model"


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _scans(tmp_path: Path) -> tuple[Path, dict]:
    """Three good scans (two NRRD files, one DICOM series) and one bad (a constant volume)."""
    images = {}
    for i, name in enumerate(("a", "c")):
        images[name], _ = write_blob_case(tmp_path / "in", name, seed=20 + i)
    img, _ = blob_volume(seed=30)
    images["d"] = write_series(img, tmp_path / "in" / "d-dicom", modality="MR", description="blob MR")
    bad = sitk.GetImageFromArray(np.full((8, 40, 40), 7.0, dtype=np.float32))
    images["b"] = tmp_path / "in" / "b.nrrd"
    sitk.WriteImage(bad, str(images["b"]))
    rows = [{"id": "a", "MR": "in/a.nrrd", "out": "out/a.seg.nrrd", "dicom_seg": ""},
            {"id": "b", "MR": "in/b.nrrd", "out": "out/b.seg.nrrd", "dicom_seg": ""},
            {"id": "c", "MR": str(images["c"]), "out": "out/c.seg.nrrd", "dicom_seg": ""},
            {"id": "d", "MR": "in/d-dicom", "out": "out/d.seg.nrrd", "dicom_seg": "out/d.dcm"}]
    listing = tmp_path / "scans.csv"
    _write_csv(listing, rows, ["id", "MR", "out", "dicom_seg"])
    return listing, images


def _progress(events: list[dict]) -> dict[str, str]:
    return {e["scan"]: e["status"] for e in events if e["event"] == "progress" and e.get("phase") == "batch"
            and e.get("status") != "running"}


def test_batch_finishes_the_good_scans_reports_the_bad_one_and_resumes(model, cli, tmp_path):
    listing, images = _scans(tmp_path)
    status, events = cli(["segment", "--model", str(model), "--batch-list", str(listing), "--device", "cpu"])
    assert status == 3, events[-2:]
    error = events[-1]
    assert error["event"] == "error" and error["code"] == "BATCH_INCOMPLETE"
    assert [(f["scan"], f["code"]) for f in [s for s in error["scans"] if s["status"] == "failed"]] == \
        [("b", "CONSTANT_IMAGE")]
    assert (error["segmented"], error["failed"], error["skipped"]) == (3, 1, 0)
    # The model was loaded once for the three scans it segmented.
    assert sum(1 for e in events if e["event"] == "log" and "model_loaded" in e) == 1
    # Progress per scan, in list order, with the overall count.
    assert _progress(events) == {"a": "ok", "b": "failed", "c": "ok", "d": "ok"}
    overall = [(e["step"], e["total"]) for e in events if e["event"] == "progress" and e.get("phase") == "batch"
               and e.get("status") != "running"]
    assert overall == [(1, 4), (2, 4), (3, 4), (4, 4)]
    warning = next(e for e in events if e["event"] == "log" and e.get("scan") == "b")
    assert warning["level"] == "warning" and warning["code"] == "CONSTANT_IMAGE" and warning["hint"]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["a.seg.nrrd", "c.seg.nrrd", "d.dcm", "d.seg.nrrd"]
    for name in "acd":
        seg = slicerio.read_segmentation(str(out / f"{name}.seg.nrrd"))
        assert [s["name"] for s in seg["segments"]] == ["Blob"] and seg["voxels"].shape == (40, 40, 8)
    import highdicom as hd

    assert hd.seg.segread(str(out / "d.dcm")).ReferencedSeriesSequence[0].SeriesInstanceUID == \
        images["d"]["series_uid"]

    # Rerun: the finished scans are skipped (their files untouched), the bad one fails again.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    status, events = cli(["segment", "--model", str(model), "--batch-list", str(listing), "--device", "cpu"])
    assert status == 3 and events[-1]["code"] == "BATCH_INCOMPLETE"
    assert _progress(events) == {"a": "skipped", "b": "failed", "c": "skipped", "d": "skipped"}
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    # A damaged output is not complete: it is segmented again. The bad scan, repaired, is segmented too.
    (out / "c.seg.nrrd").write_bytes(b"NRRD0004\ntrunc")
    good, _ = blob_volume(seed=40)
    sitk.WriteImage(good, str(images["b"]))
    status, events = cli(["segment", "--model", str(model), "--batch-list", str(listing), "--device", "cpu"])
    assert status == 0, events[-2:]
    assert _progress(events) == {"a": "skipped", "b": "ok", "c": "ok", "d": "skipped"}
    done = events[-1]["outputs"]
    assert (done["segmented"], done["skipped"], done["failed"]) == (2, 2, 0) and done["seconds_per_scan"] > 0
    assert slicerio.read_segmentation(str(out / "c.seg.nrrd"))["voxels"].shape == (40, 40, 8)
    assert sum(1 for e in events if e["event"] == "log" and "model_loaded" in e) == 1

    # Everything done: a rerun loads no model at all.
    status, events = cli(["segment", "--model", str(model), "--batch-list", str(listing), "--device", "cpu"])
    assert status == 0 and events[-1]["outputs"]["skipped"] == 4
    assert not any("model_loaded" in e for e in events)


def test_batch_folder_one_scan_per_sub_folder(model, cli, tmp_path):
    batch = tmp_path / "study"
    img, _ = blob_volume(seed=5)
    write_series(img, batch / "patient1", modality="MR")
    write_blob_case(batch / "patient2", "scan", seed=6)
    os.remove(batch / "patient2" / "scan-label.nrrd")
    (batch / "patient3").mkdir()
    (batch / "patient3" / "readme.txt").write_text("no image here", encoding="utf-8")
    status, events = cli(["segment", "--model", str(model), "--batch-list", str(batch), "--out", str(tmp_path / "r"),
                          "--batch-format", "both", "--device", "cpu"])
    assert status == 3
    failed = {s["scan"]: s["code"] for s in events[-1]["scans"] if s["status"] == "failed"}
    # patient2 is a NRRD file: no DICOM SEG can reference it; patient3 holds no image.
    assert failed == {"patient2": "INVALID_OPTION", "patient3": "BATCH_LIST_INVALID"}
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["patient1.dcm", "patient1.seg.nrrd"]
    status, events = cli(["segment", "--model", str(model), "--batch-list", str(batch), "--out", str(tmp_path / "r2"),
                          "--device", "cpu"])
    assert status == 3 and {s["scan"] for s in events[-1]["scans"] if s["status"] == "ok"} == {"patient1", "patient2"}


def test_batch_list_refusals(model, cli, tmp_path):
    listing = tmp_path / "l.csv"
    _write_csv(listing, [{"T1": "x.nrrd", "out": "x.seg.nrrd"}], ["T1", "out"])
    status, events = cli(["segment", "--model", str(model), "--batch-list", str(listing)])
    assert status == 2 and events[-1]["code"] == "BATCH_LIST_INVALID" and "MR" in events[-1]["message"]
    _write_csv(listing, [{"image": "a.nrrd", "out": "same.seg.nrrd"}, {"image": "b.nrrd", "out": "same.seg.nrrd"}],
               ["image", "out"])
    status, events = cli(["segment", "--model", str(model), "--batch-list", str(listing)])
    assert status == 2 and events[-1]["code"] == "BATCH_LIST_INVALID" and "both" in events[-1]["message"]
    status, events = cli(["segment", "--model", str(model), "--batch-list", str(listing), "--image", "a.nrrd"])
    assert status == 2 and events[-1]["code"] == "USAGE"
    # A broken model stops the batch at once (every scan would fail the same way), with the model's code.
    _write_csv(listing, [{"image": "a.nrrd", "out": "a.seg.nrrd"}], ["image", "out"])
    status, events = cli(["segment", "--model", str(tmp_path), "--batch-list", str(listing)])
    assert status == 2 and events[-1]["code"] == "MODEL_FOLDER_INVALID"


def test_slicer_bridge_batch_command_runs_on_the_real_backend(model, cli, tmp_path):
    """What the Slicer module sends for "segment all selected volumes": a CSV and one argv."""
    import ast

    from MedTuningLib.slicer_bridge import commands
    from MedTuningLib.slicer_bridge.commands import BatchScan, SegmentBatchParams, write_batch_csv

    first, _ = write_blob_case(tmp_path / "scene export", "vol 1", seed=50)
    second, _ = write_blob_case(tmp_path / "scene export", "vol 2", seed=51)
    (tmp_path / "jobs").mkdir()
    listing = write_batch_csv(tmp_path / "jobs" / "batch.csv",
                              [BatchScan([first], tmp_path / "results" / "vol 1.seg.nrrd", id="vol 1"),
                               BatchScan([second], tmp_path / "results" / "vol 2.seg.nrrd")], ["MR"])
    argv = SegmentBatchParams(model=model, batch_list=listing, device="cpu").argv()
    assert argv[:3] == ["segment", f"--model={model}", f"--batch-list={listing}"]
    status, events = cli(argv)
    assert status == 0, events[-2:]
    assert [s["scan"] for s in events[-1]["outputs"]["scans"]] == ["vol 1", "scan2"]
    assert (tmp_path / "results" / "vol 1.seg.nrrd").is_file() and (tmp_path / "results" / "vol 2.seg.nrrd").is_file()
    with pytest.raises(ValueError):
        SegmentBatchParams(model=model, batch_list=listing, batch_format="nifti").argv()
    with pytest.raises(ValueError):
        write_batch_csv(tmp_path / "x.csv", [BatchScan([first, second], tmp_path / "o.seg.nrrd")], ["MR"])
    # The bridge runs inside Slicer: Python 3.9 syntax.
    ast.parse(Path(commands.__file__).read_text(encoding="utf-8"), feature_version=(3, 9))
