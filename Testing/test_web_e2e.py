"""The browser app end to end, in a real browser against the real backend: upload slicerio's chest CT
through the page, segment it with a tiny model trained here, paint and erase with the mouse, add the
corrected result as a case, re-tune one epoch, segment again. The case library, the results the
page downloads and the model folders are then checked in Python; every step leaves a screenshot in
the test's output folder (``MEDTUNING_WEB_SCREENSHOTS`` names a folder to copy them to, e.g.
docs/screenshots for the README)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import run_cli
from web_helpers import (chromium, error_text, open_app, publish_screenshots, require_chromium, shot, text, wait_for_job,
                         wait_until, web_server)

SEGMENTS = "right lung,left lung"


@pytest.fixture(scope="module")
def data() -> Path:
    import slicerio

    return Path(slicerio.__file__).parent / "data"


@pytest.fixture(scope="module")
def tiny_model(data, tmp_path_factory) -> Path:
    """A tiny lungs model (ViT-Tiny, random base, 2 short epochs validated once; 16x64x64 crops on a 6 mm working
    grid keep inference and validation to a few windows): enough for the page to show and correct. The page's
    results are still on the CT's own 3 mm grid, as the assertions below check."""
    root = tmp_path_factory.mktemp("web-model")
    status, events = run_cli(["cases", "add", "--library", str(root / "train-lib"), "--image", str(data / "CTChest4.nrrd"),
                              "--label", str(data / "Segmentation.seg.nrrd"), "--modality", "CT"])
    assert status == 0, events[-1]
    out = root / "models" / "lungs-tiny"
    status, events = run_cli(["train", "--library", str(root / "train-lib"), "--out", str(out), "--task", "custom",
                              "--segments", SEGMENTS, "--arch", "vit_upernet", "--backbone", "vit_tiny_patch16_224",
                              "--weights", "none", "--crop", "16x64x64", "--batch", "1", "--epochs", "2",
                              "--steps-per-epoch", "4", "--val-every", "2", "--spacing", "6,6,10", "--device", "cpu"])
    assert status == 0, events[-1]
    return out


def masks(path: Path, reference: Path) -> dict[str, np.ndarray]:
    """Segment name -> mask on the CT's grid, read as the backend reads labels."""
    import SimpleITK as sitk

    from MedTuningLib.data.io import read_segments

    return {s.name: s.mask.astype(bool) for s in read_segments(path, sitk.ReadImage(str(reference)))}


def download_result(page, path: Path) -> Path:
    with page.expect_download(timeout=60000) as download:
        page.click("#mt-download")
    download.value.save_as(str(path))
    return path


def stroke(page, effect_icon: str, start: tuple[float, float], end: tuple[float, float], steps: int = 16) -> None:
    """Pick a segment-editor effect and drag across the axial view (fractions of the view's size)."""
    page.locator(f"button:has(.{effect_icon})").first.click()
    page.wait_for_timeout(400)
    box = page.locator("img.image-display-area").first.bounding_box()  # Axial Primary: the axial view first
    x0, y0 = box["x"] + start[0] * box["width"], box["y"] + start[1] * box["height"]
    x1, y1 = box["x"] + end[0] * box["width"], box["y"] + end[1] * box["height"]
    page.mouse.move(x0, y0)
    page.wait_for_timeout(300)
    page.mouse.down()
    page.wait_for_timeout(300)
    for i in range(1, steps + 1):  # slow enough for each move to reach the server's interactor
        page.mouse.move(x0 + (x1 - x0) * i / steps, y0 + (y1 - y0) * i / steps)
        page.wait_for_timeout(120)
    page.wait_for_timeout(300)
    page.mouse.up()
    page.wait_for_timeout(500)
    page.mouse.move(x1 + 0.05 * box["width"], y1 + 0.25 * box["height"], steps=4)  # away, as a hand would
    page.wait_for_timeout(2000)  # the stroke is applied on release, then the views render


