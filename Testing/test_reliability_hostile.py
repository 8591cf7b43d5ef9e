"""Issue 15: hostile or careless values where they enter — numbers (options, manifest fields), strings that
reach file formats (segment names, terminology), configuration that could make a library load a file
(backbone keyword arguments), and operating-system failures (disk full, permission, path too long).
Each case ends with a coded error, exit status 2 or 3, and nothing half-written.
"""

from __future__ import annotations

import errno
import json
import pickle
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch

from engine_helpers import TINY_TRAIN, blob_volume, make_blob_library, write_blob_case
from test_reliability_inputs import _Evil, assert_ok, assert_refused, snapshot

QUICK = ["--epochs", "1", "--steps-per-epoch", "1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from conftest import run_cli

    root = tmp_path_factory.mktemp("hostile")
    library = make_blob_library(run_cli, root, n_train=2, n_test=1)
    model = root / "model"
    assert_ok(run_cli(["train", "--library", str(library), "--out", str(model), "--labels", "Blob=1", *TINY_TRAIN,
                       *QUICK]))
    image, label = write_blob_case(root / "src", "scan", seed=5)
    return {"root": root, "library": library, "model": model, "image": image, "label": label}


@pytest.fixture
def model_copy(world, tmp_path):
    copy = tmp_path / "model copy"
    shutil.copytree(world["model"], copy)
    return copy


def train(cli, library: Path, out: Path, *extra: str, args: list[str] | None = None):
    return cli(["train", "--library", str(library), "--out", str(out), "--labels", "Blob=1",
                *(args if args is not None else TINY_TRAIN), *QUICK, *extra])


def with_option(option: str, value: str) -> list[str]:
    """TINY_TRAIN with ``option`` set to ``value`` (replaced where TINY_TRAIN has it)."""
    args = list(TINY_TRAIN)
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    return args


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was written"
    partial = out.with_name(out.name + ".partial")
    assert not partial.exists(), f"{partial} was left: {sorted(p.name for p in partial.iterdir())}"


def edit_manifest(folder: Path, change) -> None:
    path = folder / "medtuning.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def segment(cli, world, model: Path, out: Path, *extra: str):
    return cli(["segment", "--model", str(model), "--image", str(world["image"]), "--out", str(out), "--device", "cpu",
                *extra])


# ------------------------------------------------------------------------------------------------
# finite or refused: numbers checked where they enter
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option,value", [
    ("--lr", "inf"), ("--lr", "nan"), ("--lr", "-1"), ("--weight-decay", "nan"), ("--weight-decay", "-1"),
    ("--weight-decay", "inf"), ("--minutes", "inf"), ("--alpha", "inf"), ("--alpha", "nan"), ("--workers", "-3"),
    ("--warmup-epochs", "-2"), ("--crop", "4x99999x99999"), ("--lr", "1e39"), ("--weight-decay", "1e39")])
def test_train_refuses_numbers_out_of_range_before_anything_is_written(option, value, world, tmp_path, cli):
    out = tmp_path / "model"
    assert_refused(train(cli, world["library"], out, args=with_option(option, value)), "USAGE", option)
    assert_nothing_written(out)


@pytest.mark.parametrize("option,value,words", [
    ("--alpha", "1e9", "bottleneck"),  # finite, but no adapter width is left
    ("--crop", "4x36x36", "multiple of the backbone's patch size")])  # patch size 8
def test_train_refuses_sizes_the_model_cannot_have(option, value, words, world, tmp_path, cli):
    out = tmp_path / "model"
    assert_refused(train(cli, world["library"], out, args=with_option(option, value)), "INVALID_OPTION", words)
    assert_nothing_written(out)


@pytest.mark.parametrize("command,option,value", [
    ("segment", "--overlap", "1.5"), ("segment", "--overlap", "nan"), ("segment", "--overlap", "-0.1"),
    ("segment", "--min-component", "-1"), ("evaluate", "--overlap", "1"), ("evaluate", "--overlap", "inf")])
