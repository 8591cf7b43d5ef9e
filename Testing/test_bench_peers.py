"""``medtuning bench peers`` on a tiny real NIfTI volume with tiny windows: every row runs (in its own process)
on its own grid and the table / JSON have their shape. A benchmark, not a timed test: no speed is asserted."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk

from MedTuningLib.bench.peers_bench import nnunet_plan
from MedTuningLib.engine.windows import windows_per_volume

TINY = ["--spacing", "2,2,2", "--crop", "4x32x32", "--backbone-args", "depth=4,embed_dim=48,num_heads=2,patch_size=8",
        "--decoder-width", "16", "--nnunet-patch", "16x32x32", "--monai-window", "64x64x64", "--device", "cpu"]
# (SwinUNETR needs windows of at least 64: at 32 its bottleneck holds one voxel, which instance norm refuses.)


def test_nnunet_plan_follows_the_planner_rules():
    plan = nnunet_plan((1.0, 0.78, 0.78), (128, 128, 128))  # abdominal CT at nnU-Net's usual 3d_fullres patch
    assert plan["n_stages"] == 6 and plan["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    assert plan["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 5 and plan["kernel_sizes"] == [[3, 3, 3]] * 6
    thick = nnunet_plan((5.0, 0.8, 0.8), (32, 192, 160))  # thick slices: in-plane first, 1x3x3 kernels
    assert thick["kernel_sizes"][0] == [1, 3, 3] and thick["strides"][1] == [1, 2, 2]
    assert [2, 2, 2] in thick["strides"] and thick["kernel_sizes"][-1] == [3, 3, 3]
    assert windows_per_volume((200, 512, 512), (128, 128, 128), 0.5) == 3 * 7 * 7


def test_bench_peers_end_to_end(cli, tmp_path):
    volume = np.random.default_rng(0).normal(0, 100, (12, 48, 48)).astype(np.float32)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((1.0, 1.0, 2.0))
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(path))
    out = tmp_path / "peers.json"
    systems = "medtuning:vit_upernet,nnunet,swinunetr,segresnet"
    # The training step is checked below on the two cheap rows (MONAI's at 64^3 windows take a minute each here).
    status, events = cli(["bench", "peers", "--image", str(path), "--systems", systems, *TINY, "--no-train-step",
                          "--json", str(out)])
    assert status == 0, events[-3:]
    data = json.loads(out.read_text(encoding="utf-8"))
    rows = {r["system"]: r for r in data["rows"]}
    assert list(rows) == systems.split(",")
    expected_grids = {"medtuning:vit_upernet": [2.0, 2.0, 2.0], "nnunet": [1.0, 1.0, 2.0],  # one volume: its own
                      "swinunetr": [1.5, 1.5, 2.0], "segresnet": [1.5, 1.5, 1.5]}
    for name, row in rows.items():
        assert row["input_shape"] == [12, 48, 48]
        assert row["grid_spacing_xyz"] == expected_grids[name], name
        zyx = list(reversed(row["grid_spacing_xyz"]))
        assert row["grid_shape"] == [round(n * s / t) for n, s, t in zip((12, 48, 48), (2.0, 1.0, 1.0), zyx)], name
        assert row["seconds"] > 0 and row["forward_calls"] >= 1 and not row["extrapolated"]
        assert abs(row["voxels_per_s"] - row["grid_voxels"] / row["seconds"]) <= 0.02 * row["voxels_per_s"]
        assert row["peak_mb"] > 0 and row["precision"] in ("fp32", "bfloat16") and "train_step_s" not in row
    assert rows["nnunet"]["plan"]["n_stages"] == 4  # 16x32x32 patch: pooled while 4 voxels are left
    done = [e for e in events if e["event"] == "done"][-1]
    table = done["outputs"]["table"].splitlines()
    assert table[0].startswith("| system") and "s / volume" in table[0] and "peak memory" in table[0]
    assert len(table) == 2 + len(rows) and any("PlainConvUNet" in line for line in table)


def test_bench_peers_training_step_and_extrapolation(cli, tmp_path):
    out = tmp_path / "peers.json"
    status, events = cli(["bench", "peers", "--size", "12x96x96", "--input-spacing", "1,1,2",
                          "--systems", "medtuning:vit_upernet,nnunet", *TINY, "--max-windows", "2", "--json", str(out)])
    assert status == 0, events[-3:]
    rows = {r["system"]: r for r in json.loads(out.read_text(encoding="utf-8"))["rows"]}
    for row in rows.values():
        assert row["extrapolated"] and row["timed_calls"] == 2 and row["forward_calls"] > 2 and row["seconds"] > 0
        assert row["train_step_s"] > 0 and row["train_batch"] == 2
    medtuning, nnunet = rows["medtuning:vit_upernet"], rows["nnunet"]
    assert medtuning["tuned_parameters"] < medtuning["parameters"]  # Med-Tuning: the base stays frozen
    assert nnunet["tuned_parameters"] == nnunet["parameters"] and nnunet["train_window"] == [16, 32, 32]
