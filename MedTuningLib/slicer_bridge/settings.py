"""Module settings, model discovery and case-library listing — without Slicer.

The Slicer module stores :class:`BridgeSettings` in the application settings (per user, not per
scene). Model discovery reads ``medtuning.json`` of every folder under the models folder so the
Segment section can show one volume selector per modality, in channel order, and the segments a
model writes. Model folders and case libraries are read through the project's records
(:mod:`MedTuningLib.schema`), the same readers the backend uses: a damaged or newer folder is listed
with its problem instead of breaking the list, and fields this version does not know are kept there.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from MedTuningLib.errors import MedTuningError
from MedTuningLib.paths import default_cases_dir, default_models_dir
from MedTuningLib.schema import CaseManifest, ModelManifest, SegmentEffort, history_rows

MANIFEST_NAME = "medtuning.json"
WEIGHTS_NAME = "weights.safetensors"
CASES_MANIFEST = "cases.json"
DEVICES = ("auto", "cpu", "cuda")


def default_backend_python(slicer_home: Optional[str] = None) -> str:
    """Slicer's own ``PythonSlicer`` when it can be found, else the running interpreter."""
    names = ("PythonSlicer.exe", "PythonSlicer") if sys.platform == "win32" else ("PythonSlicer",)
    if slicer_home:
        for name in names:
            candidate = Path(slicer_home) / "bin" / name
            if candidate.is_file():
                return str(candidate)
    found = shutil.which("PythonSlicer")
    return found or sys.executable


#: Variables that tie a Python process to one installation's standard library and site-packages.
#: Slicer sets them for its own Python; another interpreter must not inherit them.
PYTHON_ENV_VARS = ("PYTHONHOME", "PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONSTARTUP", "PYTHONEXECUTABLE",
                   "PYTHONPLATLIBDIR", "PYTHONSAFEPATH", "VIRTUAL_ENV", "CONDA_PREFIX")


