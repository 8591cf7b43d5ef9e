"""The paper's parameter table (docs/method.md) from full-size builds, and ``medtuning params``."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import pytest

from MedTuningLib.cli import main
from MedTuningLib.models import ModelConfig, build_model

PAPER = {  # (arch, method) -> (full, tuned, inserted, head) in thousands, 4 input channels, 4 classes
    ("vit_upernet", "head"): (100_849, 15_007, 0, 15_007),
    ("vit_upernet", "med_tuning"): (100_849, 17_853, 2_846, 15_007),
    ("swin_unet", "head"): (27_154, 6_752, 0, 6_752),
    ("swin_unet", "med_tuning"): (27_154, 7_489, 738, 6_752),
}


@pytest.mark.parametrize("arch, method", list(PAPER))
def test_paper_parameter_table(arch, method):
    report = build_model(ModelConfig(arch=arch, method=method, in_channels=4, num_classes=4)).param_report()
    got = tuple(round(report[k] / 1000) for k in ("full", "tuned", "inserted", "head"))
    assert got == PAPER[(arch, method)]


def test_exact_head_itemisation():
    """docs/method.md itemises the head exactly; the model's counts must be those numbers."""
    vit = build_model(ModelConfig(arch="vit_upernet", method="head")).param_report()["modules"]
    assert vit["decoder.psp"]["params"] == 11_209_728
    assert sum(vit[f"decoder.{k}"]["params"] for k in ("lateral", "smooth", "fusion")) == 3_540_480
    assert vit["decoder.classifier"]["params"] == 9_220 and vit["decoder.neck"]["params"] == 197_376
    assert vit["backbone.pos_embed"]["tuned"] == 49_152 and vit["backbone.norm"]["tuned"] == 1_536
    swin = build_model(ModelConfig(arch="swin_unet", method="head")).param_report()["modules"]
    assert swin["decoder.concat"]["params"] == 387_744
    assert sum(swin[f"decoder.{k}"]["params"] for k in ("first_expand", "stages", "expands")) == 6_214_026
    assert swin["decoder.final_expand"]["params"] == 147_648 and swin["decoder.classifier"]["params"] == 384


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("arch, figures", [("swin_unet", (27_154, 7_489, 738)),
                                           ("vit_upernet", (100_849, 17_853, 2_846))])
def test_params_json_prints_one_object(arch, figures):
    status, out, _ = run(["params", "--arch", arch, "--method", "med_tuning", "--in-channels", "4", "--classes", "4",
                          "--json"])
    assert status == 0
    report = json.loads(out)  # exactly one JSON object, nothing else on stdout
    assert tuple(round(report[k] / 1000) for k in ("full", "tuned", "inserted")) == figures
    assert report["arch"] == arch and report["method"] == "med_tuning" and report["modules"]


def test_params_events_and_table(cli):
    status, events = cli(["params", "--arch", "swin_unet", "--method", "head", "--in-channels", "1", "--classes", "2",
                          "--img-size", "64", "--depth", "16"])
    assert status == 0
    done = events[-1]
    assert done["event"] == "done" and done["outputs"]["inserted"] == 0
    assert done["outputs"]["tuned"] == done["outputs"]["head"]
    status, out, _ = run(["params", "--arch", "swin_unet", "--method", "med_tuning", "--alpha", "12", "--no-mix",
                          "--fusion", "none"])
    assert status == 0 and "inserted" in out and "full" in out
    status, events = cli(["params", "--arch", "swin_unetr", "--method", "adapter"])
    assert status == 2 and events[-1]["code"] == "INVALID_OPTION"
