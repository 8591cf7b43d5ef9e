"""Model-file sizes: a Med-Tuning model folder's ``weights.safetensors`` against a full checkpoint.

A locally made base-weights file stands in for pretrained weights (no machine of this project reaches the
hub): a timm backbone with random weights is saved as ``.safetensors`` and loaded with ``--weights FILE``
semantics (:func:`MedTuningLib.models.load_base_weights`), so the model is "pretrained" and its folder stores
only what is not in the base weights (:func:`MedTuningLib.engine.modelfolder.weights_to_store`, exactly what
``medtuning train`` writes). The full checkpoint is the whole model's state dict.

``python -m MedTuningLib.bench.model_files --arch vit_upernet`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def model_file_sizes(arch: str = "vit_upernet", backbone: str | None = None, in_channels: int = 4,
                     classes: int = 4, crop: tuple[int, int, int] = (16, 128, 128), method: str = "med_tuning",
                     backbone_kwargs: dict | None = None, decoder_width: int | None = None) -> dict:
    import timm
    import torch

    from MedTuningLib.engine.modelfolder import save_safetensors, weights_to_store
    from MedTuningLib.models import ModelConfig, build_model, load_base_weights

    cfg = ModelConfig(arch=arch, backbone=backbone, in_channels=in_channels, num_classes=classes, img_size=crop[1],
                      depth=crop[0], method=method, backbone_kwargs=dict(backbone_kwargs or {}),
                      decoder_width=decoder_width)
    torch.manual_seed(0)
    model = build_model(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The stand-in for a pretrained file: timm's own model (3 input channels, as published), random weights.
        kwargs = dict(cfg.resolved_backbone_kwargs())
        base = timm.create_model(cfg.backbone_name.split(".", 1)[0], pretrained=False, **kwargs)
        base_file = tmp / "base.safetensors"
        save_safetensors(base_file, base.state_dict())
        record = load_base_weights(model, str(base_file))
        stored, tensors = weights_to_store(model, record.pretrained)
        tuned_file = tmp / "weights.safetensors"
        save_safetensors(tuned_file, tensors)
        full_file = tmp / "full.safetensors"
        save_safetensors(full_file, model.state_dict())
        sizes = {"base_file_bytes": base_file.stat().st_size, "weights_bytes": tuned_file.stat().st_size,
                 "full_checkpoint_bytes": full_file.stat().st_size}
    return {"arch": arch, "method": method, "backbone": cfg.backbone_name, "stored": stored,
            "stored_tensors": len(tensors), **sizes,
            "ratio": round(sizes["weights_bytes"] / sizes["full_checkpoint_bytes"], 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m MedTuningLib.bench.model_files")
    p.add_argument("--arch", default="vit_upernet")
    p.add_argument("--backbone", default=None)
    p.add_argument("--method", default="med_tuning")
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--classes", type=int, default=4)
    args = p.parse_args(argv)
    result = model_file_sizes(args.arch, args.backbone, args.in_channels, args.classes, method=args.method)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
