"""Settings defaults, model discovery, case-library listing and the dependency probe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from MedTuningLib.data.labels import scheme_from_preset
from MedTuningLib.paths import default_cases_dir, default_models_dir
from MedTuningLib.schema import FORMAT_VERSION, CaseManifest, CaseRecord, ModelManifest, Provenance, SegmentEffort
from MedTuningLib.slicer_bridge.settings import (BridgeSettings, default_backend_python, discover_models,
                                                 next_model_name, parse_probe_output, pip_constraints,
                                                 pip_install_args, probe_argv, read_case_library, read_model_info,
                                                 case_library_problem)


def write_model(folder: Path, manifest: dict, weights: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "medtuning.json").write_text(json.dumps(manifest), encoding="utf-8")
    if weights:
        (folder / "weights.safetensors").write_bytes(b"\0" * 8)
    return folder


def _manifest(modalities, scheme, base, method, arch="vit_upernet", **extra) -> dict:
    """A model description as training writes it (through the schema record)."""
    record = ModelManifest(architecture={"arch": arch, "method": method}, base_weights=base, modalities=modalities,
                           label_scheme=scheme.to_dict(), preprocessing={"modalities": modalities},
                           crop=[16, 128, 128], stored="tuned" if base.get("source") != "none" else "full",
                           method={"name": method}, pretrained=bool(base.get("pretrained")))
    return {**record.to_dict(), **extra}


KIDNEY = _manifest(["CT"], scheme_from_preset("kits"),
                   {"id": "vit_base_patch16_224.orig_in21k", "source": "hub", "sha256": "ab", "pretrained": True},
                   "med_tuning")
BRATS = _manifest(["T1", "T1ce", "T2", "FLAIR"], scheme_from_preset("brats", "brats2023"),
                  {"source": "none", "pretrained": False}, "adapter", arch="swin_unet",
                  future_field={"anything": True})


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
    kits = scheme_from_preset("kits")
    assert [(s.name, s.value) for s in kidney.segments] == [(n, i) for i, n in enumerate(kits.segment_names, start=1)]
    assert kidney.segments[0].color == tuple(kits.segments[0].color)
    assert kidney.architecture == "vit_upernet" and kidney.method == "med_tuning"
    brats = by_name["Brain tumour"]
    assert brats.modalities == ["T1", "T1ce", "T2", "FLAIR"] and [s.name for s in brats.segments] == ["ET", "TC", "WT"]
    assert brats.pretrained is False and brats.method == "adapter" and brats.architecture == "swin_unet"
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
    effort = SegmentEffort(dice=0.8, voxels_added=10, voxels_removed=5, mm3_added=12.5, mm3_removed=6.25)
    manifest = CaseManifest(cases=[
        CaseRecord("c1", {"CT": "cases/c1/CT.nrrd"}, "cases/c1/label.seg.nrrd", "train",
                   Provenance(kind="correction", added="2025-01-01T10:00:00+00:00", from_model="/m/spleen",
                              effort={"Spleen": effort})),
        CaseRecord("c2", {"CT": "cases/c2/CT.nrrd"}, "cases/c2/label.nrrd", "test", Provenance(kind="scene")),
        CaseRecord("u1", {"CT": "cases/u1/CT.nrrd"}, None, "unlabelled")])
    (tmp_path / "cases.json").write_text(json.dumps(manifest.to_dict()), encoding="utf-8")
    cases = read_case_library(tmp_path)
    assert [(c.case_id, c.split, c.provenance) for c in cases] == [
        ("c1", "train", "correction"), ("c2", "test", "scene"), ("u1", "unlabelled", "import")]
    assert cases[0].images == {"CT": "cases/c1/CT.nrrd"} and cases[0].from_model == "/m/spleen"
    assert cases[0].added.startswith("2025-01-01") and cases[0].effort["Spleen"].mm3_added == 12.5
    assert "Spleen: Dice 0.80" in cases[0].effort_text() and cases[1].effort_text() == ""
    assert not cases[2].labelled and cases[2].label == ""
    assert case_library_problem(tmp_path) == ""
    (tmp_path / "cases.json").write_text("{broken", encoding="utf-8")
    assert read_case_library(tmp_path) == [] and "cannot be read" in case_library_problem(tmp_path)
    (tmp_path / "cases.json").write_text(json.dumps({"format_version": FORMAT_VERSION + 1, "cases": []}),
                                         encoding="utf-8")
    assert read_case_library(tmp_path) == [] and "update MedTuning" in case_library_problem(tmp_path)


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
