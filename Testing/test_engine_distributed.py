"""Data-parallel training under torchrun: two CPU processes (gloo), real subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from engine_helpers import TINY_TRAIN, make_blob_library


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes(tmp_path, cli):
    library = make_blob_library(cli, tmp_path, n_train=2, n_test=0)
    out = tmp_path / "model"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "MedTuningLib", "train", "--library", str(library), "--out", str(out),
               "--labels", "Blob=1", *TINY_TRAIN, "--epochs", "2", "--steps-per-epoch", "2", "--events", "jsonl"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, encoding="utf-8")
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in done.stdout.splitlines()]  # only rank 0 writes, and only JSON
    assert sum(e["event"] == "start" for e in events) == 1
    assert events[0]["world_size"] == 2 and events[-1]["status"] == "ok"
    manifest = json.loads((out / "medtuning.json").read_text(encoding="utf-8"))
    assert manifest["training"]["world_size"] == 2 and manifest["training"]["epochs"] == 2