def test_inference_options_out_of_range(command, option, value, world, tmp_path, cli):
    out = tmp_path / "r.seg.nrrd"
    if command == "segment":
        result = segment(cli, world, world["model"], out, option, value)
    else:
        result = cli(["evaluate", "--model", str(world["model"]), "--library", str(world["library"]), "--report",
                      str(tmp_path / "report"), option, value])
    assert_refused(result, "USAGE", option)
    assert not out.exists() and not (tmp_path / "report").exists()


def test_weights_that_become_non_finite_stop_the_run_and_publish_nothing(world, tmp_path, cli, monkeypatch):
    """Reproduction 2: the loss is computed before the update, so a run whose update made the weights NaN/Inf
    (``--lr inf``, now refused where it enters) was saved as a success. Whatever makes an update diverge
    (simulated here: the optimiser's step leaves an infinite weight), the run stops and publishes nothing."""
    real_step = torch.optim.Adam.step

    def diverging_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", diverging_step)
    out = tmp_path / "model"
    before = snapshot(world["library"])
    last = assert_refused(train(cli, world["library"], out), "TRAINING_DIVERGED", "weights", status=3)
    assert "--lr" in last["hint"]
    assert_nothing_written(out)
    assert snapshot(world["library"]) == before


def test_model_manifests_are_strict_json(world, tmp_path):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    json.loads((world["model"] / "medtuning.json").read_text(encoding="utf-8"), parse_constant=refuse)
    from MedTuningLib.errors import MedTuningError
    from MedTuningLib.fileio import write_json_atomic

    target = tmp_path / "x.json"
    with pytest.raises(MedTuningError) as info:
        write_json_atomic(target, {"lr": float("inf")})
    assert info.value.code == "INTERNAL_ERROR" and not target.exists() and not list(tmp_path.iterdir())


def test_all_files_of_a_model_folder_have_the_same_permissions(world):
    """A shared model folder: weights.safetensors was written 0600 (mkstemp) while the rest was 0644."""
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in world["model"].iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes
    assert modes["weights.safetensors"] & stat.S_IRGRP


@pytest.mark.parametrize("damage,code", [
    ("crop is text", "MODEL_FOLDER_INVALID"), ("crop absurdly large", "MODEL_FOLDER_INVALID"),
    ("architecture is text", "MODEL_FOLDER_INVALID"), ("backbone_kwargs is text", "INVALID_OPTION"),
    ("alpha is text", "INVALID_OPTION"), ("img_size is huge", "INVALID_OPTION"),
    ("format_version -5", "MODEL_FOLDER_INVALID"), ("format_version 1.0", "MODEL_FOLDER_INVALID"),
    ("colour NaN", "LABEL_SPEC_INVALID"), ("CT window text", "MODEL_FOLDER_INVALID"),
    ("CT mean infinite", "MODEL_FOLDER_INVALID"), ("orientation unknown", "MODEL_FOLDER_INVALID"),
    ("flip axis 7", "MODEL_FOLDER_INVALID"), ("arch an object", "UNKNOWN_ARCH")])
def test_model_folder_fields_of_the_wrong_type_or_range(damage, code, world, model_copy, tmp_path, cli):
    def change(data):
        arch = data["architecture"]
        if damage == "crop is text":
            data["crop"] = "16x128x128"
        elif damage == "crop absurdly large":
            data["crop"] = [10 ** 9, 32, 32]
        elif damage == "architecture is text":
            data["architecture"] = "vit_upernet"
        elif damage == "backbone_kwargs is text":
            arch["backbone_kwargs"] = "depth=4"
        elif damage == "alpha is text":
            arch["adapter"]["alpha"] = "six"
        elif damage == "img_size is huge":
            arch["img_size"] = 10 ** 9
        elif damage == "format_version -5":
            data["format_version"] = -5
        elif damage == "format_version 1.0":
            data["format_version"] = 1.0
        elif damage == "colour NaN":
            data["label_scheme"]["segments"][0]["color"] = ["NaN", 0, 0]
        elif damage == "CT window text":
            data["preprocessing"]["ct_clip"] = ["a", "b"]
        elif damage == "CT mean infinite":
            data["preprocessing"]["ct_mean"] = float("inf")
        elif damage == "orientation unknown":
            data["preprocessing"]["orientation"] = 5
        elif damage == "flip axis 7":
            data["flip_axes"] = [7]
        else:
            arch["arch"] = {"a": 1}

    edit_manifest(model_copy, change)
    out = tmp_path / "r.seg.nrrd"
    assert_refused(segment(cli, world, model_copy, out), code)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# strings that reach file formats
