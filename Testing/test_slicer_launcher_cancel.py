"""Cancel through a launcher, as inside 3D Slicer: ``PythonSlicer`` is CTKAppLauncher, which runs
``python-real`` as its child, shares its pipes and forwards no signal. Here a small Python parent
does the same; Cancel must still stop the real backend within the grace period, leave a
resumable run, and leave no process behind."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from MedTuningLib.slicer_bridge.commands import TrainParams, backend_argv
from MedTuningLib.slicer_bridge.process import BackendProcess

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGTERM are POSIX")

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = dict(task="custom", arch="vit_upernet", backbone="vit_tiny_patch16_224", weights="none", crop=(8, 32, 32),
            batch=1, steps_per_epoch=4, device="cpu")

LAUNCHER = """
    import subprocess, sys
    # Like CTKAppLauncher: the real program is a child with the same stdin/stdout/stderr; no signal
    # handler, so SIGTERM ends the launcher alone and the child keeps running.
    sys.exit(subprocess.Popen(sys.argv[1:]).wait())
"""


def launcher(tmp_path: Path) -> list[str]:
    path = tmp_path / "launcher.py"
    path.write_text(textwrap.dedent(LAUNCHER), encoding="utf-8")
    return [PY, str(path)]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def backend_child(process: BackendProcess, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = psutil.Process(process.pid).children()
        if children:
            return children[0].pid
        time.sleep(0.05)
    raise AssertionError("the launcher started no backend")


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    from conftest import run_cli
    import slicerio

    data = Path(slicerio.__file__).parent / "data"
    lib = tmp_path_factory.mktemp("cases") / "lib"
    status, events = run_cli(["cases", "add", "--library", str(lib), "--image", str(data / "CTChest4.nrrd"),
                              "--label", str(data / "Segmentation.seg.nrrd"), "--modality", "CT"])
    assert status == 0, events
    return lib


def test_cancel_through_a_launcher_stops_the_real_backend_and_leaves_it_resumable(library, tmp_path):
    params = TrainParams(library=library, out=tmp_path / "model", epochs=1000, **TINY)
    argv = launcher(tmp_path) + backend_argv(PY, params)  # launcher PYTHON -m MedTuningLib train ...
    grace = 60.0
    run = BackendProcess(argv, workdir=params.workdir(), pythonpath=ROOT, grace_s=grace).start()
    real = backend_child(run)
    deadline = time.monotonic() + 600
    while not any(e["event"] == "progress" and e.get("phase") == "train" for e in run.poll()):
        assert time.monotonic() < deadline and not run.finished, run.stderr_tail()
        time.sleep(0.05)
    t0 = time.monotonic()
    run.request_stop()
    while alive(run.pid) and time.monotonic() - t0 < 10:  # SIGTERM ends the launcher at once ...
        run.poll()
        time.sleep(0.02)
    assert not alive(run.pid)
    assert run.running or not alive(real), "a run whose real backend still works is not over"
    assert run.wait(timeout=grace + 30) is not None
    assert time.monotonic() - t0 < grace + 10 and not alive(real) and not run.backend_alive  # no process left
    assert run.state.cancelled and not run.killed  # ... the STOP file stopped the backend cleanly
    assert (params.workdir() / "state.json").is_file()  # the resume state (engine/train.py STATE_JSON)
    assert not params.out.exists()
    resumed = BackendProcess(backend_argv(PY, TrainParams(library=library, out=params.out, epochs=1000, resume=True,
                                                          **TINY)), workdir=params.workdir(), pythonpath=ROOT,
                             grace_s=grace).start()
    while not any(e["event"] == "progress" and e.get("phase") == "train" for e in resumed.poll()):
        assert not resumed.finished, resumed.stderr_tail()
        time.sleep(0.05)
    resumed.request_stop()
    assert resumed.wait(timeout=120) == 130 and resumed.state.cancelled


STUBBORN = """
    import json, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # ignores the signal and the STOP file
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    print(json.dumps({"event": "start", "command": "train", "child": child.pid}), flush=True)
    time.sleep(600)
"""


def test_kill_after_grace_reaches_the_backend_after_the_launcher_is_gone(tmp_path):
    script = tmp_path / "stubborn.py"
    script.write_text(textwrap.dedent(STUBBORN), encoding="utf-8")
    run = BackendProcess(launcher(tmp_path) + [PY, str(script)], workdir=tmp_path / "work", grace_s=1.0).start()
    real = backend_child(run)
    deadline = time.monotonic() + 60
    start = None
    while start is None:
        start = next((e for e in run.poll() if e["event"] == "start"), None)
        assert time.monotonic() < deadline
        time.sleep(0.02)
    grandchild = start["child"]
    t0 = time.monotonic()
    run.request_stop()
    assert run.wait(timeout=30) is not None
    assert run.killed and time.monotonic() - t0 >= 1.0
    time.sleep(0.2)
    assert not any(alive(p) for p in (run.pid, real, grandchild)), "a process outlived Cancel + grace"
    assert run.state.cancelled and not run.backend_alive
