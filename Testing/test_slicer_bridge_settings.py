"""Settings defaults, model discovery, case-library listing and the dependency probe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from MedTuningLib.paths import default_cases_dir, default_models_dir
from MedTuningLib.slicer_bridge.settings import (BridgeSettings, default_backend_python, discover_models,
                                                 next_model_name, parse_probe_output, pip_constraints,
                                                 pip_install_args, probe_argv, read_case_library, read_model_info)


def write_model(folder: Path, manifest: dict, weights: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "medtuning.json").write_text(json.dumps(manifest), encoding="utf-8")
    if weights:
        (folder / "weights.safetensors").write_bytes(b"\0" * 8)
    return folder


KIDNEY = {"format_version": 1, "architecture": {"arch": "vit_upernet", "method": "med_tuning"},
          "base_weights": {"id": "vit_base_patch16_224.orig_in21k", "source": "hub", "sha256": "ab"},
          "modalities": ["CT"],
          "label_scheme": {"task": "kits", "segments": [
              {"name": "Kidney", "color": [0.85, 0.4, 0.3], "value": 1},
              {"name": "Kidney tumour", "color": "#ffff00", "value": 2}]}}
BRATS = {"format_version": 1, "architecture": "swin_unet", "method": {"name": "adapter"}, "base_weights": "none",
         "modalities": ["T1", "T1ce", "T2", "FLAIR"],
         "label_scheme": {"name": "brats", "write": "regions",
                          "regions": {"ET": {"color": [255, 0, 0]}, "TC": {}, "WT": {}}},
         "future_field": {"anything": True}}


def test_settings_defaults_follow_medtuning_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTUNING_HOME", str(tmp_path))
    settings = BridgeSettings()
    assert settings.resolved_models_dir() == default_models_dir() == tmp_path / "models"
    assert settings.resolved_cases_dir() == default_cases_dir() == tmp_path / "cases"
    assert settings.auto_retrain is False and settings.device == "auto"
    assert BridgeSettings(models_dir="~/x").resolved_models_dir() == Path.home() / "x"


def test_settings_round_trip_and_tolerance():
    settings = BridgeSettings(backend_python="/usr/bin/python3", models_dir="/m", auto_retrain=True, device="cuda")
    assert BridgeSettings.from_dict(settings.to_dict()) == settings
    odd = BridgeSettings.from_dict({"device": "tpu", "auto_retrain": "true", "models_dir": 3, "unknown": 1})
    assert odd.device == "auto" and odd.auto_retrain is True and odd.models_dir == ""


def test_default_backend_python(tmp_path):
    (tmp_path / "bin").mkdir()
    exe = tmp_path / "bin" / ("PythonSlicer.exe" if sys.platform == "win32" else "PythonSlicer")
    exe.write_text("", encoding="utf-8")
    assert default_backend_python(str(tmp_path)) == str(exe)
    assert default_backend_python(str(tmp_path / "nowhere"))  # falls back to an interpreter
    assert BridgeSettings(backend_python="/custom/python").resolved_python() == "/custom/python"


def test_model_discovery(tmp_path):
    write_model(tmp_path / "kidney", KIDNEY)
    write_model(tmp_path / "Brain tumour", BRATS)
    write_model(tmp_path / "unfinished.partial", KIDNEY)
    write_model(tmp_path / "no weights", KIDNEY, weights=False)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "medtuning.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "not a model").mkdir()
    extra = write_model(tmp_path.parent / f"{tmp_path.name}-elsewhere" / "shared", KIDNEY)
    models = discover_models(tmp_path, extra=[extra])
    assert [m.name for m in models] == ["Brain tumour", "broken", "kidney", "no weights", "shared"]
    by_name = {m.name: m for m in models}
    kidney = by_name["kidney"]
    assert kidney.usable and kidney.modalities == ["CT"] and kidney.task == "kits" and kidney.pretrained
    assert [(s.name, s.value) for s in kidney.segments] == [("Kidney", 1), ("Kidney tumour", 2)]
    assert kidney.segments[1].color == (1.0, 1.0, 0.0)
    assert kidney.architecture == "vit_upernet" and kidney.method == "med_tuning"
    brats = by_name["Brain tumour"]
    assert brats.modalities == ["T1", "T1ce", "T2", "FLAIR"] and [s.name for s in brats.segments] == ["ET", "TC", "WT"]
    assert brats.segments[0].color == (1.0, 0.0, 0.0) and brats.pretrained is False and brats.method == "adapter"
    assert "not pretrained" in brats.describe() and "T1ce" in brats.describe()
    assert not by_name["broken"].usable and "cannot be read" in by_name["broken"].problem
    assert "weights.safetensors" in by_name["no weights"].problem
    assert "no medtuning.json" in read_model_info(tmp_path / "not a model").problem
    assert discover_models(tmp_path / "missing") == []


def test_next_model_name(tmp_path):
    (tmp_path / "kidney").mkdir()
    (tmp_path / "kidney-2.partial").mkdir()
    assert next_model_name(tmp_path, "kidney") == "kidney-3"
    assert next_model_name(tmp_path, "brain") == "brain"


def test_case_library_listing(tmp_path):
    assert read_case_library(tmp_path) == []
    (tmp_path / "cases.json").write_text(json.dumps({"format_version": 1, "cases": [
        {"id": "c1", "images": {"CT": "c1/CT.nrrd"}, "label": "c1/label.seg.nrrd", "split": "train",
         "provenance": {"kind": "correction", "added": "2025-01-01"}},
        {"id": "c2", "images": ["c2/a.nrrd"], "label": "c2/l.nrrd", "provenance": "scene"}, "junk"]}), encoding="utf-8")
    cases = read_case_library(tmp_path)
    assert [(c.case_id, c.split, c.provenance) for c in cases] == [("c1", "train", "correction"), ("c2", "train", "scene")]
    assert cases[0].images == {"CT": "c1/CT.nrrd"} and cases[1].images == {"0": "c2/a.nrrd"}
    (tmp_path / "cases.json").write_text("{broken", encoding="utf-8")
    assert read_case_library(tmp_path) == []


def test_dependency_probe_runs_in_a_real_interpreter():
    done = subprocess.run(probe_argv(sys.executable), capture_output=True, text=True, timeout=300, encoding="utf-8")
    report = parse_probe_output(done.stdout, done.returncode, done.stderr)
    assert report.python == sys.version.split()[0] and not report.problem
    assert report.packages["torch"] and report.packages["slicerio"]  # this venv has them
    assert report.ready, report.summary()
    assert "GB" in report.gpu_text() or "CPU" in report.gpu_text()


def test_probe_failure_and_install_plan(tmp_path):
    report = parse_probe_output("", 127, "PythonSlicer: not found")
    assert report.problem and "127" in report.problem and not report.ready
    report = parse_probe_output('noise\n{"python": "3.9", "packages": {"torch": "2.1.0", "torchvision": null, '
                                '"timm": null, "monai": "1.3"}}')
    assert report.missing == ["torchvision", "timm"] and report.missing_torch == ["torchvision"]
    assert pip_constraints(report.packages) == "torch==2.1.0\n"
    assert pip_install_args(report.missing, "/tmp/c.txt") == ["timm", "--constraint", "/tmp/c.txt"]
    assert pip_install_args(["torch"], "/tmp/c.txt") == []
    assert "PyTorch is not installed" in parse_probe_output('{"packages": {"torch": null}}').gpu_text()
