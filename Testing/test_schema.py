"""The project's records (MedTuningLib.schema): round trips, unknown fields, older and newer versions,
the shipped examples, one names list, and the module's import closure (torch-free, Python 3.9)."""

from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

import MedTuningLib
from MedTuningLib import schema
from MedTuningLib.errors import MedTuningError
from MedTuningLib.schema import (FORMAT_VERSION, CaseManifest, CaseRecord, CaseScores, EvaluationReport,
                                 ModelManifest, Provenance, RoundRecord, SegmentEffort, history_rows)

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "examples" / "records"


def _read(name: str) -> dict:
    return json.loads((RECORDS / name).read_text(encoding="utf-8"))


# -- shipped examples -----------------------------------------------------------------------------

def test_every_shipped_example_reads_and_round_trips():
    readers = {"medtuning": ModelManifest.from_dict, "cases": CaseManifest.from_dict,
               "report": EvaluationReport.from_dict}
    names = sorted(p.name for p in RECORDS.glob("*.json"))
    assert {n.split("-")[0] for n in names} == set(readers)  # an example of every record
    for name in names:
        data = _read(name)
        record = readers[name.split("-")[0]](data)
        again = type(record).from_dict(record.to_dict())
        assert again.to_dict() == record.to_dict(), name
        assert record.to_dict()["format_version"] == FORMAT_VERSION  # written back in this version


def test_version_1_model_folder_reads_with_empty_history_and_gets_a_round_0():
    v1 = ModelManifest.from_dict(_read("medtuning-v1.json"))
    assert v1.format_version == 1 and v1.history == [] and v1.test is None and v1.round == 0
    rows = history_rows(v1)
    assert [r["round"] for r in rows] == [0] and rows[0]["train_cases"] == len(v1.training.train_cases) == 2
    assert rows[0]["dice"] == {}  # 0.1.0 recorded no held-out scores


def test_version_2_model_folder_has_history_and_test_scores():
    v2 = ModelManifest.from_dict(_read("medtuning-v2.json"))
    assert v2.round == 0 and v2.test is not None and v2.test.case_ids == ["case2"]
    assert v2.training.test_cases == ["case2"] and set(v2.training.train_cases).isdisjoint(v2.test.case_ids)
    assert v2.test.mean("dice/Blob") == pytest.approx(v2.history[-1].test.mean("dice/Blob"))
    assert v2.arch == "vit_upernet" and v2.method_name == "med_tuning" and v2.segment_names == ["Blob"]


def test_version_1_library_and_report_read():
    cases = CaseManifest.from_dict(_read("cases-v1.json"))
    assert cases.format_version == 1 and [c.split for c in cases.cases] == ["train", "train", "test"]
    assert all(c.provenance.kind == "import" and c.provenance.effort == {} for c in cases.cases)
    report = EvaluationReport.from_dict(_read("report-v1.json"))  # 0.1.0 reports had no format_version
    assert report.format_version == 1 and report.mean("hd95/Blob") == 2.0 and report.cases[0].seconds == 1.4


def test_version_2_library_holds_corrections_and_unlabelled_scans():
    cases = {c.id: c for c in CaseManifest.from_dict(_read("cases-v2.json")).cases}
    corrected = cases["case3"].provenance
    assert corrected.kind == "correction" and corrected.from_model.endswith("models/blob")
    assert corrected.effort["Blob"].dice == 0.874 and corrected.effort["Blob"].mm3_changed == pytest.approx(63.6)
    assert cases["scan4"].label is None and not cases["scan4"].labelled and cases["scan4"].split == "unlabelled"


# -- round trips, unknown fields --------------------------------------------------------------------

def _model() -> ModelManifest:
    report = EvaluationReport(model="/m/r1", library="/lib", split="test", regions=["Spleen"],
                              cases=[CaseScores("t1", {"dice/Spleen": 0.8})],
                              summary={"dice/Spleen": {"mean": 0.8, "std": 0.0, "n": 1}}, created="2026-01-01")
    return ModelManifest(architecture={"arch": "vit_unet", "backbone": "vit_tiny_patch16_224"},
                         base_weights={"source": "none", "pretrained": False}, modalities=["CT"],
                         label_scheme={"task": "custom", "classes": [{"name": "Spleen", "source_values": [1]}]},
                         preprocessing={"modalities": ["CT"]}, crop=[8, 64, 64], stored="full",
                         method={"name": "med_tuning"}, test=report,
                         history=[RoundRecord(round=0, model="/m/r0"),
                                  RoundRecord(round=1, model="/m/r1", init_from="/m/r0", train_cases=["a", "b"],
                                              new_cases=["b"], test=report,
                                              effort={"Spleen": {"dice": 0.9, "cases": 1}})])


def test_model_manifest_round_trip_keeps_unknown_fields_everywhere():
    data = _model().to_dict()
    data["future"] = {"x": 1}
    data["training"]["future_setting"] = 3
    data["history"][1]["future_round_field"] = "kept"
    data["test"]["cases"][0]["future_case_field"] = [1, 2]
    record = ModelManifest.from_dict(copy.deepcopy(data))
    assert record.round == 1 and record.history[1].new_cases == ["b"] and record.test.mean("dice/Spleen") == 0.8
    out = record.to_dict()
    assert out["future"] == {"x": 1} and out["training"]["future_setting"] == 3
    assert out["history"][1]["future_round_field"] == "kept"
    assert out["test"]["cases"][0]["future_case_field"] == [1, 2]
    assert ModelManifest.from_dict(out).to_dict() == out


