"""Another backend interpreter must not start on Slicer's Python: Slicer's process carries
PYTHONHOME / PYTHONPATH / PYTHONNOUSERSITE and library paths of its own Python. A real interpreter
is started with such an environment: as it is, it breaks; through ``backend_environment`` it runs
on its own standard library, and the dependency probe reports it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from MedTuningLib.slicer_bridge.settings import backend_environment, parse_probe_output, probe_argv

WHERE = [sys.executable, "-c", "import sys, os; print(sys.prefix); print(os.environ.get('PYTHONPATH', ''))"]


def slicer_like_environment(tmp_path: Path) -> dict:
    """What a process started from Slicer sees: Slicer's Python home and paths (a fake Slicer here)."""
    home = tmp_path / "Slicer-5.8.1-linux-amd64"
    python_home = home / "lib" / "Python"
    (python_home / "lib" / "python3.9").mkdir(parents=True)  # a Python home without an encodings module
    env = dict(os.environ)
    env.update(SLICER_HOME=str(home), PYTHONHOME=str(python_home), PYTHONNOUSERSITE="1",
               PYTHONPATH=os.pathsep.join([str(python_home / "lib" / "python3.9"), str(home / "bin" / "Python")]),
               PATH=os.pathsep.join([str(home / "bin"), os.environ.get("PATH", "")]),
               LD_LIBRARY_PATH=os.pathsep.join([str(home / "lib" / "Slicer-5.8"), str(python_home / "lib")]))
    return env


def test_slicers_environment_breaks_another_interpreter(tmp_path):
    done = subprocess.run(WHERE, env=slicer_like_environment(tmp_path), capture_output=True, text=True, timeout=60)
    assert done.returncode != 0  # the old behaviour: the backend starts on Slicer's standard library


def test_backend_environment_runs_another_interpreter_on_its_own_python(tmp_path):
    slicer_env = slicer_like_environment(tmp_path)
    env = backend_environment(slicer_env, own_python=False)
    assert not {"PYTHONHOME", "PYTHONPATH", "PYTHONNOUSERSITE"} & set(env)
    assert slicer_env["SLICER_HOME"] not in env.get("PATH", "") and slicer_env["SLICER_HOME"] not in \
        env.get("LD_LIBRARY_PATH", "")
    done = subprocess.run(WHERE, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == sys.prefix
    probe = subprocess.run(probe_argv(sys.executable), env=env, capture_output=True, text=True, timeout=300)
    report = parse_probe_output(probe.stdout, probe.returncode, probe.stderr)
    assert report.python == sys.version.split()[0] and not report.problem


def test_startup_environment_is_used_and_a_users_own_pythonpath_kept(tmp_path):
    slicer_env = slicer_like_environment(tmp_path)
    startup = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"),
               "PYTHONPATH": str(tmp_path / "my-packages"),  # set by the user before starting Slicer
               "PYTHONHOME": slicer_env["PYTHONHOME"]}       # not in the launcher settings, still Slicer's
    env = backend_environment(slicer_env, own_python=False, startup=startup)
    assert env["PYTHONPATH"] == str(tmp_path / "my-packages") and "PYTHONHOME" not in env
    assert "LD_LIBRARY_PATH" not in env  # the startup environment had none
    assert backend_environment(slicer_env, own_python=True) == slicer_env  # PythonSlicer gets Slicer's own
