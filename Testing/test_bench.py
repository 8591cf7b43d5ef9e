"""``medtuning bench``: the commands run end to end on tiny configurations and give the JSON shape.

Benchmarks are scripts that print tables, not timed tests (docs/method.md): nothing here asserts a speed.
The fast Med-Adapter path and the inference weight cast are checked against their literal forms.
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import pytest
import torch

from MedTuningLib.models import AdapterConfig, MedAdapter
from MedTuningLib.models.base import EncoderState, TokenGrid, compact_frozen_weights, compact_weights

TINY = ["--arch", "vit_upernet", "--backbone", "vit_tiny_patch16_224", "--crop", "2x32x32", "--device", "cpu"]


def _done(events):
    done = [e for e in events if e["event"] == "done"]
    assert done and done[-1]["status"] == "ok", events
    return done[-1]["outputs"]


def test_bench_train_end_to_end(cli, tmp_path):
    out = tmp_path / "train.json"
    status, events = cli(["bench", "train", *TINY, "--batch", "1", "--in-channels", "2", "--classes", "3",
                          "--methods", "full,med_tuning", "--steps", "1", "--warmup", "1", "--repeats", "2",
                          "--json", str(out)])
    assert status == 0, events
    outputs = _done(events)
    data = json.loads(out.read_text(encoding="utf-8"))
    # --repeats: the methods run interleaved (A B A B, each in a fresh process), medians with their spread.
    assert data["config"]["repeats"] == 2
    logs = [e["message"] for e in events if e["event"] == "log" and e["message"].startswith("bench train:")]
    order = [m.split(":")[1].split("(")[0].strip() for m in logs if "same settings" in m]
    assert order == ["full", "med_tuning", "full", "med_tuning"]  # interleaved, not A A B B
    med = data["same_settings"]["med_tuning"]
    assert med["repeats"] == 2 and len(med["time_ratio_runs"]) == 2
    assert med["time_ratio"] == round(statistics.median(med["time_ratio_runs"]), 4)
    low, high = med["time_ratio_spread"]
    assert low <= med["time_ratio"] <= high
    assert "spread" in outputs["tables"]["same_settings"].splitlines()[0]
    for table in ("same_settings", "defaults"):
        assert set(data[table]) == {"full", "med_tuning"}
        for method, figures in data[table].items():
            for key in ("tuned", "step_s", "peak_mb", "time_ratio", "memory_ratio"):
                assert key in figures, (table, method, key)
            assert figures["step_s"] > 0
        assert data[table]["full"]["time_ratio"] == 1.0 and data[table]["full"]["memory_ratio"] == 1.0
        assert data[table]["med_tuning"]["tuned"] < data[table]["full"]["tuned"]
    # Full fine-tuning at PyTorch defaults in table (b); med_tuning as 'medtuning train' runs it.
    assert data["defaults"]["full"]["settings"]["precision"] == "fp32"
    assert data["defaults"]["full"]["settings"]["checkpointing"] is False
    assert data["model_files"]["stored"] == "tuned"
    assert data["model_files"]["weights_bytes"] < data["model_files"]["full_checkpoint_bytes"]
    assert "| method |" in outputs["tables"]["same_settings"]


def test_bench_train_rejects_unknown_method(cli):
    status, events = cli(["bench", "train", *TINY, "--methods", "full,nonsense"])
    assert status == 2
    assert any(e["event"] == "error" and e["code"] == "UNKNOWN_METHOD" for e in events)


def test_bench_infer_end_to_end(cli, tmp_path):
    out = tmp_path / "infer.json"
    status, events = cli(["bench", "infer", *TINY, "--size", "4x40x40", "--repeats", "1", "--json", str(out)])
    assert status == 0, events
    _done(events)
    data = json.loads(out.read_text(encoding="utf-8"))
    for path in ("plain", "tuned"):
        assert data[path]["seconds"] > 0
    assert data["dice_against"] == "each other"
    assert 0.0 <= data["dice_difference_points"] <= 100.0
    assert data["speedup"] > 0


def test_bench_infer_with_label(cli, tmp_path, shared_data):
    """A real BraTS volume cut down to a few slices (written as NIfTI), scored against its label."""
    import SimpleITK as sitk

    case = shared_data / "brats2015" / "brats_2013_pat0003_1"
    paths = []
    for name in ("Flair_subtrMeanDivStd", "T1c_subtrMeanDivStd", "OTMultiClass"):
        image = sitk.ReadImage(str(case / f"{name}.nii.gz"))[96:136, 96:136, 70:74]
        paths.append(tmp_path / f"{name}.nii.gz")
        sitk.WriteImage(image, str(paths[-1]))
    status, events = cli(["bench", "infer", *TINY, "--image", str(paths[0]), "--image", str(paths[1]),
                          "--label", str(paths[2]), "--repeats", "1"])
    assert status == 0, events
    outputs = _done(events)
    assert outputs["dice_against"] == "label"
    assert set(outputs["plain"]["dice"]) == {"ET", "TC", "WT"}


@pytest.mark.parametrize("align", ["vit", "swin"])
@pytest.mark.parametrize("global_branch", ["fft", "dwconv9"])
def test_fast_adapter_matches_literal_formulation(align, global_branch):
    """The token-layout adapter (2D depthwise convs, FFT as a circulant matrix) == Conv3d + 3D FFT."""
    torch.manual_seed(0)
    a = MedAdapter(48, 6, AdapterConfig(global_branch=global_branch), inter_stage=True, align=align)
    with torch.no_grad():
        if global_branch == "fft":
            a.global_branch.weight.uniform_(0.5, 1.5)
            a.global_branch.bias.uniform_(-1, 1)
    b = copy.deepcopy(a)
    shape = (12, 16, 48) if align == "vit" else (12, 4, 4, 48)
    x = torch.randn(*shape, requires_grad=True)
    prev_c, prev_hw = (a.hidden, 4) if align == "vit" else (a.hidden // 2, 8)
    for interaction in (None, torch.randn(2, prev_c, 6, prev_hw, prev_hw)):
        s1, s2 = EncoderState(TokenGrid(2, 6, 4, 4), interaction), EncoderState(TokenGrid(2, 6, 4, 4), interaction)
        y1, y2 = a(x, s1), b.forward_volume(x, s2)
        torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s1.interaction, s2.interaction, rtol=1e-4, atol=1e-5)
        g1 = torch.autograd.grad(y1.square().sum(), [x, a.down.weight, a.mix.weight, a.local5.spatial.weight])
        g2 = torch.autograd.grad(y2.square().sum(), [x, b.down.weight, b.mix.weight, b.local5.spatial.weight])
        for u, v in zip(g1, g2):
            torch.testing.assert_close(u, v, rtol=1e-3, atol=1e-4 * float(v.abs().max()))
    for (name, u), (_, v) in zip(a.named_buffers(), b.named_buffers()):
        torch.testing.assert_close(u.float(), v.float(), rtol=1e-4, atol=1e-5, msg=name)


def test_weight_casts_match_autocast_and_restore():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    x = torch.randn(5, 8)
    originals = [(p.data_ptr(), p.dtype) for p in net.parameters()]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = net(x)
        with compact_weights(net, torch.bfloat16):
            assert net[0].weight.dtype == torch.bfloat16 and net[1].weight.dtype == torch.float32
            fast = net(x)
    torch.testing.assert_close(fast, ref, rtol=0, atol=0)
    assert [(p.data_ptr(), p.dtype) for p in net.parameters()] == originals
    # Training: only frozen matmul weights are stored compactly.
    net[0].requires_grad_(False)
    assert compact_frozen_weights(net, torch.bfloat16) == 2
    assert net[0].weight.dtype == torch.bfloat16 and net[2].weight.dtype == torch.float32
    assert compact_frozen_weights(net, None) == 0


def test_activation_memory_script_charges_saved_tensors_to_the_parts_that_keep_them():
    """bench/activation_memory.py: a frozen block keeps less for the backward pass than a trained one, the
    Med-Adapters' own activations are charged to them, and the optimizer state follows the tuned parameters."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "activation_memory.py"
    spec = importlib.util.spec_from_file_location("activation_memory", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    full = script.measure("vit_upernet", "full", (2, 32, 32), 1)
    tuned = script.measure("vit_upernet", "med_tuning", (2, 32, 32), 1)
    assert full["inserted"] == 0 and tuned["inserted"] > 0
    assert 0 < tuned["blocks"] < full["blocks"] and tuned["decoder"] == pytest.approx(full["decoder"])
    assert tuned["optimizer"] == pytest.approx(16 * tuned["tuned_m"] * 1e6 / 2**20)
    assert tuned["optimizer"] < full["optimizer"]
