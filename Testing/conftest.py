"""Shared pytest fixtures: paths to the real data, small helpers to call the CLI in-process."""

from __future__ import annotations

import io
import json
import os
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Tests never reach the internet: make any hub access fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models on a 2-core machine: one thread each (several OpenMP threads per process oversubscribe the
# cores when tests start backend processes, and spin-waiting then makes small steps ~100x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))  # engine_helpers and friends


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)


def run_cli(argv: list[str]) -> tuple[int, list[dict]]:
    """Run ``medtuning ARGV --events jsonl`` in-process; return the exit status and the events."""
    from MedTuningLib.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        status = main([*argv, "--events", "jsonl"])
    lines = [line for line in buf.getvalue().splitlines() if line.strip()]
    return status, [json.loads(line) for line in lines]


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (only developers and CI have it)")
    return SHARED_DATA


@pytest.fixture
def slicerio_data() -> Path:
    import slicerio

    return Path(slicerio.__file__).parent / "data"


@pytest.fixture(autouse=True)
def _medtuning_home(tmp_path_factory, monkeypatch):
    """Keep ~/.medtuning of the machine untouched."""
    monkeypatch.setenv("MEDTUNING_HOME", str(tmp_path_factory.mktemp("medtuning_home")))