def backend_environment(current: Mapping[str, str], own_python: bool,
                        startup: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The environment a backend process (or the dependency probe) starts with.

    ``own_python``: the backend is Slicer's ``PythonSlicer``; it gets the current environment (its
    launcher sets Slicer's Python up again anyway). Otherwise the backend is another interpreter
    (e.g. an environment with a CUDA build of PyTorch): it gets the environment Slicer itself was
    started with (``slicer.util.startupEnvironment()``, passed as ``startup``), without the Python
    variables of Slicer's Python — or, when that is not known, the current environment without them
    and without Slicer's library folders. A value the user had set before starting Slicer stays.
    """
    if own_python:
        return dict(current)
    slicer_home = current.get("SLICER_HOME", "")
    env = dict(current if startup is None else startup)
    for name in PYTHON_ENV_VARS[:7]:
        value = env.get(name)
        # Without the startup environment every such value may be Slicer's; with it, only those
        # pointing into Slicer's folder are (the launcher settings do not list every variable).
        if value is not None and (startup is None or (slicer_home and slicer_home in value)):
            del env[name]
    if slicer_home:  # Slicer's folders off the search paths (its libpython, its Qt)
        for name in ("PATH", "LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "DYLD_FRAMEWORK_PATH", "QT_PLUGIN_PATH"):
            if name in env:
                kept = [p for p in env[name].split(os.pathsep) if p and not p.startswith(slicer_home)]
                if kept:
                    env[name] = os.pathsep.join(kept)
                else:
                    del env[name]
    return env


@dataclass
class BridgeSettings:
    """What the Settings section edits. Empty ``backend_python`` means "the default one"."""

    backend_python: str = ""
    models_dir: str = ""
    cases_dir: str = ""
    device: str = "auto"
    auto_retrain: bool = False  # adding a case never retrains unless the user turns this on

    def resolved_python(self, slicer_home: Optional[str] = None) -> str:
        return self.backend_python or default_backend_python(slicer_home)

    def resolved_models_dir(self) -> Path:
        return Path(self.models_dir).expanduser() if self.models_dir else default_models_dir()

    def resolved_cases_dir(self) -> Path:
        return Path(self.cases_dir).expanduser() if self.cases_dir else default_cases_dir()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BridgeSettings":
        """Unknown keys are ignored and values of the wrong type fall back to the defaults."""
        settings = cls()
        for key, default in asdict(cls()).items():
            value = values.get(key, default)
            if isinstance(default, bool):
                value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
            elif not isinstance(value, str):
                value = default
            setattr(settings, key, value)
        if settings.device not in DEVICES:
            settings.device = "auto"
        return settings


# -- models --------------------------------------------------------------------------------------

@dataclass
class SegmentInfo:
    name: str
    color: Optional[tuple[float, float, float]] = None  # 0..1 RGB
    value: Optional[int] = None


@dataclass
class ModelInfo:
    """What the Segment and Correct sections need to know about a model folder.

    Read through :class:`MedTuningLib.schema.ModelManifest` (the record training writes). ``round`` is
    the model's place in its correction lineage (0: first training; each re-tune adds one), ``test_dice``
    the mean Dice per region on the library's held-out test cases when it was trained (empty when the
    library had none) and ``history`` the rows of :func:`MedTuningLib.schema.history_rows` (one per
    round: held-out Dice per region and the correction effort of the cases added for that round).
    """

    path: Path
    name: str
    modalities: list[str] = field(default_factory=list)
    segments: list[SegmentInfo] = field(default_factory=list)
    task: str = ""
    architecture: str = ""
    method: str = ""
    pretrained: Optional[bool] = None
    summary: dict[str, Any] = field(default_factory=dict)  # the training summary (epochs, seconds, best, ...)
    round: int = 0
    test_dice: dict[str, Optional[float]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    problem: str = ""  # why the folder cannot be used; empty when it can

    @property
    def usable(self) -> bool:
        return not self.problem

    def describe(self) -> str:
        """One line for a tooltip / status label."""
        if self.problem:
            return f"{self.name}: {self.problem}"
        parts = [self.task or "custom", self.architecture, self.method]
        text = ", ".join(p for p in parts if p)
        if self.pretrained is False:
            text += " (not pretrained)"
        if self.round:
            text += f", round {self.round}"
        segs = ", ".join(s.name for s in self.segments)
        return f"{self.name} — {text}; modalities: {', '.join(self.modalities) or '?'}" + (f"; segments: {segs}" if segs else "")


def _color(value: Any) -> Optional[tuple[float, float, float]]:
    """RGB (0..1) from a label scheme's ``[r, g, b]``."""
    if isinstance(value, (list, tuple)) and len(value) >= 3 and all(isinstance(v, (int, float)) for v in value[:3]):
        return (float(value[0]), float(value[1]), float(value[2]))
    return None


def read_model_info(folder: os.PathLike | str) -> ModelInfo:
    """Describe a model folder; problems (also a newer format) are reported in ``problem``, never raised."""
    path = Path(folder)
    info = ModelInfo(path=path, name=path.name)
    manifest_path = path / MANIFEST_NAME
    try:
        record = ModelManifest.from_dict(json.loads(manifest_path.read_text(encoding="utf-8")), str(manifest_path))
    except FileNotFoundError:
        info.problem = f"no {MANIFEST_NAME} (not a MedTuning model folder)"
        return info
    except (OSError, ValueError) as exc:
        info.problem = f"{MANIFEST_NAME} cannot be read: {exc}"
        return info
    except MedTuningError as exc:
        info.problem = f"{exc.message} ({exc.hint})"
        return info
    info.modalities = list(record.modalities)
    segments = record.label_scheme.get("segments") or []
    info.segments = [SegmentInfo(str(s.get("name")), _color(s.get("color")), i)
                     for i, s in enumerate(segments, start=1) if isinstance(s, dict)]
    info.task, info.architecture, info.method = record.task, record.arch, record.method_name
    info.pretrained = record.pretrained
    info.summary = record.training.to_dict()
    info.round = record.round
    if record.test is not None:
        info.test_dice = {r: record.test.mean(f"dice/{r}") for r in record.test.regions}
    info.history = history_rows(record)
    if not (path / WEIGHTS_NAME).is_file():
        info.problem = f"{WEIGHTS_NAME} is missing"
    return info