# ------------------------------------------------------------------------------------------------

HOSTILE_NAME = "Spleen\nencoding: raw"


def test_a_newline_in_a_labels_name_is_refused_at_the_command_line(world, tmp_path, cli):
    """Reproduction 3: ``--labels $'Spleen\\nencoding: raw=1'`` trained, and the .seg.nrrd could not be read."""
    out = tmp_path / "model"
    result = cli(["train", "--library", str(world["library"]), "--out", str(out), "--labels", f"{HOSTILE_NAME}=1",
                  *TINY_TRAIN, *QUICK])
    assert_refused(result, "LABEL_SPEC_INVALID", "control character")
    assert_nothing_written(out)


@pytest.mark.parametrize("where", ["segment name", "terminology", "region name"])
def test_a_model_folder_with_a_crafted_name_is_refused_when_read(where, world, model_copy, tmp_path, cli):
    def change(data):
        scheme = data["label_scheme"]
        if where == "segment name":
            scheme["segments"][0]["name"] = scheme["classes"][0]["name"] = scheme["regions"][0]["name"] = HOSTILE_NAME
        elif where == "terminology":
            scheme["segments"][0]["terminology"]["type"] = ["SCT", "85756007", "Tissue~SCT^1^x|Segment1_Name:=y"]
        else:
            scheme["regions"][0]["name"] = "Blob\rtype: int"

    edit_manifest(model_copy, change)
    out = tmp_path / "r.seg.nrrd"
    assert_refused(segment(cli, world, model_copy, out), "LABEL_SPEC_INVALID")
    assert not out.exists()
    warm = tmp_path / "warm"
    assert_refused(train(cli, world["library"], warm, "--init-from", str(model_copy)), "LABEL_SPEC_INVALID")
    assert_nothing_written(warm)


def _seg_with_names(path: Path, names: list[str], reference: sitk.Image) -> Path:
    """A .seg.nrrd whose segment names are written as given (slicerio writes them verbatim)."""
    arr = sitk.GetArrayFromImage(reference).astype(bool)
    seg = slicerio.create_segmentation(reference.GetSize(), np.eye(4), dtype="uint8")
    for i, name in enumerate(names, start=1):
        mask = np.zeros_like(arr)
        mask[i::3] = arr[i::3]
        slicerio.add_segment(seg, mask.transpose(2, 1, 0).astype(np.uint8), {"id": f"Segment_{i}", "name": name})
    slicerio.write_segmentation(str(path), seg)
    return path


@pytest.mark.parametrize("names,words", [(["Blob", "blob"], "two segments named"),
                                         (["Bl\x1bob"], "control character"), (["Blob\tx"], "control character")])
def test_cases_add_refuses_segment_names_that_would_break_files_and_names_the_file(names, words, world, tmp_path, cli):
    image, _ = blob_volume(shape=(8, 40, 40))
    image_path = tmp_path / "img.nrrd"
    sitk.WriteImage(image, str(image_path))
    label = _seg_with_names(tmp_path / "label.seg.nrrd", names, sitk.Cast(image > 150, sitk.sitkUInt8))
    library = tmp_path / "lib"
    last = assert_refused(cli(["cases", "add", "--library", str(library), "--image", str(image_path), "--label",
                               str(label), "--modality", "MR"]), "LABEL_SPEC_INVALID", words)
    assert "label.seg.nrrd" in last["message"]
    assert not (library / "cases.json").exists() or json.loads((library / "cases.json").read_text())["cases"] == []


