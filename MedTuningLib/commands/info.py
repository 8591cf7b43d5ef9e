"""``medtuning info``: versions, devices, where files live, installed models, the error catalogue."""

from __future__ import annotations

import json
from pathlib import Path

from MedTuningLib import __version__
from MedTuningLib.errors import MedTuningError
from MedTuningLib.schema import FORMAT_VERSION, ModelManifest


def list_models(folder: Path) -> list[dict]:
    """Model folders (with a readable medtuning.json) directly inside ``folder``."""
    from MedTuningLib.engine.modelfolder import MANIFEST_NAME

    models = []
    if not folder.is_dir():
        return models
    for child in sorted(folder.iterdir()):
        manifest_path = child / MANIFEST_NAME
        if not manifest_path.is_file():
            continue
        try:
            record = ModelManifest.from_dict(json.loads(manifest_path.read_text(encoding="utf-8")), str(manifest_path))
        except (OSError, ValueError, MedTuningError):
            continue  # a damaged or newer folder is not listed as usable
        models.append({"path": str(child), "method": record.method_name, "arch": record.arch,
                       "modalities": record.modalities, "segments": record.segment_names,
                       "pretrained": record.pretrained, "round": record.round})
    return models


def run(args, ctx) -> dict:
    from MedTuningLib.engine.device import describe_devices
    from MedTuningLib.engine.modelfolder import package_versions, read_manifest
    from MedTuningLib.errors import catalogue_markdown
    from MedTuningLib.paths import default_cases_dir, default_models_dir, medtuning_home

    events = ctx.events
    events.start("info", device=None)
    if args.errors:
        if not events.jsonl:
            events.out.write(catalogue_markdown() + "\n")
        from MedTuningLib.errors import CATALOGUE

        return {"errors": {code: {"exit": k.exit_status, "meaning": k.summary} for code, k in CATALOGUE.items()}}
    if args.model is not None:
        manifest = read_manifest(args.model)
        if not events.jsonl:
            events.out.write(json.dumps(manifest, indent=2) + "\n")
        return {"model": manifest}
    info = {"version": __version__, "format_version": FORMAT_VERSION, "packages": package_versions(),
            "devices": describe_devices(), "home": str(medtuning_home()), "models_dir": str(default_models_dir()),
            "cases_dir": str(default_cases_dir()), "models": list_models(default_models_dir())}
    if not events.jsonl:
        if args.json:
            events.out.write(json.dumps(info, indent=2) + "\n")
        else:
            lines = [f"MedTuning {info['version']} (model format {FORMAT_VERSION})"]
            lines += [f"  {k}: {v}" for k, v in info["packages"].items()]
            devices = info["devices"]
            lines.append(f"  CUDA: {'yes' if devices['cuda_available'] else 'no'}; CPU bf16: {devices['cpu_bf16']}")
            lines += [f"  GPU {g['index']}: {g['name']} ({g['memory_mb']} MB)" for g in devices["gpus"]]
            lines.append(f"  models folder: {info['models_dir']} ({len(info['models'])} model(s))")
            lines.append(f"  cases folder: {info['cases_dir']}")
            events.out.write("\n".join(lines) + "\n")
    return info