def test_segment_correct_add_retune_segment_again(tiny_model, data, tmp_path):
    require_chromium()
    models, cases, home = tmp_path / "models", tmp_path / "my cases", tmp_path / "home"
    shutil.copytree(tiny_model, models / tiny_model.name)
    shots, files = tmp_path / "screenshots", tmp_path / "downloads"
    files.mkdir()
    ct = data / "CTChest4.nrrd"
    with web_server(models, cases, home) as server, chromium() as browser:
        page = open_app(browser, server.url)
        shot(page, shots, "01-start")

        # Load the scan through the page's upload; the model list says what the model is.
        page.set_input_files("#mt-upload input[type=file]", str(ct))
        page.wait_for_function("document.querySelector('#mt-volumes').innerText.includes('CTChest4')", timeout=60000)
        row = page.locator("[data-model='lungs-tiny']")
        assert "custom" in row.inner_text() and "CT" in row.inner_text()
        assert row.locator("[data-badge='not-pretrained']").count() == 1
        assert "right lung" in row.inner_text() and "left lung" in row.inner_text()
        shot(page, shots, "02-scan-loaded")

        # Segment: the page shows the result with named segments, and stays responsive meanwhile.
        page.click("#mt-segment")
        page.wait_for_selector("#mt-cancel", timeout=30000)
        assert wait_for_job(page, "segment") == "segment: done", error_text(page) + server.stderr_tail()
        page.wait_for_selector("#mt-result-name", timeout=30000)
        assert "lungs-tiny" in text(page, "#mt-result-name")
        shot(page, shots, "03-segmented")
        model_output = download_result(page, files / "model-output.seg.nrrd")

        # Correct with the mouse: paint a stroke into "right lung", erase the right end of it.
        stroke(page, "mdi-brush", (0.26, 0.28), (0.46, 0.28))
        shot(page, shots, "04-painted")
        painted_file = download_result(page, files / "painted.seg.nrrd")
        stroke(page, "mdi-eraser", (0.40, 0.28), (0.50, 0.28))
        shot(page, shots, "05-erased")
        erased_file = download_result(page, files / "erased.seg.nrrd")

        # Add to my cases (split train): the table shows it, with its provenance.
        page.click("#mt-tab-cases")
        page.locator("#mt-case-id").fill("lungs-corrected")
        page.click("#mt-add-case")
        assert wait_for_job(page, "cases") == "cases: done", error_text(page) + server.stderr_tail()
        page.wait_for_selector("#mt-cases [data-case]", timeout=30000)
        assert "correction" in page.locator("#mt-cases").inner_text()
        shot(page, shots, "06-case-added")

        # Re-tune now: one short epoch from the model, with the live curve.
        page.click("#mt-tab-tune")
        page.locator("#mt-retune-epochs").fill("1")
        page.locator("text=Advanced").click()
        page.locator("#mt-train-steps").fill("3")
        page.click("#mt-retune")
        assert wait_for_job(page, "retune", timeout_s=900) == "retune: done", error_text(page) + server.stderr_tail()
        page.wait_for_selector("#mt-curve [data-curve='train/loss']", timeout=30000)
        shot(page, shots, "07-retuned")

        # The re-tuned model is selected: segment again with it.
        page.click("#mt-tab-scans")
        new_models = [p.name for p in models.iterdir() if p.is_dir() and p.name != "lungs-tiny"
                      and not p.name.endswith(".partial")]
        assert len(new_models) == 1, new_models
        retuned_name = new_models[0]
        page.wait_for_selector(f"[data-model='{retuned_name}'].bg-primary", timeout=30000)
        page.check("#mt-fast")  # the page's fast settings reach the backend as segment --fast
        shot(page, shots, "08-fast-checked")
        page.click("#mt-segment")

        def fast_backend() -> bool:
            try:
                children = psutil.Process(server.proc.pid).children(recursive=True)
                return any("segment" in c.cmdline() and "--fast" in c.cmdline() for c in children)
            except psutil.Error:
                return False

        assert wait_until(fast_backend, 120), "segment runs with --fast"
        assert wait_for_job(page, "segment") == "segment: done", error_text(page) + server.stderr_tail()
        page.wait_for_function(f"document.querySelector('#mt-result-name').innerText.includes('{retuned_name}')",
                               timeout=30000)
        shot(page, shots, "08-segmented-again")
        second = download_result(page, files / "second.seg.nrrd")
        page.click("#mt-tab-correct")
        with page.expect_download(timeout=120000) as download:
            page.click("#mt-save-scene")
        download.value.save_as(str(files / "scene.mrb"))
    assert server.proc.returncode == 0, server.stderr_tail()

    # The corrections are what the mouse did: paint added voxels on one axial slice, erase took some back.
    before, painted, erased = masks(model_output, ct), masks(painted_file, ct), masks(erased_file, ct)
    added = painted["right lung"] & ~before["right lung"]
    assert added.sum() > 20, "the paint stroke added no voxels"
    k, j, i = np.nonzero(added)
    # A horizontal stroke in the axial view: long along i (left-right), short along j; the sphere brush
    # reaches a few 10-mm slices around the one shown.
    assert np.ptp(i) > 2 * np.ptp(j) and np.ptp(k) <= 6, (np.ptp(i), np.ptp(j), np.ptp(k))
    removed = painted["right lung"] & ~erased["right lung"]
    assert removed.sum() > 5 and not (erased["right lung"] & ~painted["right lung"]).any()
    assert (added & ~removed).sum() > 0, "the erase stroke covered only part of the painted one"
    # Overlap allowed: the edits of "right lung" left "left lung" as the model wrote it.
    assert (painted["left lung"] == before["left lung"]).all() and (erased["left lung"] == before["left lung"]).all()

    # The case library holds the corrected label (the voxels painted and not erased), the scan and provenance.
    manifest = json.loads((cases / "cases.json").read_text(encoding="utf-8"))
    assert len(manifest["cases"]) == 1
    case = manifest["cases"][0]
    assert case["split"] == "train" and list(case["images"]) == ["CT"] and case["id"] == "lungs-corrected"
    assert case["provenance"]["source"].startswith("browser: ")
    assert (case.get("provenance") or {}).get("from", (case.get("provenance") or {}).get("kind")) == "correction"
    stored = masks(cases / case["label"], ct)
    for name in ("right lung", "left lung"):
        assert (stored[name] == erased[name]).all(), f"the stored {name} differs from the corrected result"
    assert stored["right lung"][added & ~removed].all()
    # The correction effort (correction loop) is what the mouse changed against the model's output.
    effort = case["provenance"]["effort"]
    assert effort["right lung"]["voxels_added"] == int((erased["right lung"] & ~before["right lung"]).sum()) > 0
    assert effort["right lung"]["voxels_removed"] == int((before["right lung"] & ~erased["right lung"]).sum())
    assert effort["left lung"]["voxels_added"] == effort["left lung"]["voxels_removed"] == 0

    # Re-tune wrote a new model folder, warm-started from the first; the second result has its segments.
    from MedTuningLib.slicer_bridge.settings import read_model_info

    retuned = read_model_info(models / retuned_name)
    assert retuned.usable, retuned.problem
    assert [s.name for s in retuned.segments] == ["right lung", "left lung"]
    assert set(masks(second, ct)) == {"right lung", "left lung"}

    # The scene the page saved, opened with slicer-core: the scan, the corrected result, the second result.
    from trame_slicer.core import SlicerApp

    scene_app = SlicerApp()
    assert scene_app.io_manager.load_scene(files / "scene.mrb")
    scene = scene_app.scene
    volumes = [n.GetName() for n in scene.GetNodesByClass("vtkMRMLScalarVolumeNode")]
    results = {n.GetName(): n for n in scene.GetNodesByClass("vtkMRMLSegmentationNode")}
    assert volumes == ["CTChest4"]
    assert set(results) == {"CTChest4 lungs-tiny", f"CTChest4 {retuned_name}"}, set(results)
    corrected = results["CTChest4 lungs-tiny"].GetSegmentation()
    assert sorted(corrected.GetNthSegment(i).GetName() for i in range(corrected.GetNumberOfSegments())) == \
        ["left lung", "right lung"]
    publish_screenshots(shots)