def test_case_manifest_round_trip_keeps_unknown_fields():
    effort = SegmentEffort(dice=0.5, voxels_added=3, voxels_removed=1, mm3_added=3.0, mm3_removed=1.0)
    manifest = CaseManifest(cases=[
        CaseRecord("a", {"CT": "cases/a/CT.nrrd"}, "cases/a/label.nrrd", "train",
                   Provenance(kind="correction", added="t", from_model="/m", model_output="/o.seg.nrrd",
                              effort={"Spleen": effort}, extra={"dicom": [{"series": "1.2.3"}]}),
                   extra={"note": "kept"}),
        CaseRecord("u", {"CT": "cases/u/CT.nrrd"}, None, "unlabelled")], extra={"library_name": "spleen"})
    data = manifest.to_dict()
    assert data["cases"][0]["provenance"]["dicom"] == [{"series": "1.2.3"}] and data["library_name"] == "spleen"
    again = CaseManifest.from_dict(json.loads(json.dumps(data)))
    assert again.to_dict() == data and again.cases[0].provenance.effort["Spleen"] == effort
    assert again.cases[0].extra == {"note": "kept"} and again.cases[1].label is None


def test_report_round_trip():
    report = EvaluationReport(model="m", library="l", split="test", regions=["Kidney"],
                              cases=[CaseScores("a", {"dice/Kidney": 0.9, "hd95/Kidney": None}, 2.0)],
                              summary={"dice/Kidney": {"mean": 0.9, "std": 0.0, "n": 1}}, pretrained=True)
    data = report.to_dict()
    assert EvaluationReport.from_dict(data).to_dict() == data
    assert EvaluationReport.from_dict({k: v for k, v in data.items() if k != "summary"}).mean("dice/Kidney") == 0.9


# -- refusals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("reader,code", [(ModelManifest.from_dict, "MODEL_FOLDER_TOO_NEW"),
                                         (CaseManifest.from_dict, "LIBRARY_TOO_NEW"),
                                         (EvaluationReport.from_dict, "MODEL_FOLDER_TOO_NEW")])
def test_newer_versions_are_refused_with_the_catalogue_codes(reader, code):
    name = {ModelManifest.from_dict: "medtuning-v2.json", CaseManifest.from_dict: "cases-v2.json",
            EvaluationReport.from_dict: "report-v1.json"}[reader]
    data = _read(name)
    data["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(MedTuningError) as err:
        reader(data)
    assert err.value.code == code and "update MedTuning" in err.value.hint


@pytest.mark.parametrize("change,text", [
    (lambda d: d.pop("crop"), "lacks 'crop'"),
    (lambda d: d.update(modalities=[]), "names no modalities"),
    (lambda d: d.update(crop=[8, 64]), "three positive sizes"),
    (lambda d: d.update(history="nope"), "not a list"),
    (lambda d: d.update(format_version="2"), "no valid format_version"),
])
def test_broken_model_manifests_are_model_folder_invalid(change, text):
    data = _model().to_dict()
    change(data)
    with pytest.raises(MedTuningError) as err:
        ModelManifest.from_dict(data)
    assert err.value.code == "MODEL_FOLDER_INVALID" and text in err.value.message


@pytest.mark.parametrize("case,text", [
    ({"id": "a", "images": {"CT": "x"}, "split": "train"}, "no label path"),
    ({"id": "a", "images": {"CT": "x"}, "label": "l", "split": "later"}, "split 'later'"),
    ({"id": "a", "images": {}, "label": "l"}, "no valid 'images'"),
    ({"id": "a", "images": {"CT": "x"}, "label": "l", "provenance": {"effort": [1]}}, "effort"),
])
def test_broken_cases_are_library_invalid(case, text):
    with pytest.raises(MedTuningError) as err:
        CaseManifest.from_dict({"format_version": 2, "cases": [case]})
    assert err.value.code == "LIBRARY_INVALID" and text in err.value.message


# -- one names list, torch-free module --------------------------------------------------------------

def test_names_lists_live_in_the_schema_only():
    from MedTuningLib import cli
    from MedTuningLib.slicer_bridge import commands

    for name in ("ARCHS", "METHODS", "TASKS", "SPLITS", "SOURCE_LABELS", "PROVENANCES"):
        assert getattr(cli, name) is getattr(schema, name) is getattr(commands, name), name
    parser = cli.build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]  # noqa: SLF001 - the parser's own choices
    choices = {a.dest: a.choices for a in train._actions if a.choices}  # noqa: SLF001
    assert tuple(choices["arch"]) == schema.ARCHS and tuple(choices["method"]) == schema.METHODS
    assert tuple(choices["task"]) == schema.TASKS and tuple(choices["source_labels"]) == schema.SOURCE_LABELS
    assert MedTuningLib.FORMAT_VERSION == FORMAT_VERSION
    for path in ("MedTuningLib/cli.py", "MedTuningLib/slicer_bridge/commands.py"):
        text = (ROOT / path).read_text(encoding="utf-8")
        assert 'ARCHS = (' not in text and 'SPLITS = (' not in text, path


def test_schema_is_torch_free_and_python39():
    source = (ROOT / "MedTuningLib" / "schema.py").read_text(encoding="utf-8")
    ast.parse(source, feature_version=(3, 9))
    code = ("import sys; import MedTuningLib.schema, MedTuningLib.slicer_bridge.settings; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'SimpleITK', 'monai')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