def discover_models(models_dir: os.PathLike | str, extra: Iterable[os.PathLike | str] = ()) -> list[ModelInfo]:
    """Model folders directly under ``models_dir`` (plus ``extra`` folders the user loaded).

    Unfinished runs (``*.partial``) are skipped; damaged folders are listed with their problem.
    """
    found: dict[str, ModelInfo] = {}
    root = Path(models_dir)
    candidates = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for folder in [*candidates, *(Path(e) for e in extra)]:
        if folder.name.endswith(".partial") or not (folder / MANIFEST_NAME).exists():
            continue
        found.setdefault(str(folder.resolve()), read_model_info(folder))
    return sorted(found.values(), key=lambda m: m.name.lower())


def next_model_name(models_dir: os.PathLike | str, base: str) -> str:
    """``base``, or ``base-2``, ``base-3`` ... not yet used in ``models_dir`` (finished or partial)."""
    root = Path(models_dir)
    taken = {p.name.lower() for p in root.iterdir()} if root.is_dir() else set()
    name, n = base, 1
    while name.lower() in taken or f"{name}.partial".lower() in taken:
        n += 1
        name = f"{base}-{n}"
    return name


# -- case library --------------------------------------------------------------------------------

@dataclass
class CaseEntry:
    """One case of a library, as the Slicer cases table and the browser app show it.

    ``provenance`` is where the case came from (``import``, ``scene`` or ``correction``), ``added`` when
    (ISO 8601), ``source`` a free-text origin, ``from_model`` the model whose result was corrected;
    ``effort`` maps each segment to its :class:`MedTuningLib.schema.SegmentEffort` (Dice between the
    model's result and the correction, voxels / mm³ added and removed). ``label`` is empty for an
    unlabelled scan (split ``unlabelled``).
    """

    case_id: str
    images: dict[str, str]  # modality name -> file (relative to the library)
    label: str
    split: str = "train"
    provenance: str = ""
    added: str = ""
    source: str = ""
    from_model: str = ""
    effort: dict[str, SegmentEffort] = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        return bool(self.label)

    def effort_text(self) -> str:
        """``"Spleen: Dice 0.91, +120 / -30 mm³"`` per corrected segment; empty when not a measured correction."""
        parts = []
        for name, e in self.effort.items():
            dice = "–" if e.dice is None else f"{e.dice:.2f}"
            parts.append(f"{name}: Dice {dice}, +{e.mm3_added:.0f} / -{e.mm3_removed:.0f} mm³")
        return "; ".join(parts)


def read_case_library(library: os.PathLike | str) -> list[CaseEntry]:
    """The cases listed in ``cases.json`` (read through :class:`MedTuningLib.schema.CaseManifest`);
    empty when the library does not exist yet or its manifest is broken or newer (then
    :func:`case_library_problem` says why)."""
    try:
        manifest = _read_case_manifest(library)
    except (OSError, ValueError, MedTuningError):
        return []
    if manifest is None:
        return []
    return [CaseEntry(case_id=c.id, images=dict(c.images), label=c.label or "", split=c.split,
                      provenance=c.provenance.kind, added=c.provenance.added, source=c.provenance.source,
                      from_model=c.provenance.from_model or "", effort=dict(c.provenance.effort))
            for c in manifest.cases]


def case_library_problem(library: os.PathLike | str) -> str:
    """Why ``cases.json`` cannot be read (empty when it can, or when there is none yet)."""
    try:
        _read_case_manifest(library)
    except (OSError, ValueError) as exc:
        return f"{CASES_MANIFEST} cannot be read: {exc}"
    except MedTuningError as exc:
        return f"{exc.message} ({exc.hint})"
    return ""


def _read_case_manifest(library: os.PathLike | str) -> Optional[CaseManifest]:
    path = Path(library) / CASES_MANIFEST
    if not path.is_file():
        return None
    return CaseManifest.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))


def read_history(model: os.PathLike | str) -> list[dict[str, Any]]:
    """The model's rounds for a table or plot (see :func:`MedTuningLib.schema.history_rows`); empty when
    the folder cannot be read."""
    return read_model_info(model).history


