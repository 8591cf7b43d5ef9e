"""The page with what goes wrong or is stopped: uploads the backend would refuse show its code and
hint and load nothing; a fine-tune cancelled from the page stops its backend and stays resumable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from web_helpers import (chromium, error_text, open_app, publish_screenshots, require_chromium, shot, text, wait_for_job,
                         wait_until, web_server)


@pytest.fixture(scope="module")
def data() -> Path:
    import slicerio

    return Path(slicerio.__file__).parent / "data"


@pytest.fixture(scope="module")
def app(data, tmp_path_factory):
    """One server (one scene) for this module's tests, with one case in its library."""
    require_chromium()
    root = tmp_path_factory.mktemp("web-jobs")
    status, events = run_cli(["cases", "add", "--library", str(root / "cases"), "--image", str(data / "CTChest4.nrrd"),
                              "--label", str(data / "Segmentation.seg.nrrd"), "--modality", "CT"])
    assert status == 0, events[-1]
    scans = root / "scans" / "incoming"
    scans.mkdir(parents=True)
    (scans / "chest CT.nrrd").write_bytes((data / "CTChest4.nrrd").read_bytes())
    (scans / "Segmentation.seg.nrrd").write_bytes((data / "Segmentation.seg.nrrd").read_bytes())  # not a scan
    with web_server(root / "models", root / "cases", root / "home", scans=root / "scans") as server, \
            chromium() as browser:
        page = open_app(browser, server.url)
        yield server, page, root
        page.close()


def bad_files(data: Path, folder: Path) -> dict[str, Path]:
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    png = folder / "screenshot of a slice.png"
    sitk.WriteImage(sitk.GetImageFromArray((np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)), str(png))
    truncated = folder / "CT truncated.nrrd"
    whole = (data / "CTChest4.nrrd").read_bytes()
    truncated.write_bytes(whole[: int(len(whole) * 0.6)])
    return {"IMAGE_DIMENSION": png, "FILE_UNREADABLE": truncated}


def test_bad_uploads_show_the_code_and_load_nothing(app, data, tmp_path):
    server, page, _ = app
    for code, path in bad_files(data, tmp_path).items():
        page.set_input_files("#mt-upload input[type=file]", str(path))
        page.wait_for_function(f"document.querySelector('#mt-error-text') && "
                               f"document.querySelector('#mt-error-text').innerText.includes('[{code}]')", timeout=60000)
        message = error_text(page)
        assert path.name in message and str(tmp_path) not in message  # the upload's name, no server path
        assert text(page, "#mt-error-hint"), "the page says what to do"
        assert "none" in text(page, "#mt-volumes")
        shot(page, tmp_path / "screenshots", f"bad-upload-{code}")
    publish_screenshots(tmp_path / "screenshots")


def test_cancel_a_fine_tune_from_the_page(app, tmp_path):
    import psutil

    server, page, root = app
    page.click("#mt-tab-tune")
    form = {"#mt-train-name": "stopped", "#mt-train-weights": "none", "#mt-train-backbone": "vit_tiny_patch16_224",
            "#mt-train-segments": "right lung,left lung", "#mt-train-epochs": "1000"}
    for selector, value in form.items():
        page.locator(selector).fill(value)
    page.locator("text=Advanced").click()
    for selector, value in {"#mt-train-crop": "8x32x32", "#mt-train-batch": "1", "#mt-train-steps": "4"}.items():
        page.locator(selector).fill(value)
    # A working spacing the backend would refuse is caught on the page, before any job starts.
    page.locator("#mt-train-spacing").fill("fine")
    page.click("#mt-fine-tune")
    page.wait_for_selector("#mt-error-text", timeout=30000)
    assert "spacing" in error_text(page) and "X,Y,Z" in error_text(page), error_text(page)
    assert not (root / "models" / "stopped.partial").exists()
    page.locator("#mt-train-spacing").fill("4")
    page.click("#mt-fine-tune")
    page.wait_for_function("document.querySelector('#mt-job-text') && "
                           "document.querySelector('#mt-job-text').innerText.includes('Training')", timeout=600000)
    backend = [p for p in psutil.Process(server.proc.pid).children(recursive=True) if "train" in " ".join(p.cmdline())]
    assert backend, "the fine-tune runs as a separate backend process"
    assert any("--spacing=4" in p.cmdline() for p in backend), [p.cmdline() for p in backend]
    shot(page, tmp_path / "screenshots", "fine-tune-running")
    page.click("#mt-cancel")
    assert wait_for_job(page, "train", "cancelled", timeout_s=180).startswith("train: cancelled"), error_text(page)
    assert wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in backend), 30)
    models = root / "models"
    assert (models / "stopped.partial").is_dir() and not (models / "stopped").exists()  # resumable, not published
    assert not page.locator("#mt-cancel").count() and page.locator("#mt-fine-tune").is_enabled()
    shot(page, tmp_path / "screenshots", "fine-tune-cancelled")


def test_open_a_scan_from_the_server_folder(app):
    """--scans lists the scans under it (not segmentations) and loads the one picked, with no upload."""
    server, page, root = app
    page.click("#mt-tab-scans")
    page.locator(".v-field:has(#mt-server-file)").click()
    options = page.locator(".v-overlay .v-list-item").all_inner_texts()
    assert options == ["incoming/chest CT.nrrd"], options
    page.locator(".v-overlay .v-list-item", has_text="chest CT").click()
    page.click("#mt-open-server-file")
    page.wait_for_function("document.querySelector('#mt-volumes').innerText.includes('chest CT')", timeout=60000)
    assert not page.locator("#mt-error").count()
