"""What 3D Slicer imports when it scans modules: ``MedTuning/MedTuning.py`` and everything it pulls in.

Slicer's Python ships the standard library, numpy, vtk, qt, ctk and slicer — nothing else (no
psutil, no torch). The import runs in a subprocess where any other top-level package is refused by
an import hook; qt, ctk and the Qt-bound parts of ``slicer`` (``slicer.i18n``,
``slicer.parameterNodeWrapper``, ``slicer.ScriptedLoadableModule``) are small stand-ins made here,
the rest of ``slicer`` is the real slicer-core. Every file of the closure must also parse as
Python 3.9 (Slicer 5.4-5.8).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "MedTuning" / "MedTuning.py"

HARNESS = textwrap.dedent(r'''
    import importlib.abc, importlib.util, json, sys, types
    ALLOWED = {"numpy", "vtk", "vtkmodules", "slicer", "slicer_core", "slicer_layer_dm", "MedTuningLib"}

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in ALLOWED or top in sys.modules:
                return None
            raise ModuleNotFoundError(f"{name} is not shipped with 3D Slicer's Python", name=name)

    sys.meta_path.insert(0, Refuse())

    # Stand-ins for what only the Slicer application has (Qt, CTK, Qt-bound parts of slicer).
    class _Any:
        def __init__(self, *a, **k): pass
        def __call__(self, *a, **k): return _Any()
        def __getattr__(self, name): return _Any()
        def __or__(self, other): return self
    qt = types.ModuleType("qt"); qt.__getattr__ = lambda name: _Any()
    ctk = types.ModuleType("ctk"); ctk.__getattr__ = lambda name: _Any()
    sys.modules.update(qt=qt, ctk=ctk)
    import slicer
    i18n = types.ModuleType("slicer.i18n"); i18n.tr = lambda text: text; i18n.translate = lambda ctx, text: text
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.Choice = pnw.WithinRange = lambda *a, **k: None
    pnw.parameterNodeWrapper = lambda cls: cls
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
                 "ScriptedLoadableModuleWidget"):
        setattr(slm, name, type(name, (), {}))
    sys.modules.update({"slicer.i18n": i18n, "slicer.parameterNodeWrapper": pnw, "slicer.ScriptedLoadableModule": slm})

    before = set(sys.modules)
    path = sys.argv[1]
    spec = importlib.util.spec_from_file_location("MedTuningUnderTest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # as Slicer's module scan does
    loaded = sorted(set(sys.modules) - before)
    files = sorted({getattr(sys.modules[m], "__file__", None) or "" for m in loaded if m.startswith("MedTuningLib")})
    print(json.dumps({"loaded": loaded, "files": [f for f in files if f]}))
''')


def import_in_slicer_like_python(path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS, encoding="utf-8")
    # -s: no user site; the working folder is not the repository, so only the module's own path
    # logic (LIBRARY_ROOT) makes MedTuningLib importable, as inside Slicer.
    return subprocess.run([sys.executable, "-s", str(harness), str(path)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)


def test_module_startup_imports_only_what_slicer_ships(tmp_path):
    done = import_in_slicer_like_python(MODULE, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    loaded = set(report["loaded"])
    assert {"MedTuningLib.mrml", "MedTuningLib.slicer_bridge.process", "MedTuningLib.slicer_bridge.settings"} <= loaded
    assert not {m for m in loaded if m.split(".")[0] in ("psutil", "torch", "timm", "monai", "SimpleITK")}
    # Python 3.9 (Slicer 5.4-5.8) must parse every file of the closure.
    for file in [str(MODULE), *report["files"]]:
        ast.parse(Path(file).read_text(encoding="utf-8"), filename=file, feature_version=(3, 9))


def test_a_stray_third_party_import_fails_the_check(tmp_path):
    """The hook really refuses: the module with ``import psutil`` added does not import."""
    source = MODULE.read_text(encoding="utf-8")
    stray = tmp_path / "MedTuning" / "MedTuning.py"
    stray.parent.mkdir()
    stray.write_text(source.replace("import ctk\n", "import ctk\nimport psutil\n", 1), encoding="utf-8")
    (tmp_path / "MedTuningLib").symlink_to(ROOT / "MedTuningLib", target_is_directory=True)
    done = import_in_slicer_like_python(stray, tmp_path)
    assert done.returncode != 0 and "psutil is not shipped with 3D Slicer's Python" in done.stderr


def test_mrml_and_bridge_never_import_qt_or_torch():
    """MedTuningLib.mrml / slicer_bridge import only stdlib, numpy, vtk, slicer and MedTuningLib."""
    allowed = set(sys.stdlib_module_names) | {"numpy", "vtk", "slicer", "MedTuningLib"}
    for folder in ("mrml", "slicer_bridge"):
        for file in (ROOT / "MedTuningLib" / folder).glob("*.py"):
            tree = ast.parse(file.read_text(encoding="utf-8"), feature_version=(3, 9))
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
                for name in names:
                    assert name.split(".")[0] in allowed, f"{file.name} imports {name}"


def python39() -> str:
    """A Python 3.9 interpreter (Slicer 5.4-5.8 ship 3.9): on PATH or from pyenv."""
    import glob
    import shutil

    candidates = [*sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.9*/bin/python3.9"))), shutil.which("python3.9")]
    for candidate in filter(None, candidates):  # a pyenv shim may exist without a usable 3.9 behind it
        done = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 9))"],
                              capture_output=True, text=True, timeout=60)
        if done.stdout.strip() == "True":
            return candidate
    pytest.skip("no Python 3.9 interpreter on this machine (pyenv install 3.9)")


RUN_ON_39 = textwrap.dedent(r'''
    import json, sys, tempfile
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    assert sys.version_info[:2] == (3, 9), sys.version
    from MedTuningLib.slicer_bridge import BackendProcess, EventReader, RunState, TrainParams, backend_argv
    from MedTuningLib.slicer_bridge.settings import BridgeSettings, backend_environment, read_model_info
    from MedTuningLib.slicer_bridge.export import ExportNamer, plan_case_export
    state = RunState()
    state.apply_all(EventReader().feed(b'{"event": "metric", "phase": "train", "epoch": 1, "name": "loss", "value": 0.5}\n'))
    assert state.curves["train/loss"][0].value == 0.5
    argv = backend_argv(sys.executable, TrainParams(library="lib", out="out", epochs=2, crop=(8, 32, 32)))
    assert "--crop=8x32x32" in argv
    env = backend_environment({"PYTHONHOME": "/S/lib/Python", "SLICER_HOME": "/S", "PATH": "/S/bin:/usr/bin"}, False)
    assert env == {"SLICER_HOME": "/S", "PATH": "/usr/bin"}, env
    folder = Path(tempfile.mkdtemp())
    assert read_model_info(folder).problem and BridgeSettings.from_dict({"device": "x"}).device == "auto"
    assert plan_case_export(folder, ["T1", "T1"], "seg").images[1].name == "T1_2.nrrd"
    run = BackendProcess([sys.executable, "-c", "print('{\"event\": \"done\", \"status\": \"ok\"}')"]).start()
    assert run.wait(timeout=60) == 0 and run.state.ok and not run.backend_alive
    print("ok")
''')


def test_the_slicer_free_closure_runs_on_python_3_9(tmp_path):
    """slicer_bridge (and schema, errors, paths) imported and exercised on a real Python 3.9 with
    only its standard library (-I -S); the Slicer-bound files are byte-compiled by it."""
    py39 = python39()
    script = tmp_path / "run39.py"
    script.write_text(RUN_ON_39, encoding="utf-8")
    done = subprocess.run([py39, "-I", "-S", str(script), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    files = [MODULE, *sorted((ROOT / "MedTuningLib" / "mrml").glob("*.py"))]
    compile_all = "import py_compile, sys\nfor f in sys.argv[1:]:\n    py_compile.compile(f, cfile=f + '.39c', doraise=True)\n"
    copies = []
    for file in files:  # compile copies, so no .pyc of 3.9 lands in the source tree
        copy = tmp_path / f"{file.parent.name}_{file.name}"
        copy.write_text(file.read_text(encoding="utf-8"), encoding="utf-8")
        copies.append(str(copy))
    done = subprocess.run([py39, "-I", "-S", "-c", compile_all, *copies], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
