"""Issue 15, "replacing an output": ``--force`` replaces only an earlier output of the same kind that
MedTuning wrote (a model folder with its manifest, a report / comparison / demo folder, an earlier result
file), never a case library, one of the command's inputs, a folder of other files or a file. Every
command with ``--force`` is tried against a library, an input and a user folder; each refusal is
OUTPUT_NOT_REPLACEABLE, says what the target is, and leaves every byte where it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine_helpers import TINY_TRAIN, make_blob_library, write_blob_case
from test_reliability_inputs import assert_ok, assert_refused, snapshot

QUICK = ["--epochs", "1", "--steps-per-epoch", "1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from conftest import run_cli

    root = tmp_path_factory.mktemp("force")
    library = make_blob_library(run_cli, root, n_train=2, n_test=1)
    model = root / "model"
    assert_ok(run_cli(["train", "--library", str(library), "--out", str(model), "--labels", "Blob=1", *TINY_TRAIN,
                       *QUICK]))
    image, _ = write_blob_case(root / "src", "scan", seed=5)
    return {"root": root, "library": library, "model": model, "image": image}


def user_folder(parent: Path) -> Path:
    folder = parent / "my files"
    folder.mkdir()
    (folder / "thesis.docx").write_bytes(b"only copy")
    (folder / "notes").mkdir()
    (folder / "notes" / "a.txt").write_text("x", encoding="utf-8")
    return folder


def train(cli, library: Path, out: Path, *extra: str):
    return cli(["train", "--library", str(library), "--out", str(out), "--labels", "Blob=1", *TINY_TRAIN, *QUICK,
                *extra])


# ------------------------------------------------------------------------------------------------
# train --out
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("force", [True, False])
def test_train_into_its_own_case_library_is_refused_and_the_library_kept(force, world, tmp_path, cli):
    """Reproduction 1 of the issue: ``train --library LIB2 --out LIB2 --force`` deleted the library."""
    lib2 = tmp_path / "LIB2"
    shutil.copytree(world["library"], lib2)
    before = snapshot(lib2)
    last = assert_refused(train(cli, lib2, lib2, *(["--force"] if force else [])), "OUTPUT_NOT_REPLACEABLE",
                          "case library")
    assert "--force" in last["message"]
    assert snapshot(lib2) == before
    assert not (tmp_path / "LIB2.partial").exists()


@pytest.mark.parametrize("target", ["user folder", "file", "other library", "library parent", "model with extras",
                                    "init-from", "weights file parent", "foreign manifest"])
def test_train_force_never_replaces_what_it_did_not_write(target, world, tmp_path, cli):
    extra = ["--force"]
    library = world["library"]
    if target == "user folder":
        out, words = user_folder(tmp_path), "folder of other files"
    elif target == "file":
        out, words = tmp_path / "model.txt", "is a file"
        out.write_text("my text", encoding="utf-8")
    elif target == "other library":
        out, words = tmp_path / "other", "case library"
        shutil.copytree(world["library"], out)
    elif target == "library parent":
        library = tmp_path / "project" / "library"
        shutil.copytree(world["library"], library)
        out, words = tmp_path / "project", "holding the case library"
    elif target == "model with extras":
        out, words = tmp_path / "model", "did not put there"
        shutil.copytree(world["model"], out)
        (out / "my-notes.txt").write_text("keep me", encoding="utf-8")
    elif target == "init-from":
        out, words = tmp_path / "model", "--init-from"
        shutil.copytree(world["model"], out)
        extra += ["--init-from", str(out)]
    elif target == "weights file parent":
        out, words = tmp_path / "weights", "base-weights file"
        out.mkdir()
        from test_reliability_inputs import save_base_weights

        base = save_base_weights(out / "base.safetensors")
        extra += ["--weights", str(base)]
    else:
        out, words = tmp_path / "fake", "did not write"
        out.mkdir()
        (out / "medtuning.json").write_text('["not a model"]', encoding="utf-8")
    before = snapshot(out, library)
    assert_refused(train(cli, library, out, *extra), "OUTPUT_NOT_REPLACEABLE", words)
    assert snapshot(out, library) == before


def test_train_force_replaces_an_earlier_model_folder_only_when_the_new_one_is_complete(world, tmp_path, cli):
    out = tmp_path / "model"
    shutil.copytree(world["model"], out)
    old_manifest = (out / "medtuning.json").read_bytes()
    (tmp_path / "model.old").mkdir()  # a user's folder that happens to have the old scheme's backup name
    (tmp_path / "model.old" / "keep.txt").write_text("mine", encoding="utf-8")
    assert_ok(train(cli, world["library"], out, "--force", "--seed", "4"))
    assert (out / "medtuning.json").read_bytes() != old_manifest
    assert sorted(p.name for p in out.iterdir()) == ["curves.csv", "curves.png", "medtuning.json", "weights.safetensors"]
    assert (tmp_path / "model.old" / "keep.txt").read_text(encoding="utf-8") == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.old"]  # nothing moved aside is left


# ------------------------------------------------------------------------------------------------
# evaluate --report, compare --out, demo --out
# ------------------------------------------------------------------------------------------------

def _evaluate(cli, world, report: Path, *extra: str):
    return cli(["evaluate", "--model", str(world["model"]), "--library", str(world["library"]), "--report",
                str(report), "--device", "cpu", *extra])


def _compare(cli, world, out: Path, *extra: str):
    return cli(["compare", str(world["model"]), "--out", str(out), *extra])


@pytest.mark.parametrize("command", ["evaluate", "compare"])
@pytest.mark.parametrize("target", ["library", "model", "inside library", "foreign report"])
def test_report_folders_are_never_a_library_a_model_or_someone_elses_file(command, target, world, tmp_path, cli):
    run = _evaluate if command == "evaluate" else _compare
    library, model = tmp_path / "library", tmp_path / "model"
    shutil.copytree(world["library"], library)
    shutil.copytree(world["model"], model)
    here = dict(world, library=library, model=model)
    if target == "library":
        out, words = library, "case library"
    elif target == "model":
        out, words = model, "model folder"
    elif target == "inside library":
        out, words = library / "reports", "inside"
    else:
        out, words = user_folder(tmp_path), "did not write"
        name = "report.json" if command == "evaluate" else "compare.json"
        (out / name).write_text('{"my": "data"}', encoding="utf-8")
    before = snapshot(library, model, out)
    assert_refused(run(cli, here, out, "--force"), "OUTPUT_NOT_REPLACEABLE", words)
    assert snapshot(library, model, out) == before


@pytest.mark.parametrize("command", ["evaluate", "compare"])
def test_force_replaces_an_earlier_report_and_keeps_the_other_files(command, world, tmp_path, cli):
    run = _evaluate if command == "evaluate" else _compare
    out = user_folder(tmp_path)
    assert_ok(run(cli, world, out))
    name = "report.json" if command == "evaluate" else "compare.json"
    first = (out / name).read_bytes()
    assert_refused(run(cli, world, out), "OUTPUT_EXISTS")
    assert (out / name).read_bytes() == first
    assert_ok(run(cli, world, out, "--force"))
    assert json.loads((out / name).read_text(encoding="utf-8"))
    assert (out / "thesis.docx").read_bytes() == b"only copy" and (out / "notes" / "a.txt").exists()


@pytest.mark.parametrize("target", ["library", "user folder", "file", "model"])
def test_demo_force_replaces_only_an_earlier_demo_output(target, world, tmp_path, cli):
    if target == "library":
        out, words = tmp_path / "lib", "case library"
        shutil.copytree(world["library"], out)
    elif target == "user folder":
        out, words = user_folder(tmp_path), "folder of other files"
    elif target == "model":
        out, words = tmp_path / "model", "not a demo output"
        shutil.copytree(world["model"], out)
    else:
        out, words = tmp_path / "demo.txt", "is a file"
        out.write_text("mine", encoding="utf-8")
    before = snapshot(out)
    assert_refused(cli(["demo", "--out", str(out), "--force", "--device", "cpu", "--weights", "none"]),
                   "OUTPUT_NOT_REPLACEABLE", words)
    assert snapshot(out) == before
    assert not out.with_name(out.name + ".partial").exists()


def test_check_output_folder_accepts_a_demo_output_and_an_empty_folder(tmp_path):
    """The demo's own output (checked here on its listing: a real demo run takes minutes) is replaceable."""
    from MedTuningLib.errors import MedTuningError
    from MedTuningLib.fileio import check_output_folder

    demo = tmp_path / "demo-output"
    for name in ("model", "library", "library-whole", "source", "report-held-out-slab", "report-whole-volume"):
        (demo / name).mkdir(parents=True)
    (demo / "demo-report.json").write_text(json.dumps({"segments": ["a"], "dice_held_out_slab": {}}), encoding="utf-8")
    (demo / "demo-report.md").write_text("# demo", encoding="utf-8")
    (demo / "CTChest4.seg.nrrd").write_bytes(b"NRRD0004")
    assert check_output_folder(demo, "demo", force=True) is True
    with pytest.raises(MedTuningError) as info:
        check_output_folder(demo, "demo", force=False)
    assert info.value.code == "OUTPUT_EXISTS"
    (tmp_path / "empty").mkdir()
    assert check_output_folder(tmp_path / "empty", "model", force=True) is True
    assert check_output_folder(tmp_path / "new", "model", force=False) is False


