"""Warm start / re-tune take their setup from the model folder: label scheme (custom mapping, segment
subset, BraTS source convention), modalities, preprocessing, architecture and base weights. Each test
records the class maps the re-tune really trains on (the engine's case reader, wrapped), not only the
exit status."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from engine_helpers import TINY_TRAIN, blob_volume

import MedTuningLib.engine.train_data as train_module  # where the training run reads its cases

QUICK = ["--epochs", "1", "--steps-per-epoch", "1"]


def done(events):
    assert events[-1]["event"] == "done", events[-1]
    return events[-1]["outputs"]


def _two_blob_case(folder: Path, name: str, seed: int, second_value: int = 2, extra_value: int | None = None):
    """An image with two bright blobs: label value 1 on the left one, ``second_value`` on the right one."""
    img, lab = blob_volume(seed=seed, centre=(4, 20, 12), radius=6.0)
    _, lab2 = blob_volume(seed=seed, centre=(4, 20, 28), radius=5.0)
    image = sitk.GetArrayFromImage(img) + 80.0 * sitk.GetArrayFromImage(lab2)
    label = sitk.GetArrayFromImage(lab).astype(np.uint8)
    label[sitk.GetArrayFromImage(lab2) > 0] = second_value
    if extra_value is not None:
        label[0, 0, 0] = extra_value
    out_img, out_lab = sitk.GetImageFromArray(image.astype(np.float32)), sitk.GetImageFromArray(label)
    for im in (out_img, out_lab):
        im.CopyInformation(img)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / f"{name}.nrrd", folder / f"{name}-label.nrrd"
    sitk.WriteImage(out_img, str(paths[0]), True)
    sitk.WriteImage(out_lab, str(paths[1]), True)
    return paths


def _add(cli, library: Path, image: Path, label: Path, split: str, case_id: str) -> None:
    status, events = cli(["cases", "add", "--library", str(library), "--image", str(image), "--label", str(label),
                          "--modality", "MR", "--split", split, "--id", case_id])
    assert status == 0, events[-1]


@pytest.fixture
def trained_labels(monkeypatch):
    """Record, per case id, the class values of every label the training engine reads."""
    seen: dict[str, set] = {}
    original = train_module.read_raw_case

    def recording(case, scheme, *args, **kwargs):
        result = original(case, scheme, *args, **kwargs)
        seen[case.id] = set(np.unique(result["label"]).tolist())
        seen[case.id + "/scheme"] = [(c.name, list(c.source_values)) for c in scheme.classes]
        seen[case.id + "/array"] = result["label"]
        return result

    monkeypatch.setattr(train_module, "read_raw_case", recording)
    return seen


def test_custom_labels_model_retunes_with_its_mapping(cli, tmp_path, trained_labels):
    library = tmp_path / "library"
    for i, split in enumerate(("train", "train", "test")):
        _add(cli, library, *_two_blob_case(tmp_path / "src", f"c{i}", i), split, f"c{i}")
    model = tmp_path / "m0"
    # Only value 2 (the right blob) is a class; value 1 is background for this model.
    status, events = cli(["train", "--library", str(library), "--out", str(model), "--task", "custom",
                          "--labels", "Right blob=2", *TINY_TRAIN, *QUICK])
    assert status == 0, events[-1]
    trained_labels.clear()

    # The Slicer button's warm start: train --init-from with --task custom and no mapping (LABEL_SPEC_INVALID before).
    status, events = cli(["train", "--library", str(library), "--out", str(tmp_path / "m1"), "--task", "custom",
                          "--init-from", str(model), "--device", "cpu", *QUICK])
    assert status == 0, events[-1]
    assert trained_labels["c0/scheme"] == [("Right blob", [2])]
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "src" / "c0-label.nrrd")))
    assert np.array_equal(trained_labels["c0/array"], (raw == 2).astype(np.uint8))  # left blob is background
    assert trained_labels["c2"] == {0, 1}  # the test case is scored with the same mapping

    # retune with nothing but model, library and budget; the new model has the same scheme and preprocessing.
    trained_labels.clear()
    status, events = cli(["retune", "--model", str(tmp_path / "m1"), "--library", str(library), "--epochs", "1",
                          "--steps-per-epoch", "1", "--device", "cpu", "--events", "jsonl"])
    outputs = done(events)
    assert status == 0 and Path(outputs["model"]) == (tmp_path / "m1-round2").absolute() and outputs["round"] == 2
    assert trained_labels["c1/scheme"] == [("Right blob", [2])]
    m0, m2 = (json.loads((p / "medtuning.json").read_text()) for p in (model, tmp_path / "m1-round2"))
    assert m2["label_scheme"] == m0["label_scheme"] and m2["preprocessing"] == m0["preprocessing"]  # not refitted
    assert m2["architecture"] == m0["architecture"] and m2["base_weights"] == m0["base_weights"]
    assert [r["round"] for r in m2["history"]] == [0, 1, 2]
    assert m2["training"]["test_cases"] == ["c2"] and "c2" not in m2["training"]["train_cases"]

    # A contradicting option is refused, not silently used.
    status, events = cli(["retune", "--model", str(model), "--library", str(library), "--weights", "hub",
                          "--device", "cpu", *QUICK])
    assert status == 2 and events[-1]["code"] == "INVALID_OPTION" and "--weights" in events[-1]["message"]
    status, events = cli(["train", "--library", str(library), "--out", str(tmp_path / "x"), "--labels", "Blob=1",
                          "--init-from", str(model), "--device", "cpu", *QUICK])
    assert status == 2 and events[-1]["code"] == "INVALID_OPTION" and "Right blob=2" in events[-1]["message"]
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def _seg_case(folder: Path, name: str, seed: int, names=("Blob", "Other")) -> tuple[Path, Path]:
    from MedTuningLib.data.labels import scheme_from_spec
    from MedTuningLib.segio import write_segmentation

    image_path, label_path = _two_blob_case(folder, name, seed)
    image = sitk.ReadImage(str(image_path))
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    masks = {n: values == v for n, v in zip(names, (1, 2))}
    seg = folder / f"{name}.seg.nrrd"
    write_segmentation(seg, masks, image, scheme_from_spec(";".join(f"{n}={v}" for n, v in zip(names, (1, 2)))))
    return image_path, seg


def test_segment_subset_model_retunes_on_that_subset(cli, tmp_path, trained_labels):
    library = tmp_path / "library"
    for i, split in enumerate(("train", "train", "test")):
        _add(cli, library, *_seg_case(tmp_path / "src", f"s{i}", i), split, f"s{i}")
    model = tmp_path / "subset"
    status, events = cli(["train", "--library", str(library), "--out", str(model), "--segments", "Other",
                          *TINY_TRAIN, *QUICK])
    assert status == 0, events[-1]
    trained_labels.clear()
    status, events = cli(["retune", "--model", str(model), "--library", str(library), "--out", str(tmp_path / "r1"),
                          "--device", "cpu", *QUICK])
    assert status == 0, events[-1]
    assert trained_labels["s0/scheme"] == [("Other", [])]  # by segment name, the subset only
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "src" / "s0-label.nrrd")))
    assert np.array_equal(trained_labels["s0/array"], (raw == 2).astype(np.uint8))  # "Blob" voxels are background

    # A corrected case that lacks the model's segment is refused with a message naming the case.
    image, seg = _seg_case(tmp_path / "src", "bad", 7, names=("Blob", "Renamed"))
    _add(cli, library, image, seg, "train", "bad-case")
    status, events = cli(["retune", "--model", str(model), "--library", str(library), "--out", str(tmp_path / "r2"),
                          "--device", "cpu", "--events", "jsonl", *QUICK])
    error = events[-1]
    assert status == 2 and error["code"] == "SEGMENT_NAMES_MISMATCH" and error["case"] == "bad-case"
    assert "case 'bad-case'" in error["message"] and str(model) in error["message"]
    assert "cases remove --id bad-case" in error["hint"]


def test_brats2023_model_retunes_in_its_convention(cli, tmp_path, trained_labels):
    library = tmp_path / "library"
    # BraTS 2023: 1 NCR, 2 ED, 3 ET (the left blob is NCR, the right one ET).
    for i, split in enumerate(("train", "train", "test")):
        _add(cli, library, *_two_blob_case(tmp_path / "src", f"b{i}", i, second_value=3), split, f"b{i}")
    model = tmp_path / "brats"
    status, events = cli(["train", "--library", str(library), "--out", str(model), "--task", "brats",
                          "--source-labels", "brats2023", *TINY_TRAIN, *QUICK])
    assert status == 0, events[-1]
    trained_in_2023 = dict(trained_labels)
    trained_labels.clear()
    status, events = cli(["retune", "--model", str(model), "--library", str(library), "--out", str(tmp_path / "r1"),
                          "--device", "cpu", *QUICK])
    assert status == 0, events[-1]
    assert trained_labels["b0/scheme"] == trained_in_2023["b0/scheme"]
    assert np.array_equal(trained_labels["b0/array"], trained_in_2023["b0/array"])
    # Under the 2015 default, value 3 would be "non-enhancing" and ET would be empty: check it is the ET class.
    from MedTuningLib.data.labels import scheme_from_preset

    et_class = scheme_from_preset("brats", "brats2023").lookup_table()[3]
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "src" / "b0-label.nrrd")))
    assert np.all(trained_labels["b0/array"][raw == 3] == et_class)
    assert scheme_from_preset("brats", "brats2015").lookup_table().get(3) != et_class

    # A 2015 label (value 4: enhancing) in the library: refused, naming the case, instead of training on it.
    _add(cli, library, *_two_blob_case(tmp_path / "src", "old", 9, second_value=4), "train", "old-2015")
    status, events = cli(["retune", "--model", str(model), "--library", str(library), "--out", str(tmp_path / "r2"),
                          "--device", "cpu", "--events", "jsonl", *QUICK])
    assert status == 2 and events[-1]["code"] == "UNKNOWN_LABEL_VALUES" and events[-1]["case"] == "old-2015"
    # ... and asking for another convention than the model's is refused.
    status, events = cli(["train", "--library", str(library), "--out", str(tmp_path / "r3"), "--init-from", str(model),
                          "--source-labels", "brats2015", "--device", "cpu", *QUICK])
    assert status == 2 and events[-1]["code"] == "INVALID_OPTION" and "brats2023" in events[-1]["message"]


def test_val_split_test_is_refused(cli, tmp_path):
    library = tmp_path / "library"
    _add(cli, library, *_two_blob_case(tmp_path / "src", "c0", 0), "train", "c0")
    status, events = cli(["train", "--library", str(library), "--out", str(tmp_path / "m"), "--labels", "B=1",
                          "--val-split", "test", *TINY_TRAIN, *QUICK])
    assert status == 2 and events[-1]["code"] == "INVALID_OPTION" and "held-out" in events[-1]["message"]
    assert not (tmp_path / "m.partial").exists()
