"""`medtuning train --recipe paper --arch swin_unet` end to end on CPU (crop and epochs overridden to tiny
sizes), then `segment` and `evaluate --protocol paper` with the model folder it wrote."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from engine_helpers import write_blob_case

SWIN = ["--arch", "swin_unet", "--backbone", "swin_tiny_patch4_window7_224", "--backbone-args",
        "embed_dim=24,window_size=2", "--crop", "4x32x32", "--device", "cpu"]


@pytest.fixture(scope="module")
def recipe_model(tmp_path_factory):
    from conftest import run_cli

    root = tmp_path_factory.mktemp("recipe")
    library = root / "library"
    for i, split in enumerate(("train", "train", "test")):
        image, label = write_blob_case(root / "src", f"case{i}", seed=i, shape=(4, 32, 32), radius=6.0,
                                       centre=(2, 14 + 2 * i, 16 - i))
        status, events = run_cli(["cases", "add", "--library", str(library), "--image", str(image), "--label",
                                  str(label), "--modality", "MR", "--split", split, "--id", f"case{i}"])
        assert status == 0, events
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=24)
    weights = root / "swin-t.safetensors"
    save_file({k: v.contiguous() for k, v in swin.state_dict().items()}, str(weights))
    out = root / "model"
    status, events = run_cli(["train", "--library", str(library), "--out", str(out), "--labels", "Blob=1",
                              "--recipe", "paper", *SWIN, "--weights", str(weights), "--epochs", "2",
                              "--steps-per-epoch", "1"])
    assert status == 0, events[-1]
    return root, library, out, events


def test_model_folder_says_recipe_paper(recipe_model):
    _, _, out, events = recipe_model
    manifest = json.loads((out / "medtuning.json").read_text(encoding="utf-8"))
    assert manifest["recipe"] == "paper"
    choices = manifest["training_choices"]
    assert {k: choices[k] for k in ("loss", "schedule", "epoch_passes", "crop_sampling", "intensity_aug",
                                    "base_init", "selection", "decoder_init")} == {
        "loss": "dice_fg_batch", "schedule": "paper", "epoch_passes": 1, "crop_sampling": "uniform",
        "intensity_aug": "per_column", "base_init": "official", "selection": "last", "decoder_init": "trunc_normal"}
    assert choices["recipe_overridden"]["crop"] == [4, 32, 32] and choices["recipe_overridden"]["epochs"] == 2
    assert manifest["training"]["loss"] == "dice_fg_batch" and manifest["training"]["precision"] == "fp32"
    assert manifest["architecture"]["backbone_kwargs"]["drop_path_rate"] == 0.1  # official Swin stochastic depth
    assert manifest["base_weights"]["init"] == "official"
    # The official schedule with W = 25 warm-up epochs of E = 2 (the epochs given on the command line).
    lrs = {e["epoch"]: e["value"] for e in events if e["event"] == "metric" and e["name"] == "lr"}
    for epoch, value in lrs.items():
        assert value == pytest.approx(2e-3 * (1 - math.cos(math.pi / 2 * epoch / 25)), rel=1e-12)
    # Random frozen tensors of the official initialisation are stored with the tuned weights.
    stored = load_file(str(out / "weights.safetensors"))
    assert "encoder.backbone.patch_embed.proj.weight" in stored
    assert "encoder.backbone.layers.0.blocks.0.attn.relative_position_bias_table" in stored
    assert not any(k.startswith("encoder.backbone.layers.0.blocks.0.mlp") for k in stored)  # pretrained: not stored
    log = " ".join(e.get("message", "") for e in events if e["event"] == "log")
    assert "recipe paper:" in log and "given explicitly: crop=" in log


def test_segment_and_evaluate_with_the_paper_protocol(recipe_model, cli):
    root, library, out, _ = recipe_model
    result = root / "case2.seg.nrrd"
    status, events = cli(["segment", "--model", str(out), "--image", str(root / "src" / "case2.nrrd"),
                          "--out", str(result), "--protocol", "paper", "--device", "cpu"])
    assert status == 0, events[-1]
    assert result.is_file()
    status, events = cli(["evaluate", "--model", str(out), "--library", str(library), "--protocol", "paper",
                          "--device", "cpu", "--report", str(root / "report")])
    assert status == 0, events[-1]
    report = json.loads((root / "report" / "report.json").read_text(encoding="utf-8"))
    assert report["tta"] is True and "paper protocol" in report["protocol"]
    assert 0.0 <= report["summary"]["dice/Blob"]["mean"] <= 1.0
    # The protocol fixes the windows: --overlap with it is a usage error with a code.
    status, events = cli(["evaluate", "--model", str(out), "--library", str(library), "--protocol", "paper",
                          "--overlap", "0.5", "--device", "cpu"])
    assert status == 2 and events[-1]["code"] == "INVALID_OPTION"


def test_select_last_keeps_the_last_epoch(tmp_path, cli):
    """--select last: the model of the last epoch, whatever validation says (the official choice)."""
    from engine_helpers import TINY_TRAIN, make_blob_library

    library = make_blob_library(cli, tmp_path, n_train=2, n_test=0)
    # In the warm-up of the paper schedule the lr of an epoch does not depend on the number of epochs, so a
    # one-epoch run is the first epoch of a two-epoch run.
    common = ["--library", str(library), "--labels", "Blob=1", *TINY_TRAIN, "--steps-per-epoch", "2",
              "--schedule", "paper", "--warmup-epochs", "25", "--lr", "0.02"]
    runs = {}
    for name, extra in (("last2", ["--epochs", "2", "--select", "last"]), ("last1", ["--epochs", "1", "--select", "last"]),
                        ("best2", ["--epochs", "2", "--select", "best"])):
        status, events = cli(["train", "--out", str(tmp_path / name), *common, *extra])
        assert status == 0, events[-1]
        manifest = json.loads((tmp_path / name / "medtuning.json").read_text(encoding="utf-8"))
        runs[name] = (load_file(str(tmp_path / name / "weights.safetensors")), manifest)

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert runs["last2"][1]["training_choices"]["selection"] == "last"
    assert not same(runs["last2"][0], runs["last1"][0])  # the last epoch's model, not the first's
    best_epoch = runs["best2"][1]["training"]["best_epoch"]
    assert same(runs["best2"][0], runs["last2"][0] if best_epoch == 2 else runs["last1"][0])