# ------------------------------------------------------------------------------------------------
# segment --out / --labelmap
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["input image as labelmap", "library file", "model file", "folder"])
def test_segment_force_never_replaces_an_input_a_library_file_or_a_folder(target, world, tmp_path, cli):
    library, model = tmp_path / "library", tmp_path / "model"
    shutil.copytree(world["library"], library)
    shutil.copytree(world["model"], model)
    image = tmp_path / "scan.nrrd"
    shutil.copyfile(world["image"], image)
    out, extra = tmp_path / "result.seg.nrrd", []
    if target == "input image as labelmap":
        extra, words = ["--labelmap", str(image)], "input image"
    elif target == "library file":
        out, words = library / "cases" / "earlier.seg.nrrd", "case library"
        out.write_bytes(b"NRRD0004 not really")
    elif target == "model file":
        out, words = model / "result.seg.nrrd", "model folder"
        out.write_bytes(b"NRRD0004 not really")
    else:
        out, words = tmp_path / "folder.seg.nrrd", "is a folder"
        out.mkdir()
        (out / "inside.txt").write_text("mine", encoding="utf-8")
    before = snapshot(library, model, image, out)
    assert_refused(cli(["segment", "--model", str(model), "--image", str(image), "--out", str(out), *extra,
                        "--force", "--device", "cpu"]), "OUTPUT_NOT_REPLACEABLE", words)
    assert snapshot(library, model, image, out) == before


def test_segment_force_replaces_an_earlier_result(world, tmp_path, cli):
    out = tmp_path / "result.seg.nrrd"
    args = ["segment", "--model", str(world["model"]), "--image", str(world["image"]), "--out", str(out),
            "--device", "cpu"]
    assert_ok(cli(args))
    out.write_bytes(b"an earlier result")
    assert_refused(cli(args), "OUTPUT_EXISTS")
    assert_ok(cli([*args, "--force"]))
    assert out.read_bytes()[:4] == b"NRRD"