# ------------------------------------------------------------------------------------------------
# no code or pickles through configuration
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def no_unpickling(monkeypatch, tmp_path):
    """torch.load / pickle.load raise if reached; returns the calls and a hostile checkpoint file."""
    calls = []

    def trap(*args, **kwargs):
        calls.append(args)
        raise AssertionError("torch.load / pickle.load reached")

    monkeypatch.setattr(torch, "load", trap)
    monkeypatch.setattr(pickle, "load", trap)
    monkeypatch.setattr(pickle, "loads", trap)
    marker = tmp_path / "EXECUTED"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as fh:
        pickle.dump({"payload": _Evil(marker)}, fh)
    return calls, evil, marker


@pytest.mark.parametrize("key", ["checkpoint_path", "pretrained_cfg_overlay", "pretrained_cfg"])
def test_a_model_folder_cannot_make_timm_load_a_file(key, world, model_copy, tmp_path, cli, no_unpickling):
    """Reproduction 4: ``checkpoint_path`` in a model folder's backbone_kwargs made timm torch.load it."""
    calls, evil, marker = no_unpickling
    value = str(evil) if key == "checkpoint_path" else {"file": str(evil)}
    edit_manifest(model_copy, lambda data: data["architecture"]["backbone_kwargs"].update({key: value}))
    out = tmp_path / "r.seg.nrrd"
    assert_refused(segment(cli, world, model_copy, out), "UNSAFE_FILE", key)
    warm = tmp_path / "warm"
    assert_refused(train(cli, world["library"], warm, "--init-from", str(model_copy)), "UNSAFE_FILE")
    assert not calls and not marker.exists() and not out.exists()
    assert_nothing_written(warm)


@pytest.mark.parametrize("extra,code", [("checkpoint_path={evil}", "UNSAFE_FILE"),
                                        ("pretrained_cfg_overlay={evil}", "UNSAFE_FILE"),
                                        ("cache_dir=/tmp", "UNSAFE_FILE"),
                                        ("depth=nan", "INVALID_OPTION"), ("mlp_ratio=inf", "INVALID_OPTION"),
                                        ("global_pool=token", "UNSAFE_FILE"), ("weight_init=1", "INVALID_OPTION")])
def test_backbone_args_pass_an_allow_list(extra, code, world, tmp_path, cli, no_unpickling):
    calls, evil, marker = no_unpickling
    args = with_option("--backbone-args", "depth=4,embed_dim=48,num_heads=2,patch_size=8," + extra.format(evil=evil))
    out = tmp_path / "model"
    assert_refused(train(cli, world["library"], out, args=args), code)
    assert not calls and not marker.exists()
    assert_nothing_written(out)


# ------------------------------------------------------------------------------------------------
# every operating-system failure has a code; nothing half-written
# ------------------------------------------------------------------------------------------------

def _hidden_leftovers(*folders: Path) -> list[str]:
    return [str(p) for folder in folders if folder.exists() for p in folder.rglob(".*") if ".tmp" in p.name]


def test_disk_full_while_training_leaves_no_model_and_no_half_written_file(world, tmp_path, cli, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def full_on_final(tensors, filename, metadata=None):
        if "weights.safetensors" in Path(filename).name:  # the model itself, after resumable states were saved
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_on_final)
    out = tmp_path / "model"
    last = assert_refused(train(cli, world["library"], out), "DISK_FULL", "full", status=3)
    assert "--resume" in last["hint"]
    assert not out.exists()
    partial = out.with_name("model.partial")
    assert (partial / "state.json").is_file() and not (partial / "weights.safetensors").exists()
    assert not _hidden_leftovers(tmp_path)


