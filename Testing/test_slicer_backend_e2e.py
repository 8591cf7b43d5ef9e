"""What the Slicer module does, end to end against the real backend process (no Slicer needed):
export a case under safe names, add it to a library, fine-tune a tiny model, segment, kill a
stubborn training with its children. Uses the engine's train / segment / cases commands and
slicerio's CT."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest

from MedTuningLib.slicer_bridge.commands import CaseAddParams, SegmentParams, TrainParams, backend_argv
from MedTuningLib.slicer_bridge.export import plan_case_export
from MedTuningLib.slicer_bridge.process import BackendProcess
from MedTuningLib.slicer_bridge.settings import read_case_library, read_model_info

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = dict(task="custom", arch="vit_upernet", backbone="vit_tiny_patch16_224", weights="none", crop=(8, 32, 32),
            batch=1, steps_per_epoch=4, device="cpu")


def make(params, **kwargs) -> BackendProcess:
    """The process the module's Logic would start for these parameters (not started yet)."""
    workdir = params.workdir() if isinstance(params, TrainParams) else kwargs.pop("workdir", None)
    return BackendProcess(backend_argv(PY, params), workdir=workdir, pythonpath=ROOT, **kwargs)


def run(params, **kwargs) -> BackendProcess:
    return make(params, **kwargs).start()


def failure(process: BackendProcess) -> str:
    s = process.state
    return f"{s.error_code}: {s.error_message} / {s.error_hint}\n{process.stderr_tail()}"


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """The module's "Add to my cases": a scene case exported under node names, then ``cases add``."""
    import slicerio

    data = Path(slicerio.__file__).parent / "data"
    export_dir = tmp_path_factory.mktemp("export")
    plan = plan_case_export(export_dir, ["CT Chest ü (4)"], "Segmentation: ribs & lungs")
    shutil.copy(data / "CTChest4.nrrd", plan.images[0])
    shutil.copy(data / "Segmentation.seg.nrrd", plan.label)
    lib = tmp_path_factory.mktemp("cases") / "my cases"
    process = run(CaseAddParams(library=lib, images=plan.images, label=plan.label, modalities=["CT"],
                                provenance="scene", source="3D Slicer: Segmentation"), cwd=export_dir)
    assert process.wait(timeout=300) == 0, failure(process)
    cases = read_case_library(lib)
    assert len(cases) == 1 and cases[0].split == "train" and list(cases[0].images) == ["CT"]
    return lib


@pytest.fixture(scope="module")
def model(library, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "chest tiny"
    process = run(TrainParams(library=library, out=out, epochs=2, **TINY))
    assert process.wait(timeout=1200) == 0, failure(process)
    state = process.state
    assert state.ok and state.progress == 1.0 and Path(state.outputs["model"]) == out
    assert state.curves.get("train/loss"), "the fine-tune plot is fed by train loss metric events"
    return out


def test_trained_model_is_discovered_with_its_segments(model):
    import slicerio

    info = read_model_info(model)
    assert info.usable, info.problem
    assert info.modalities == ["CT"] and info.pretrained is False
    reference = slicerio.read_segmentation(Path(slicerio.__file__).parent / "data" / "Segmentation.seg.nrrd")
    assert {s.name for s in info.segments} == {s["name"] for s in reference["segments"]}


def test_segment_writes_a_seg_nrrd_slicer_reads(model, tmp_path):
    import SimpleITK as sitk
    import slicerio

    image = Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"
    out = tmp_path / "result.seg.nrrd"
    process = run(SegmentParams(model=model, images=[image], out=out, device="cpu"), workdir=tmp_path / "work")
    assert process.wait(timeout=900) == 0, failure(process)
    written = Path(process.state.outputs.get("segmentation") or out)
    seg = slicerio.read_segmentation(str(written))
    assert {s["name"] for s in seg["segments"]} == {s.name for s in read_model_info(model).segments}
    assert tuple(seg["voxels"].shape[-3:][::-1]) == sitk.ReadImage(str(image)).GetSize() or \
        tuple(seg["voxels"].shape[-3:]) == sitk.ReadImage(str(image)).GetSize()


def test_existing_result_is_never_overwritten_unasked(model, tmp_path):
    import slicerio

    image = Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"
    out = tmp_path / "taken.seg.nrrd"
    out.write_bytes(b"user's file")
    process = run(SegmentParams(model=model, images=[image], out=out, device="cpu"))
    assert process.wait(timeout=900) == 2 and process.state.error_code == "OUTPUT_EXISTS"
    assert out.read_bytes() == b"user's file"


def wait_for_training_step(process: BackendProcess, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not process.finished:
        for event in process.poll():
            if event["event"] == "progress" and event.get("phase") == "train":
                return event
        time.sleep(0.05)
    raise AssertionError("no training progress event\n" + failure(process))


def test_stubborn_training_is_killed_with_its_children(library, tmp_path):
    """A run that does not stop in the grace period is killed as a tree; nothing is left running."""
    import psutil

    process = run(TrainParams(library=library, out=tmp_path / "killed", epochs=1000, **TINY), grace_s=0.0)
    wait_for_training_step(process)
    tree = [process.pid] + [c.pid for c in psutil.Process(process.pid).children(recursive=True)]
    process.request_stop()
    process.wait(timeout=60)
    assert process.finished and process.state.cancelled
    time.sleep(0.5)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in tree)


# Cancel + resume of a real training: Testing/test_slicer_launcher_cancel.py (through a launcher, as in
# Slicer). cases add + train as one chain from scene nodes: Testing/test_mrml_e2e.py.
