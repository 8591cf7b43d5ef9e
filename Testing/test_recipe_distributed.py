"""SyncBatchNorm under torchrun (--recipe paper). torch's SyncBatchNorm runs on GPU tensors only: on CPU
(gloo) its forward raises, so a CPU data-parallel run keeps per-process BatchNorm and says so; on GPUs
the model is converted as the official train_3D.py does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

from engine_helpers import TINY_TRAIN, make_blob_library
from MedTuningLib.engine.recipe import use_sync_batchnorm
from MedTuningLib.models import ModelConfig, build_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model():
    return build_model(ModelConfig(arch="vit_upernet", in_channels=1, num_classes=2, img_size=32, depth=4,
                                   decoder_width=16,
                                   backbone_kwargs={"depth": 4, "embed_dim": 48, "num_heads": 2, "patch_size": 8}))


def test_gloo_has_no_cpu_sync_batchnorm(tmp_path):
    """The fact the CPU path rests on, checked against the installed torch."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        bn = nn.SyncBatchNorm(3).train()
        with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
            bn(torch.randn(2, 3, 4, 4, 4))
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_conversion_on_gpus_and_cpu_fallback():
    model = _tiny_model()
    plain = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    keys = list(model.state_dict())
    assert plain  # adapters (BatchNorm3d) and UPerNet (BatchNorm2d)
    converted, used = use_sync_batchnorm(model, torch.device("cuda", 0), world=2)
    assert used == "SyncBatchNorm"
    assert all(isinstance(converted.get_submodule(n), nn.SyncBatchNorm) for n in plain)
    assert list(converted.state_dict()) == keys  # the model folder's tensor names do not change
    notes = []
    cpu_model = _tiny_model()
    same, used = use_sync_batchnorm(cpu_model, torch.device("cpu"), world=2,
                                    log=lambda message, level="info": notes.append((level, message)))
    assert same is cpu_model and "unavailable on CPU" in used
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in same.modules())
    assert notes and notes[0][0] == "warning" and "SyncBatchNorm" in notes[0][1]
    assert "one process" in use_sync_batchnorm(_tiny_model(), torch.device("cuda", 0), world=1)[1]


def test_recipe_paper_under_torchrun_two_cpu_processes(tmp_path, cli):
    library = make_blob_library(cli, tmp_path, n_train=2, n_test=0)
    out = tmp_path / "model"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "MedTuningLib", "train", "--library", str(library), "--out", str(out),
               "--labels", "Blob=1", *TINY_TRAIN, "--recipe", "paper", "--epochs", "2", "--events", "jsonl"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, encoding="utf-8")
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[0]["world_size"] == 2 and events[-1]["status"] == "ok"
    warnings = [e["message"] for e in events if e["event"] == "log" and e.get("level") == "warning"]
    assert any("SyncBatchNorm needs GPU tensors" in m for m in warnings)
    manifest = json.loads((out / "medtuning.json").read_text(encoding="utf-8"))
    assert manifest["recipe"] == "paper"
    assert manifest["training_choices"]["batchnorm"] == "BatchNorm (SyncBatchNorm unavailable on CPU)"
    assert manifest["training_choices"]["selection"] == "last"
    assert manifest["training"]["world_size"] == 2 and manifest["training"]["epochs"] == 2
    assert manifest["architecture"]["norm_eps"] == 1e-5  # the official ViT LayerNorm eps