def test_disk_full_at_the_first_save_leaves_nothing(world, tmp_path, cli, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):  # what the Rust writer raises on a full disk
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" }) (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "model"
    assert_refused(train(cli, world["library"], out), "DISK_FULL", status=3)
    assert_nothing_written(out)


def test_disk_full_during_cases_add_leaves_the_library_unchanged(world, tmp_path, cli, monkeypatch):
    library = tmp_path / "lib"
    assert_ok(cli(["cases", "add", "--library", str(library), "--image", str(world["image"]), "--label",
                   str(world["label"]), "--modality", "MR", "--id", "first"]))
    before = snapshot(library)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full)
    assert_refused(cli(["cases", "add", "--library", str(library), "--image", str(world["image"]), "--label",
                        str(world["label"]), "--modality", "MR", "--id", "second"]), "DISK_FULL", status=3)
    assert snapshot(library) == before


def test_disk_full_while_writing_a_report(world, tmp_path, cli, monkeypatch):
    import os

    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    report = tmp_path / "report"
    assert_refused(cli(["evaluate", "--model", str(world["model"]), "--library", str(world["library"]), "--report",
                        str(report), "--device", "cpu"]), "DISK_FULL", status=3)
    monkeypatch.setattr(os, "fsync", real)
    assert not report.exists() and not _hidden_leftovers(tmp_path)


