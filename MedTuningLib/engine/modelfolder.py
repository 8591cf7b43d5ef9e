"""The model folder: ``medtuning.json`` + ``weights.safetensors`` (docs/method.md, "Contracts").

``weights.safetensors`` holds only what cannot be rebuilt from the base weights: the tuned
parameters (adapters, decoder, re-learned position embedding, ...) when the base is a pretrained
file or hub checkpoint, the whole model when the base was random (``--weights none``). Loading
rebuilds the architecture from ``medtuning.json``, loads the base weights again and checks their
sha256 against the record, then loads the stored tensors. Nothing is unpickled.
"""

from __future__ import annotations

import datetime as _dt
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from MedTuningLib import __version__
from MedTuningLib.errors import MedTuningError
from MedTuningLib.fileio import atomic_path, is_pickle_file, read_json, write_json_atomic
from MedTuningLib.schema import FORMAT_VERSION, ModelManifest

MANIFEST_NAME = "medtuning.json"
WEIGHTS_NAME = "weights.safetensors"


def package_versions() -> dict[str, str]:
    versions = {"medtuning": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("timm", "monai", "SimpleITK", "numpy", "slicerio", "safetensors"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # noqa: BLE001 - a missing optional package is simply not listed
            pass
    return versions


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def load_safetensors(path: Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Load tensors from a safetensors file; refuse pickles with UNSAFE_FILE."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MedTuningError("MODEL_FOLDER_INVALID", f"the {what} {path} is missing",
                             "the model folder is incomplete: copy it again from where it came from")
    if is_pickle_file(path):
        raise MedTuningError("UNSAFE_FILE", f"the {what} {path} is a pickle (torch.save) file, which could run code "
                             "when loaded", "MedTuning only loads safetensors; convert the weights with "
                             "safetensors.torch.save_file on a trusted machine")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MedTuningError("MODEL_FOLDER_INVALID", f"the {what} {path} is not a valid safetensors file: {exc}",
                             "the file is truncated or corrupt: copy the model folder again") from exc


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(Path(path), "model folder") as tmp:
        save_file(clean, str(tmp), metadata=metadata)


@dataclass
class LoadedModel:
    """A model folder loaded for inference: the network, its manifest and its data settings."""

    folder: Path
    manifest: dict[str, Any]
    model: torch.nn.Module
    scheme: Any  # MedTuningLib.data.labels.LabelScheme
    preprocessing: Any  # MedTuningLib.data.preprocess.Preprocessing
    record: ModelManifest | None = None  # the typed manifest (``manifest`` is its dict form)

    @property
    def modalities(self) -> list[str]:
        return list(self.manifest["modalities"])

    @property
    def crop(self) -> tuple[int, int, int]:
        return tuple(self.manifest["crop"])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float] | None:
        """The working spacing in array order (z, y, x) mm, or None: native (MedTuningLib/data/spacing.py)."""
        spacing = self.manifest.get("spacing")
        return tuple(float(s) for s in reversed(spacing)) if spacing else None  # type: ignore[return-value]


def read_model_manifest(folder: Path) -> ModelManifest:
    """The typed ``medtuning.json`` of a model folder (see :class:`MedTuningLib.schema.ModelManifest`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MedTuningError("FILE_NOT_FOUND", f"model folder {folder} does not exist",
                             "give the folder that holds medtuning.json (see 'medtuning info')")
    if not (folder / MANIFEST_NAME).is_file():
        raise MedTuningError("MODEL_FOLDER_INVALID", f"{folder} has no {MANIFEST_NAME}: it is not a MedTuning model "
                             "folder, or an incomplete copy of one",
                             "give the folder that holds medtuning.json and weights.safetensors (a folder written by "
                             "'medtuning train'), or copy it again")
    data = read_json(folder / MANIFEST_NAME, "MODEL_FOLDER_INVALID", "model description")
    return ModelManifest.from_dict(data, str(folder / MANIFEST_NAME))


def read_manifest(folder: Path) -> dict[str, Any]:
    """``medtuning.json`` as a plain dict, read and checked through :class:`ModelManifest`."""
    return read_model_manifest(folder).to_dict()


def build_from_manifest(manifest: dict[str, Any]) -> torch.nn.Module:
    from MedTuningLib.models import ModelConfig, build_model

    return build_model(ModelConfig.from_dict(manifest["architecture"]))


def restore_base_weights(model: torch.nn.Module, record: dict[str, Any], override: str | None = None) -> None:
    """Load the base weights the model was tuned on and check they are the same bytes."""
    from MedTuningLib.models import load_base_weights

    if record.get("source") == "none" and override is None:
        return  # random base: the weights file stores the whole model
    source = override or (record.get("path") if record.get("source") == "file" else "hub")
    if record.get("source") == "file" and override is None and not Path(str(source)).is_file():
        raise MedTuningError("WEIGHTS_NOT_FOUND", f"the base-weights file this model was tuned on is not at {source}",
                             "pass its current location with --weights FILE (the sha256 is checked)")
    # The same initialisation as in training ("official" leaves some tensors random: they are in the weights file).
    info = load_base_weights(model, str(source), init=record.get("init") or "project")
    expected = record.get("sha256")
    if expected and info.sha256 and info.sha256 != expected:
        raise MedTuningError("WEIGHTS_CHECKSUM_MISMATCH",
                             f"the base weights {info.path or info.id} (sha256 {info.sha256[:12]}…) differ from those "
                             f"the model was tuned on (sha256 {expected[:12]}…)",
                             "use the same base-weights file the model was trained with (see 'medtuning info --model')")


def load_model_folder(folder: Path, device: torch.device | str = "cpu", weights: str | None = None) -> LoadedModel:
    """Rebuild a tuned model from its folder, ready for inference (eval mode)."""
    from MedTuningLib.data.labels import LabelScheme
    from MedTuningLib.data.preprocess import Preprocessing

    folder = Path(folder)
    record = read_model_manifest(folder)
    manifest = record.to_dict()
    tensors = load_safetensors(folder / WEIGHTS_NAME)
    model = build_from_manifest(manifest)
    if manifest["stored"] == "full":
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise MedTuningError("WEIGHTS_INCOMPATIBLE", f"{folder / WEIGHTS_NAME} does not fit the architecture in "
                                 f"medtuning.json ({len(missing)} missing, {len(unexpected)} unexpected tensors)",
                                 "the model folder is damaged or was edited: train it again")
    else:
        restore_base_weights(model, manifest["base_weights"], weights)
        model.load_tuned_state_dict(tensors)
    model.to(device).eval()
    return LoadedModel(folder=folder, manifest=manifest, model=model,
                       scheme=LabelScheme.from_dict(manifest["label_scheme"]),
                       preprocessing=Preprocessing.from_dict(manifest["preprocessing"]), record=record)


def weights_to_store(model: torch.nn.Module, pretrained: bool) -> tuple[str, dict[str, torch.Tensor]]:
    """What goes into weights.safetensors: tuned tensors over a pretrained base, else the whole model."""
    if pretrained:
        return "tuned", model.tuned_state_dict()
    return "full", dict(model.state_dict())


def write_model_folder(folder: Path, model: torch.nn.Module, manifest: ModelManifest | dict[str, Any],
                       tensors: dict[str, torch.Tensor]) -> ModelManifest:
    """Write weights then manifest into ``folder`` (normally ``OUT.partial``), each atomically."""
    folder = Path(folder)
    if not isinstance(manifest, ModelManifest):
        manifest = ModelManifest.from_dict({"format_version": FORMAT_VERSION, **manifest},
                                           "the new model description")
    manifest.packages = package_versions()
    manifest.medtuning_version = __version__
    save_safetensors(folder / WEIGHTS_NAME, tensors, metadata={"format": "pt", "stored": manifest.stored})
    write_json_atomic(folder / MANIFEST_NAME, manifest.to_dict(), "model folder")
    return manifest


def update_manifest(folder: Path, change) -> ModelManifest:
    """Read ``medtuning.json``, let ``change(record)`` edit it, write it back atomically."""
    record = read_model_manifest(folder)
    change(record)
    write_json_atomic(Path(folder) / MANIFEST_NAME, record.to_dict(), "model folder")
    return record
