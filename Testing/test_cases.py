"""The case library through the CLI (in-process): add / list / remove / split, refusals, lock, manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from MedTuningLib import FORMAT_VERSION
from MedTuningLib.cases import (LOCK_NAME, MANIFEST_NAME, Case, CaseLibrary, manifest_to_dict, parse_manifest)
from MedTuningLib.errors import MedTuningError
from MedTuningLib.fileio import FileLock


@pytest.fixture
def chest_files(slicerio_data, tmp_path) -> tuple[Path, Path]:
    """CTChest4 + its segmentation, under a folder name with spaces and non-ASCII letters."""
    folder = tmp_path / "Données patient 1"
    folder.mkdir()
    image = folder / "thorax CT ü.nrrd"
    label = folder / "poumons é.seg.nrrd"
    shutil.copyfile(slicerio_data / "CTChest4.nrrd", image)
    shutil.copyfile(slicerio_data / "Segmentation.seg.nrrd", label)
    return image, label


def done_outputs(events: list[dict]) -> dict:
    assert events[-1]["event"] == "done", events
    return events[-1]["outputs"]


def error_code(events: list[dict]) -> str:
    assert events[-1]["event"] == "error", events
    assert events[-1]["message"] and events[-1]["hint"]
    return events[-1]["code"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != LOCK_NAME}


def test_add_list_split_remove(cli, chest_files, tmp_path):
    image, label = chest_files
    library = tmp_path / "ma bibliothèque"
    status, events = cli(["cases", "add", "--library", str(library), "--image", str(image), "--label", str(label),
                          "--modality", "CT", "--source", "scanner 3"])
    assert status == 0
    first = done_outputs(events)
    assert first["case"] == "thorax CT ü" and first["split"] == "train"
    status, events = cli(["cases", "add", "--library", str(library), "--image", str(image), "--label", str(label),
                          "--modality", "CT", "--split", "test", "--provenance", "correction"])
    second = done_outputs(events)
    assert status == 0 and second["case"] != first["case"]  # never overwrites another case
    manifest = json.loads((library / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert manifest["format_version"] == FORMAT_VERSION
    entry = manifest["cases"][0]
    assert entry["images"] == {"CT": entry["images"]["CT"]} and not Path(entry["label"]).is_absolute()
    assert entry["provenance"]["from"] == "import" and entry["provenance"]["source"] == "scanner 3"
    assert manifest["cases"][1]["provenance"]["from"] == "correction"
    # The copies are the same bytes as the inputs, inside the library.
    case = CaseLibrary(library).get(first["case"])
    assert case.image_paths[0].read_bytes() == image.read_bytes()
    assert case.label_path.read_bytes() == label.read_bytes()
    assert library.resolve() in case.label_path.resolve().parents

    status, events = cli(["cases", "list", "--library", str(library)])
    listed = done_outputs(events)
    assert status == 0 and listed["count"] == 2 and listed["splits"] == {"train": 1, "val": 0, "test": 1, "unlabelled": 0}
    assert [c["id"] for c in listed["cases"]] == [first["case"], second["case"]]
    status, events = cli(["cases", "split", "--library", str(library), "--id", second["case"], "--split", "val"])
    assert status == 0 and CaseLibrary(library).get(second["case"]).split == "val"
    status, events = cli(["cases", "list", "--library", str(library), "--split", "val"])
    assert [c["id"] for c in done_outputs(events)["cases"]] == [second["case"]]

    status, events = cli(["cases", "remove", "--library", str(library), "--id", first["case"]])
    assert status == 0 and not case.image_paths[0].exists() and not case.label_path.parent.exists()
    assert [c.id for c in CaseLibrary(library).cases()] == [second["case"]]
    status, events = cli(["cases", "remove", "--library", str(library), "--id", first["case"]])
    assert status == 2 and error_code(events) == "CASE_NOT_FOUND"


def test_text_list_prints_a_table(chest_files, tmp_path, capsys):
    from MedTuningLib.cli import main

    image, label = chest_files
    library = tmp_path / "lib"
    CaseLibrary(library).add([image], label, ["CT"], case_id="chest")
    capsys.readouterr()
    assert main(["cases", "list", "--library", str(library)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["id", "split", "modalities", "from", "added", "correction", "effort"]
    assert "chest" in out and "train" in out


def test_explicit_duplicate_id_and_bad_inputs_leave_library_unchanged(cli, chest_files, tmp_path):
    image, label = chest_files
    library = tmp_path / "lib"
    base = ["cases", "add", "--library", str(library), "--image", str(image)]
    assert cli([*base, "--label", str(label), "--id", "p1"])[0] == 0
    before = snapshot(library)
    status, events = cli([*base, "--label", str(label), "--id", "p1"])
    assert status == 2 and error_code(events) == "CASE_EXISTS"
    status, events = cli([*base, "--label", str(tmp_path / "nope.seg.nrrd")])
    assert error_code(events) == "FILE_NOT_FOUND"
    other = sitk.Image(10, 10, 10, sitk.sitkUInt8)
    other[5, 5, 5] = 1
    wrong_grid = tmp_path / "wrong grid.nii.gz"
    sitk.WriteImage(other, str(wrong_grid))
    status, events = cli([*base, "--label", str(wrong_grid)])
    assert error_code(events) == "LABEL_GRID_MISMATCH"
    empty = sitk.Image(128, 128, 34, sitk.sitkUInt8)
    empty.CopyInformation(sitk.ReadImage(str(image)))
    empty_path = tmp_path / "empty.nrrd"
    sitk.WriteImage(empty, str(empty_path))
    status, events = cli([*base, "--label", str(empty_path)])
    assert error_code(events) == "EMPTY_LABEL"
    status, events = cli([*base, "--image", str(image), "--label", str(label), "--modality", "CT"])
    assert error_code(events) == "MODALITY_COUNT_MISMATCH"
    assert snapshot(library) == before


def test_escape_paths_refused(tmp_path):
    library = tmp_path / "lib"
    library.mkdir()
    outside = tmp_path / "secret.nrrd"
    outside.write_text("x", encoding="utf-8")
    (library / "link.nrrd").symlink_to(outside)
    for rel in ["../secret.nrrd", str(outside), "cases/../../secret.nrrd", "link.nrrd", ""]:
        manifest = {"format_version": 1, "cases": [{"id": "a", "images": {"CT": rel}, "label": "cases/a/l.nrrd",
                                                    "split": "train", "provenance": {}}]}
        (library / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")
        with pytest.raises(MedTuningError) as info:
            CaseLibrary(library).cases()
        assert info.value.code == "PATH_ESCAPES_LIBRARY", rel


def test_broken_and_newer_manifests(cli, tmp_path):
    library = tmp_path / "lib"
    library.mkdir()
    (library / MANIFEST_NAME).write_text("{ not json", encoding="utf-8")
    status, events = cli(["cases", "list", "--library", str(library)])
    assert status == 2 and error_code(events) == "LIBRARY_INVALID"
    (library / MANIFEST_NAME).write_text(json.dumps({"format_version": FORMAT_VERSION + 1, "cases": []}), encoding="utf-8")
    status, events = cli(["cases", "list", "--library", str(library)])
    assert error_code(events) == "LIBRARY_TOO_NEW"
    (library / MANIFEST_NAME).write_text(json.dumps({"format_version": 1, "cases": [
        {"id": "a", "images": {"CT": "a.nrrd"}, "label": "l.nrrd", "split": "holdout"}]}), encoding="utf-8")
    assert error_code(cli(["cases", "list", "--library", str(library)])[1]) == "LIBRARY_INVALID"
    status, events = cli(["cases", "list", "--library", str(tmp_path / "absent")])
    assert error_code(events) == "FILE_NOT_FOUND"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert done_outputs(cli(["cases", "list", "--library", str(empty)])[1])["count"] == 0


def test_concurrent_change_is_refused_while_locked(cli, chest_files, tmp_path):
    image, label = chest_files
    library = tmp_path / "lib"
    CaseLibrary(library).add([image], label, ["CT"], case_id="one")
    before = snapshot(library)
    # flock locks belong to an open file: a second open in this process conflicts like another process would.
    with FileLock(library / LOCK_NAME, code="LIBRARY_LOCKED", what="case library"):
        status, events = cli(["cases", "add", "--library", str(library), "--image", str(image),
                              "--label", str(label)])
        assert status == 2 and error_code(events) == "LIBRARY_LOCKED"
        assert error_code(cli(["cases", "remove", "--library", str(library), "--id", "one"])[1]) == "LIBRARY_LOCKED"
    assert snapshot(library) == before
    assert cli(["cases", "remove", "--library", str(library), "--id", "one"])[0] == 0


def test_interrupted_add_leaves_manifest_intact(chest_files, tmp_path, monkeypatch):
    image, label = chest_files
    library = CaseLibrary(tmp_path / "lib")
    library.add([image], label, ["CT"], case_id="one")
    before = (library.root / MANIFEST_NAME).read_bytes()
    import MedTuningLib.cases as cases_module

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cases_module, "write_json_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        library.add([image], label, ["CT"], case_id="two")
    monkeypatch.undo()
    assert (library.root / MANIFEST_NAME).read_bytes() == before
    assert [c.id for c in library.cases()] == ["one"]
    assert library.add([image], label, ["CT"], case_id="two").id == "two"  # the orphan folder is not reused
    assert len({c.label_path.parent for c in library.cases()}) == 2


def test_staging_folder_of_a_killed_add_is_cleaned_by_the_next_add(chest_files, tmp_path):
    image, label = chest_files
    library = CaseLibrary(tmp_path / "lib")
    library.add([image], label, ["CT"], case_id="one")
    orphan = library.root / "cases" / ".adding-killed"  # what a kill during the copy leaves
    orphan.mkdir()
    (orphan / "ct.nrrd").write_bytes(b"half a copy")
    library.add([image], label, ["CT"], case_id="two")
    assert not orphan.exists()
    assert [c.id for c in library.cases()] == ["one", "two"] and all(c.label_path.is_file() for c in library.cases())


_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)
_rel = st.lists(st.text(st.characters(whitelist_categories=("L", "N"), whitelist_characters=" _-é"),
                        min_size=1, max_size=12), min_size=1, max_size=3).map(lambda parts: "/".join(parts))
_case = st.builds(lambda cid, mods, label, split, src: Case(id=cid, images={m: f"cases/{r}" for m, r in mods.items()},
                                                            label=f"cases/{label}", split=split,
                                                            provenance={"added": "2024-01-01T00:00:00+00:00",
                                                                        "from": "scene", "source": src}),
                  _text, st.dictionaries(_text, _rel, min_size=1, max_size=4), _rel,
                  st.sampled_from(["train", "val", "test"]), _text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_case, max_size=5, unique_by=lambda c: c.id))
def test_manifest_round_trip(tmp_path, cases):
    text = json.dumps(manifest_to_dict(cases), ensure_ascii=False)
    parsed = parse_manifest(json.loads(text), tmp_path)
    assert [c.to_dict() for c in parsed] == [c.to_dict() for c in cases]
    assert all(p.image_paths == [tmp_path / r for r in c.images.values()] for p, c in zip(parsed, cases))