def test_next_scan_to_correct_loads_segments_and_is_replaced_by_its_correction(tiny_model, data, tmp_path):
    """"Next scan to correct" in the browser: a scan uploaded through the page goes into the library without a
    label, is ranked, loaded and segmented; added back corrected, it is a labelled case and no longer unlabelled."""
    from MedTuningLib.slicer_bridge.settings import read_case_library

    require_chromium()
    models, cases, home = tmp_path / "models", tmp_path / "my cases", tmp_path / "home"
    shutil.copytree(tiny_model, models / tiny_model.name)
    with web_server(models, cases, home) as server, chromium() as browser:
        page = open_app(browser, server.url)
        page.set_input_files("#mt-upload input[type=file]", str(data / "CTChest4.nrrd"))
        page.wait_for_function("document.querySelector('#mt-volumes').innerText.includes('CTChest4')", timeout=60000)
        page.click("#mt-add-unlabelled")
        assert wait_for_job(page, "cases") == "cases: done", error_text(page) + server.stderr_tail()
        listed = read_case_library(cases)
        assert [(c.split, c.label) for c in listed] == [("unlabelled", "")]
        scan_id = listed[0].case_id

        page.click("#mt-next-scan")
        page.wait_for_function("""() => { const t = document.querySelector('#mt-job-text');
                                          return t && (t.innerText.includes('segment: done') ||
                                                       t.innerText.includes('failed')); }""", timeout=600000)
        assert text(page, "#mt-job-text") == "segment: done", error_text(page) + server.stderr_tail()
        assert scan_id in text(page, "#mt-volumes")
        shot(page, tmp_path / "screenshots", "next-scan-segmented")
        page.click("#mt-tab-cases")
        page.locator("#mt-case-id").fill("lungs-corrected")
        page.click("#mt-add-case")
        assert wait_for_job(page, "cases") == "cases: done", error_text(page) + server.stderr_tail()
    listed = read_case_library(cases)
    assert [(c.split, c.provenance) for c in listed] == [("train", "correction")]
    assert listed[0].case_id != scan_id
