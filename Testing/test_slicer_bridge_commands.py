"""The command lines the Slicer module builds parse with the real CLI parser, values intact."""

from __future__ import annotations

from pathlib import Path

import pytest

from MedTuningLib.cli import build_parser
from MedTuningLib.slicer_bridge.commands import (CaseAddParams, EvaluateParams, InfoParams, SegmentParams,
                                                 TrainParams, backend_argv, stop_dir)


def parse(params):
    argv = backend_argv("/opt/Slicer/bin/PythonSlicer", params)
    assert argv[:3] == ["/opt/Slicer/bin/PythonSlicer", "-m", "MedTuningLib"]
    assert argv[-2:] == ["--events", "jsonl"]
    assert all(isinstance(a, str) for a in argv)
    return build_parser().parse_args(argv[3:])


def test_train_minimal_keeps_backend_defaults():
    args = parse(TrainParams(library="L", out="M"))
    assert args.command == "train" and args.library == Path("L") and args.out == Path("M")
    from MedTuningLib.engine.train import TrainOptions

    # Not given: the backend's defaults apply (and a warm start would take the model's instead).
    assert args.method is None and args.weights is None and args.epochs == 50
    opts = TrainOptions.from_args(args)
    assert (opts.method, opts.weights, opts.task, opts.arch) == ("med_tuning", "hub", "custom", "vit_upernet")


def test_train_every_option_round_trips(tmp_path):
    lib, out, old = tmp_path / "my cases ü", tmp_path / "Modèle 1", tmp_path / "old model"
    args = parse(TrainParams(library=lib, out=out, task="brats", source_labels="brats2019", arch="swin_unet",
                             backbone="swin_tiny_patch4_window7_224", weights="none", method="adapter", alpha=4.0,
                             crop=(8, 32, 32), batch=1, epochs=2, steps_per_epoch=3, minutes=1.5, lr=2e-3, device="cpu", seed=7,
                             spacing="0.8,0.8,2.5", init_from=old, resume=True, force=True))
    assert (args.library, args.out, args.init_from) == (lib, out, old)
    assert (args.task, args.source_labels, args.arch, args.method) == ("brats", "brats2019", "swin_unet", "adapter")
    assert args.crop == (8, 32, 32) and args.batch == 1 and args.epochs == 2 and args.steps_per_epoch == 3
    assert args.minutes == 1.5 and args.lr == 2e-3 and args.alpha == 4.0 and args.seed == 7
    assert args.resume and args.force and args.device == "cpu" and args.weights == "none"
    assert args.spacing == "0.8,0.8,2.5"
    from MedTuningLib.engine.train import TrainOptions

    assert TrainOptions.from_args(args).spacing == "0.8,0.8,2.5"


def test_values_that_look_like_options_stay_values():
    args = parse(TrainParams(library="-lib", out="--out dir", labels="-weird=1;Kidney=2,3"))
    assert args.library == Path("-lib") and args.out == Path("--out dir")
    assert args.labels == "-weird=1;Kidney=2,3"


def test_train_workdir_is_partial_folder(tmp_path):
    params = TrainParams(library="L", out=tmp_path / "model")
    assert params.workdir() == tmp_path / "model.partial"
    assert stop_dir(params) == tmp_path / "model.partial"
    assert stop_dir(SegmentParams(model="M", images=["a"], out="r.seg.nrrd")) is None


@pytest.mark.parametrize("bad", [dict(task="nope"), dict(method="lora"), dict(device="tpu"), dict(epochs=0),
                                 dict(crop=(8, 32)), dict(lr=-1.0), dict(spacing="fine"), dict(spacing="1,2")])
def test_train_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        TrainParams(library="L", out="M", **bad).argv()


def test_segment_images_in_channel_order(tmp_path):
    images = [tmp_path / "T1 ce.nrrd", tmp_path / "FLAIR.nrrd", tmp_path / "T2 ü.nrrd"]
    args = parse(SegmentParams(model=tmp_path / "model", images=images, out=tmp_path / "out.seg.nrrd",
                               tta=True, device="cuda"))
    assert args.image == images and args.tta and args.device == "cuda" and not args.force and not args.fast
    assert parse(SegmentParams(model="M", images=images[:1], out="r.seg.nrrd", fast=True)).fast
    with pytest.raises(ValueError):
        SegmentParams(model="M", images=[], out="r.seg.nrrd").argv()


def test_evaluate_and_info():
    args = parse(EvaluateParams(model="M", library="L", split="all", report="R"))
    assert args.split == "all" and args.report == Path("R")
    args = parse(InfoParams(model="M"))
    assert args.command == "info" and args.json and args.model == Path("M")


def test_cases_add_with_modalities_and_provenance():
    args = parse(CaseAddParams(library="L", images=["t1.nrrd", "flair.nrrd"], label="seg.seg.nrrd",
                               modalities=["T1", "FLAIR"], split="val", case_id="case 1", provenance="correction",
                               source="3D Slicer scene: MRBrainTumor1"))
    assert args.command == "cases" and args.cases_command == "add"
    assert args.image == [Path("t1.nrrd"), Path("flair.nrrd")] and args.modality == ["T1", "FLAIR"]
    assert args.split == "val" and args.case_id == "case 1" and args.provenance == "correction"
    assert args.source == "3D Slicer scene: MRBrainTumor1"
    with pytest.raises(ValueError):
        CaseAddParams(library="L", images=["a", "b"], label="l", modalities=["CT"]).argv()


def test_no_python_is_an_error():
    with pytest.raises(ValueError):
        backend_argv("", InfoParams())


def test_case_remove_and_suggest_parse_as_the_backend_reads_them():
    from MedTuningLib.slicer_bridge.commands import CaseRemoveParams, SuggestParams

    args = parse(CaseRemoveParams(library="cases dir", case_id="scan 3"))
    assert (args.command, args.cases_command, args.library, args.case_id) == ("cases", "remove", Path("cases dir"), "scan 3")
    with pytest.raises(ValueError, match="case_id"):
        CaseRemoveParams(library="L", case_id=" ").argv()
    args = parse(SuggestParams(model="M", library="L", device="cpu"))
    assert (args.command, args.model, args.library, args.top, args.device) == ("suggest", Path("M"), Path("L"), None,
                                                                                "cpu")