# -- dependency check ----------------------------------------------------------------------------

#: Packages the backend needs; torch / torchvision come through the PyTorch extension in Slicer.
TORCH_PACKAGES = ("torch", "torchvision")
OTHER_PACKAGES = ("timm", "monai", "slicerio", "safetensors", "SimpleITK", "numpy", "scipy", "psutil")

#: Run with ``PYTHON -c``: prints one JSON object describing the interpreter (imports nothing heavy
#: except torch, and only when it is installed).
DEPENDENCY_PROBE = r"""
import json, sys
from importlib import metadata
report = {"python": sys.version.split()[0], "executable": sys.executable, "packages": {}}
for name in %(packages)r:
    try:
        report["packages"][name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        report["packages"][name] = None
try:
    import torch
    report["cuda"] = bool(torch.cuda.is_available())
    report["gpus"] = [{"name": torch.cuda.get_device_name(i),
                       "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                      for i in range(torch.cuda.device_count())] if report["cuda"] else []
    report["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
except Exception as exc:
    report["torch_error"] = "%%s: %%s" %% (type(exc).__name__, exc)
print(json.dumps(report))
""" % {"packages": TORCH_PACKAGES + OTHER_PACKAGES}


@dataclass
class DependencyReport:
    python: str = ""
    packages: dict[str, Optional[str]] = field(default_factory=dict)
    cuda: bool = False
    gpus: list[dict[str, Any]] = field(default_factory=list)
    torch_error: str = ""
    problem: str = ""

    @property
    def missing(self) -> list[str]:
        return [name for name, version in self.packages.items() if not version]

    @property
    def missing_torch(self) -> list[str]:
        return [name for name in TORCH_PACKAGES if name in self.missing]

    @property
    def missing_other(self) -> list[str]:
        return [name for name in OTHER_PACKAGES if name in self.missing]

    @property
    def ready(self) -> bool:
        return not self.problem and not self.missing and not self.torch_error

    def gpu_text(self) -> str:
        if self.gpus:
            return "; ".join(f"{g.get('name')} ({g.get('memory_gb')} GB)" for g in self.gpus)
        if self.packages.get("torch"):
            return "no CUDA GPU found: training and segmentation run on the CPU (slower)"
        return "unknown (PyTorch is not installed)"

    def summary(self) -> str:
        if self.problem:
            return self.problem
        if self.ready:
            return f"All dependencies found (Python {self.python}, torch {self.packages.get('torch')})."
        text = "Missing: " + ", ".join(self.missing) if self.missing else ""
        if self.torch_error:
            text += ("; " if text else "") + f"torch fails to import: {self.torch_error}"
        return text


def parse_probe_output(stdout: str, returncode: int = 0, stderr: str = "") -> DependencyReport:
    """Turn :data:`DEPENDENCY_PROBE`'s output into a report (the last JSON line counts)."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict):
            return DependencyReport(python=str(data.get("python") or ""), packages=dict(data.get("packages") or {}),
                                    cuda=bool(data.get("cuda")), gpus=list(data.get("gpus") or []),
                                    torch_error=str(data.get("torch_error") or ""))
    tail = (stderr or stdout).strip().splitlines()[-5:]
    return DependencyReport(problem=f"the backend Python could not be run (exit status {returncode}): "
                                    + " / ".join(tail))


def probe_argv(python: str) -> list[str]:
    return [python, "-c", DEPENDENCY_PROBE]


def pip_constraints(packages: dict[str, Optional[str]]) -> str:
    """A pip constraints file pinning the installed torch / torchvision, so no install replaces them."""
    return "".join(f"{name}=={packages[name]}\n" for name in TORCH_PACKAGES if packages.get(name))


def pip_install_args(missing: Sequence[str], constraints_file: str) -> list[str]:
    """Arguments for ``slicer.util.pip_install``: only the missing non-torch packages, torch pinned."""
    wanted = [name for name in missing if name not in TORCH_PACKAGES]
    return [*wanted, "--constraint", constraints_file] if wanted else []
