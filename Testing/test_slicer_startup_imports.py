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