def test_permission_denied_when_publishing_a_result(world, tmp_path, cli, monkeypatch):
    """Tests run as root, which ignores permissions: the refusal is simulated where the system reports it."""
    import os

    def denied(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", denied)
    out = tmp_path / "r.seg.nrrd"
    assert_refused(segment(cli, world, world["model"], out), "OUTPUT_NOT_WRITABLE", "permission")
    assert not out.exists() and not _hidden_leftovers(tmp_path)


@pytest.mark.parametrize("command", ["train", "segment", "cases add", "evaluate"])
def test_names_longer_than_the_file_system_allows(command, world, tmp_path, cli):
    long = "x" * 300  # a name component beyond NAME_MAX (255): a real ENAMETOOLONG from the file system
    if command == "train":
        result = train(cli, world["library"], tmp_path / long)
    elif command == "segment":
        result = segment(cli, world, world["model"], tmp_path / f"{long}.seg.nrrd")
    elif command == "cases add":
        result = cli(["cases", "add", "--library", str(tmp_path / long), "--image", str(world["image"]),
                      "--label", str(world["label"]), "--modality", "MR"])
    else:
        result = cli(["evaluate", "--model", str(world["model"]), "--library", str(world["library"]), "--report",
                      str(tmp_path / long), "--device", "cpu"])
    assert_refused(result, "PATH_TOO_LONG")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# the weaker spots of the issue: each a clear code
# ------------------------------------------------------------------------------------------------

def _sheared_nrrd(path: Path) -> Path:
    """A real NRRD whose voxel axes are not perpendicular (ITK reads it without a word)."""
    voxels = np.random.default_rng(0).normal(100, 10, (8, 40, 40)).astype("<f4")
    header = ("NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 40 40 8\n"
              "space directions: (1,0,0) (0.5,1,0) (0,0,1.2)\nkinds: domain domain domain\nendian: little\n"
              "encoding: raw\nspace origin: (0,0,0)\n\n")
    path.write_bytes(header.encode() + voxels.tobytes())
    return path


def _nifti(path: Path, qform_code: int, sform_code: int, srow: list[tuple[float, ...]],
           qoffset: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Path:
    """A real NIfTI-1 file (written by SimpleITK) with its qform / sform fields set as given."""
    import struct

    image, _ = blob_volume(shape=(8, 40, 40), spacing=(1.0, 1.0, 1.0))
    sitk.WriteImage(image, str(path))
    header = bytearray(path.read_bytes())
    struct.pack_into("<hh", header, 252, qform_code, sform_code)
    struct.pack_into("<3f", header, 268, *qoffset)
    for i, row in enumerate(srow):
        struct.pack_into("<4f", header, 280 + 16 * i, *row)
    path.write_bytes(bytes(header))
    return path


def _add(cli, library: Path, image: Path, label: Path | None = None):
    return cli(["cases", "add", "--library", str(library), "--image", str(image), "--label",
                str(label if label is not None else image), "--modality", "MR"])


@pytest.mark.parametrize("kind", ["nrrd", "nifti"])
def test_a_sheared_grid_is_named_as_such(kind, world, tmp_path, cli):
    if kind == "nrrd":
        image = _sheared_nrrd(tmp_path / "sheared.nrrd")
    else:  # ITK refuses it ("orthonormal"), which was reported as "truncated, corrupt or not an image"
        image = _nifti(tmp_path / "sheared.nii", 0, 1, [(1, 0.5, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0)])
    assert_refused(_add(cli, tmp_path / "lib", image), "IMAGE_GRID_SHEARED", "not perpendicular")
    out = tmp_path / "r.seg.nrrd"
    assert_refused(cli(["segment", "--model", str(world["model"]), "--image", str(image), "--out", str(out)]),
                   "IMAGE_GRID_SHEARED")
    assert not out.exists() and not (tmp_path / "lib").exists()


def test_a_nifti_whose_qform_and_sform_disagree_is_refused(world, tmp_path, cli):
    """qform and sform 10 mm apart: readers differ in which one they use, so MedTuning does not guess."""
    image = _nifti(tmp_path / "two-places.nii", 1, 1, [(-1, 0, 0, 10), (0, -1, 0, 0), (0, 0, 1, 0)])
    assert_refused(_add(cli, tmp_path / "lib", image), "IMAGE_GEOMETRY_AMBIGUOUS", "10.0 mm")
    agreeing = _nifti(tmp_path / "one-place.nii", 1, 1, [(-1, 0, 0, 0), (0, -1, 0, 0), (0, 0, 1, 0)])
    _, label = blob_volume(shape=(8, 40, 40), spacing=(1.0, 1.0, 1.0))
    label.CopyInformation(sitk.ReadImage(str(agreeing)))
    sitk.WriteImage(label, str(tmp_path / "label.nrrd"))
    assert_ok(_add(cli, tmp_path / "lib", agreeing, tmp_path / "label.nrrd"))


def test_an_empty_label_names_the_values_it_holds(world, tmp_path, cli):
    library = tmp_path / "lib"
    image, label = blob_volume(shape=(8, 40, 40))
    values = sitk.GetArrayFromImage(label) * 255
    for i in range(2):
        relabelled = sitk.GetImageFromArray(values.astype(np.uint8))
        relabelled.CopyInformation(label)
        sitk.WriteImage(image, str(tmp_path / f"img{i}.nrrd"))
        sitk.WriteImage(relabelled, str(tmp_path / f"lab{i}.nrrd"))
        assert_ok(_add(cli, library, tmp_path / f"img{i}.nrrd", tmp_path / f"lab{i}.nrrd"))
    last = assert_refused(train(cli, library, tmp_path / "model"), "EMPTY_LABEL", "255", "Blob=1")
    assert "255" in last["hint"]
    assert_nothing_written(tmp_path / "model")


def test_negative_label_values_are_refused_not_taken_as_background(tmp_path, cli):
    from MedTuningLib.data.labels import scheme_from_spec
    from MedTuningLib.errors import MedTuningError

    image, label = blob_volume(shape=(8, 40, 40))
    values = sitk.GetArrayFromImage(label).astype(np.int16)
    values[0, :5, :5] = -1
    negative = sitk.GetImageFromArray(values)
    negative.CopyInformation(label)
    sitk.WriteImage(image, str(tmp_path / "img.nrrd"))
    sitk.WriteImage(negative, str(tmp_path / "lab.nrrd"))
    assert_refused(_add(cli, tmp_path / "lib", tmp_path / "img.nrrd", tmp_path / "lab.nrrd"), "UNKNOWN_LABEL_VALUES",
                   "negative")
    with pytest.raises(MedTuningError) as info:  # a library file changed after it was added
        scheme_from_spec("Blob=1").encode(values)
    assert info.value.code == "UNKNOWN_LABEL_VALUES" and "-1" in info.value.message


def test_sigint_during_cases_add_stops_it_and_leaves_the_library_unchanged(world, tmp_path, cli, monkeypatch):
    import signal

    library = tmp_path / "lib"
    assert_ok(cli(["cases", "add", "--library", str(library), "--image", str(world["image"]), "--label",
                   str(world["label"]), "--modality", "MR", "--id", "first"]))
    before = snapshot(library)
    real = shutil.copyfile

    def interrupted(src, dst, *args, **kwargs):  # Ctrl-C arrives while the files are being copied
        result = real(src, dst, *args, **kwargs)
        signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(shutil, "copyfile", interrupted)
    status, events = cli(["cases", "add", "--library", str(library), "--image", str(world["image"]), "--label",
                          str(world["label"]), "--modality", "MR", "--id", "second"])
    assert status == 130 and events[-1] == {**events[-1], "event": "done", "status": "cancelled"}, events[-2:]
    assert snapshot(library) == before


def test_names_that_the_nrrd_writer_cannot_write_are_refused_before_training(world, tmp_path, cli):
    """The NRRD library behind slicerio writes ASCII headers: a name with an accent trained for as long as
    asked and then failed when the result was written."""
    out = tmp_path / "model"
    assert_refused(cli(["train", "--library", str(world["library"]), "--out", str(out), "--labels", "Rein é=1",
                        *TINY_TRAIN, *QUICK]), "LABEL_SPEC_INVALID", "ascii")
    assert_nothing_written(out)


def test_provenance_fields_of_a_result_cannot_add_header_lines(tmp_path):
    """Text MedTuning puts into a .seg.nrrd header (model name, DICOM descriptions) is one ASCII line."""
    from MedTuningLib.segio import write_segmentation

    image, label = blob_volume(shape=(8, 40, 40))
    out = tmp_path / "r.seg.nrrd"
    write_segmentation(out, {"Blob": sitk.GetArrayFromImage(label).astype(bool)}, image,
                       header={"MedTuning_Model": "modèle à moi\nencoding: raw", "Bad key: x": "v"})
    seg = slicerio.read_segmentation(str(out))
    assert seg["MedTuning_Model"] == "mod\\xe8le \\xe0 moi encoding: raw"
    assert [s["name"] for s in seg["segments"]] == ["Blob"] and seg["voxels"].any()


@pytest.mark.parametrize("version", [-5, 1.0, "2", True])
def test_a_case_library_with_a_format_version_of_the_wrong_type_or_range(version, world, tmp_path, cli):
    library = tmp_path / "lib"
    shutil.copytree(world["library"], library)
    manifest = json.loads((library / "cases.json").read_text(encoding="utf-8"))
    manifest["format_version"] = version
    (library / "cases.json").write_text(json.dumps(manifest), encoding="utf-8")
    before = snapshot(library)
    assert_refused(cli(["cases", "list", "--library", str(library)]), "LIBRARY_INVALID", "format_version")
    assert_refused(train(cli, library, tmp_path / "model"), "LIBRARY_INVALID")
    assert snapshot(library) == before
    assert_nothing_written(tmp_path / "model")


@pytest.mark.parametrize("argv", [["params", "--arch", "vit_upernet", "--alpha", "inf"],
                                  ["params", "--arch", "vit_upernet", "--backbone-args", "checkpoint_path=x.pth"],
                                  ["bench", "train", "--crop", "4x99999x99999"]])
def test_other_commands_share_the_checks(argv, cli):
    status, events = cli(argv)
    assert status == 2 and events[-1]["event"] == "error" and events[-1]["code"] in ("USAGE", "UNSAFE_FILE"), events[-1]
