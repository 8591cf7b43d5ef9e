"""The Slicer module without Slicer: it compiles, every widget it uses is in the .ui, its
parameter bindings name real widgets, and the CMake files name every shipped file."""

from __future__ import annotations

import ast
import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "MedTuning" / "MedTuning.py"
UI = ROOT / "Resources" / "UI" / "MedTuning.ui"
MODULE_CMAKE = ROOT / "MedTuning" / "CMakeLists.txt"


def ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI).getroot().iter("widget")}


def used_widget_names() -> set[str]:
    source = MODULE.read_text(encoding="utf-8")
    names = set(re.findall(r"self\.ui\.([A-Za-z_][A-Za-z0-9_]*)", source))
    # getattr(self.ui, f"inputVolumeSelector{i}") for the modality selectors 1..MAX_MODALITIES
    max_modalities = int(re.search(r"^MAX_MODALITIES = (\d+)", source, re.M).group(1))
    for prefix in re.findall(r'getattr\(self\.ui, f"([A-Za-z]+)\{', source):
        names.update(f"{prefix}{i}" for i in range(1, max_modalities + 1))
    return names


def cmake_list(name: str) -> list[str]:
    """A file list of MedTuning/MedTuningFiles.cmake, as CMake itself computes it (``cmake -P``)."""
    import shutil
    import subprocess

    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed (apt-get install cmake)")
    done = subprocess.run([cmake, f"-DMEDTUNING_ROOT={ROOT}", "-P", str(ROOT / "MedTuning" / "MedTuningFiles.cmake")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lists = dict(line.split("=", 1) for line in done.stderr.splitlines() if "=" in line)
    return [item for item in lists[name].split(";") if item]


def test_module_compiles(tmp_path):
    py_compile.compile(str(MODULE), cfile=str(tmp_path / "MedTuning.pyc"), doraise=True)
    for script in (ROOT / "MedTuning" / "Testing").rglob("*.py"):
        py_compile.compile(str(script), cfile=str(tmp_path / (script.stem + ".pyc")), doraise=True)


def test_module_has_the_usual_classes():
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    for name in ("MedTuning", "MedTuningWidget", "MedTuningLogic", "MedTuningTest", "MedTuningParameterNode"):
        assert name in classes
    decorators = [ast.unparse(d) for d in classes["MedTuningParameterNode"].decorator_list]
    assert decorators == ["parameterNodeWrapper"]


def test_every_widget_the_module_uses_is_in_the_ui():
    missing = sorted(used_widget_names() - set(ui_widgets()))
    assert not missing, f"used in MedTuning.py but not in MedTuning.ui: {missing}"


def test_parameter_bindings_match_the_parameter_node():
    """Each SlicerParameterName in the .ui is a field of MedTuningParameterNode, and vice versa."""
    bound = {}
    for name, widget in ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = name
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedTuningParameterNode")
    fields = {stmt.target.id for stmt in node.body if isinstance(stmt, ast.AnnAssign)}
    assert set(bound) == fields, (set(bound) ^ fields)


def test_ui_is_a_slicer_module_panel():
    root = ET.parse(UI).getroot()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "MedTuning"
    widgets = ui_widgets()
    sections = [w.find("property/string").text for w in widgets.values() if w.get("class") == "ctkCollapsibleButton"]
    assert sections[:1] == ["Segment"] and {"Fine-tune on my cases", "Correct and improve", "Settings"} <= set(sections)
    assert widgets["segmentEditorWidget"].get("class") == "qMRMLSegmentEditorWidget"
    # every MRML widget gets the scene from the panel
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    mrml = {n for n, w in widgets.items() if w.get("class", "").startswith("qMRML") and n != "MedTuning"}
    assert mrml <= receivers
    assert widgets["autoRetrainCheckBox"].find("property[@name='checked']/bool").text == "false"


def test_strings_shown_to_users_are_translatable():
    source = MODULE.read_text(encoding="utf-8")
    assert "from slicer.i18n import tr as _" in source
    # button labels set from code go through _()
    for text in ("Cancel", "Segment", "Fine-tune on my cases", "Re-tune now"):
        assert f'_("{text}")' in source


def shipped_files() -> tuple[set[str], set[str], set[str]]:
    lib = ROOT / "MedTuningLib"
    # The browser app (MedTuningLib/web, trame) is not part of the Slicer extension.
    scripts = {p.relative_to(ROOT).as_posix() for p in lib.rglob("*.py")
               if "__pycache__" not in p.parts and not p.relative_to(lib).as_posix().startswith("web/")}
    data = {p.relative_to(ROOT).as_posix() for p in (lib / "presets").rglob("*")
            if p.is_file() and p.suffix in (".json", ".md")} if (lib / "presets").is_dir() else set()
    resources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "Resources").rglob("*") if p.is_file()}
    return scripts, data, resources


@pytest.mark.parametrize("variable, index", [("MEDTUNING_LIB_SCRIPTS", 0), ("MEDTUNING_LIB_DATA", 1),
                                             ("MODULE_PYTHON_RESOURCES", 2)])
def test_cmake_ships_every_file_and_not_the_browser_app(variable, index):
    listed = set(cmake_list(variable))
    tree = shipped_files()[index]
    missing, extra = sorted(tree - listed), sorted(listed - tree)
    assert not missing and not extra, f"MedTuningFiles.cmake {variable}: missing {missing} / not to ship {extra}"
    assert not any(p.startswith("MedTuningLib/web/") for p in listed)
    assert "include(${CMAKE_CURRENT_SOURCE_DIR}/MedTuningFiles.cmake)" in MODULE_CMAKE.read_text(encoding="utf-8")


def test_cmake_extension_fields():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for field in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                  "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({field} "[^"]+"\)', text), field
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text and "add_subdirectory(MedTuning)" in text
    module = MODULE_CMAKE.read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in module and "WITH_GENERIC_TESTS" in module
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module
    testing = (ROOT / "MedTuning" / "Testing" / "Python" / "CMakeLists.txt").read_text(encoding="utf-8")
    for script in re.findall(r"SCRIPT (\S+\.py)", testing):
        assert (ROOT / "MedTuning" / "Testing" / "Python" / script).is_file()


def test_icon_is_128_px_png():
    from PIL import Image

    with Image.open(ROOT / "Resources" / "Icons" / "MedTuning.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)


def test_module_finds_library_in_source_tree_layout():
    """The module looks for MedTuningLib next to itself, then one folder up (source tree)."""
    source = MODULE.read_text(encoding="utf-8")
    func = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "_find_library_root")
    namespace: dict = {"os": __import__("os"), "__file__": str(MODULE)}
    exec(compile(ast.Module(body=[func], type_ignores=[]), str(MODULE), "exec"), namespace)
    assert Path(namespace["_find_library_root"]()) == ROOT
