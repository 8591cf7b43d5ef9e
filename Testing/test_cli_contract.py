"""The CLI parser is the contract: every sub-command and the everyday options exist."""

from __future__ import annotations

import json

import pytest

from MedTuningLib.cli import build_parser, main
from MedTuningLib.errors import CATALOGUE, MedTuningError


@pytest.mark.parametrize("argv", [
    ["cases", "add", "--library", "L", "--image", "a.nrrd", "--image", "b.nrrd", "--label", "l.seg.nrrd",
     "--modality", "T1", "--modality", "FLAIR", "--split", "val"],
    ["train", "--library", "L", "--out", "M", "--task", "brats", "--source-labels", "brats2019",
     "--arch", "swin_unet", "--backbone", "swin_tiny_patch4_window7_224", "--weights", "none",
     "--method", "med_tuning", "--alpha", "6", "--crop", "16x128x128", "--batch", "2", "--epochs", "3",
     "--minutes", "1.5", "--lr", "2e-3", "--device", "cpu", "--seed", "1", "--init-from", "OLD", "--resume"],
    ["train", "--library", "L", "--out", "M", "--task", "custom", "--labels", "Kidney=2,3;Spleen=1"],
    ["segment", "--model", "M", "--image", "a.nrrd", "--out", "r.seg.nrrd", "--labelmap", "r.nii.gz", "--tta",
     "--device", "cpu"],
    ["evaluate", "--model", "M", "--library", "L", "--split", "test", "--report", "R"],
    ["params", "--arch", "vit_upernet", "--method", "vpt_deep", "--in-channels", "4", "--classes", "4",
     "--alpha", "6", "--json"],
    ["info"], ["demo", "--out", "D"], ["cases", "list", "--library", "L"],
    ["cases", "remove", "--library", "L", "--id", "x"],
    ["bench", "train", "--arch", "vit_upernet", "--crop", "16x128x128", "--batch", "2", "--json", "b.json"],
    ["bench", "infer"], ["compare", "M1", "M2", "--library", "L"],
])
def test_contract_forms_parse(argv):
    args = build_parser().parse_args([*argv, "--events", "jsonl"])
    assert args.events == "jsonl"


def test_usage_error_is_an_event_with_code(cli):
    status, events = cli(["train", "--library", "L"])
    assert status == 2
    assert events[-1]["event"] == "error" and events[-1]["code"] == "USAGE"
    assert "--out" in events[-1]["message"]


def test_bad_crop_is_a_usage_error(cli):
    status, events = cli(["train", "--library", "L", "--out", "M", "--crop", "16x128"])
    assert status == 2 and events[-1]["code"] == "USAGE"


def test_every_event_line_is_json(capsys):
    main(["train", "--events", "jsonl"])
    out = capsys.readouterr().out
    assert out and all(json.loads(line)["event"] for line in out.splitlines())


def test_error_codes_are_catalogued():
    with pytest.raises(ValueError):
        MedTuningError("NO_SUCH_CODE", "x")
    assert all(kind.exit_status in (2, 3, 130) for kind in CATALOGUE.values())
